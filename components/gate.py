from typing import NamedTuple

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
) -> NamedTuple("Gate", [("promote", bool), ("version", str)]):
    """Decide challenger vs champion; register the candidate with lineage and verdict."""
    from collections import namedtuple
    from pathlib import Path

    from flywheel.stages import gate as run

    result, version, decision_md, card = run(
        profile,
        challenger.path,
        champion.path,
        model.path,
        dataset.path,
        train_run_id,
        trigger_reason,
        run_id,
    )
    Path(decision.path).write_text(decision_md)
    Path(model_card.path).write_text(card)
    metrics.log_metric("promote", float(result.promote))
    return namedtuple("Gate", ["promote", "version"])(result.promote, version)
