from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output


def evaluate(
    profile: dict,
    dataset: Input[Dataset],
    model: Input[Model],
    run_id: str,
    report: Output[Artifact],
    metrics: Output[Metrics],
):
    """Perplexity and next-token accuracy of the challenger on the held-out split."""
    from flywheel.stages import evaluate as run

    result = run(profile, model.path, dataset.path, report.path, run_id)
    for key, value in result.metrics("").items():
        metrics.log_metric(key, value)


def evaluate_champion(
    profile: dict,
    dataset: Input[Dataset],
    run_id: str,
    report: Output[Artifact],
    metrics: Output[Metrics],
):
    """The current champion, evaluated fresh on the same split (absent: an empty report)."""
    from flywheel.stages import evaluate as run

    result = run(profile, None, dataset.path, report.path, run_id)
    metrics.log_metric("champion_exists", float(result is not None))
    for key, value in (result.metrics("") if result else {}).items():
        metrics.log_metric(key, value)
