from kfp.dsl import HTML, Dataset, Input, Metrics, Output


def tune(
    profile: dict,
    dataset: Input[Dataset],
    run_id: str,
    plots: Output[HTML],
    metrics: Output[Metrics],
) -> dict:
    """Optuna study of short trials on Ray. Returns the best train parameters."""
    from flywheel.stages import tune as run

    result = run(profile, dataset.path, plots.path + ".d", run_id)
    result.write_html(plots.path)
    for key, value in result.metrics().items():
        metrics.log_metric(key, value)
    return result.best_params
