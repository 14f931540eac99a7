from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def gate(
    profile: dict,
    challenger: Input[Artifact],
    champion: Input[Artifact],
    model: Input[Model],
    dataset: Input[Dataset],
    train_run_id: str,
    trigger_reason: str,
    run_id: str,
    decision: Output[Markdown],
    model_card: Output[Markdown],
    metrics: Output[Metrics],
) -> str:
    """Decide challenger vs champion; register the candidate with lineage and verdict.

    Returns the version to promote, or "" when the gate rejects it. (One return value:
    kfp.local resolves a condition on a task's single `Output`, not on NamedTuple fields.)
    """
    from pathlib import Path

    from flywheel.kfp.metrics import log_metrics
    from flywheel.stages import gate as run

    result = run(
        profile,
        challenger.path,
        champion.path,
        model.path,
        dataset.path,
        train_run_id,
        trigger_reason,
        run_id,
    )
    Path(decision.path).write_text(result.decision_markdown)
    Path(model_card.path).write_text(result.model_card)
    log_metrics(metrics, {"promote": float(result.decision.promote), **result.decision.deltas})
    return result.version if result.decision.promote else ""
