from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output


def evaluate(
    profile: dict,
    dataset: Input[Dataset],
    model: Input[Model],
    run_id: str,
    report: Output[Artifact],
    metrics: Output[Metrics],
):
    """Bits per byte, perplexity and next-token accuracy of the challenger on the held-out
    split; the report carries the per-document scores the gate pairs on."""
    from flywheel.kfp.metrics import log_metrics
    from flywheel.stages import evaluate as run

    result = run(profile, model.path, dataset.path, report.path, run_id)
    log_metrics(metrics, result.metrics(""))


def evaluate_champion(
    profile: dict,
    dataset: Input[Dataset],
    run_id: str,
    report: Output[Artifact],
    metrics: Output[Metrics],
):
    """The current champion, evaluated fresh on the same split (absent: an empty report)."""
    from flywheel.kfp.metrics import log_metrics
    from flywheel.stages import evaluate as run

    result = run(profile, None, dataset.path, report.path, run_id)
    found = result.metrics("") if result else {}
    log_metrics(metrics, {"champion_exists": float(result is not None), **found})
