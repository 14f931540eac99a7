from kfp.dsl import HTML, Dataset, Input, Metrics, Output


def tune(
    profile: dict,
    dataset: Input[Dataset],
    run_id: str,
    plots: Output[HTML],
    metrics: Output[Metrics],
) -> dict:
    """Optuna study of short trials on Ray. Returns the best train parameters."""
    from flywheel.contracts import TUNE
    from flywheel.kfp.metrics import log_metrics
    from flywheel.runtime.kuberay_entry import runner

    # ray.mode kuberay: the same stage, in a RayJob of its own (flywheel.runtime.kuberay).
    run = runner(TUNE, profile)
    result = run(profile, dataset.path, plots.path + ".d", run_id)
    result.write_html(plots.path)
    log_metrics(metrics, result.metrics())
    return result.best_params
