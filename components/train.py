from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output


def train(
    profile: dict,
    dataset: Input[Dataset],
    params: dict,
    trigger_reason: str,
    run_id: str,
    model: Output[Model],
    loss_curve: Output[HTML],
    metrics: Output[Metrics],
) -> str:
    """DeepSpeed on Ray Train. Returns the MLflow run id of the training run."""
    import shutil

    from flywheel.contracts import TRAIN
    from flywheel.kfp.metrics import log_metrics
    from flywheel.runtime.kuberay_entry import runner

    # ray.mode kuberay: the same stage, in a RayJob of its own (flywheel.runtime.kuberay).
    run = runner(TRAIN, profile)
    result = run(profile, dataset.path, params, model.path, trigger_reason, run_id)
    shutil.copyfile(result.loss_curve_html, loss_curve.path)
    log_metrics(metrics, result.metrics())
    model.metadata["mlflow_run_id"] = result.mlflow_run_id or ""
    return result.mlflow_run_id or ""
