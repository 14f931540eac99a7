from kfp.dsl import Dataset, Metrics, Output


def prepare_data(
    profile: dict,
    data_location: str,
    run_id: str,
    dataset: Output[Dataset],
    metrics: Output[Metrics],
) -> str:
    """Ray Data: normalize, filter, dedup, split, tokenize and pack. Returns the content hash."""
    from flywheel.contracts import PREPARE_DATA
    from flywheel.kfp.metrics import log_metrics
    from flywheel.runtime.kuberay_entry import runner

    # ray.mode kuberay: the same stage, in a RayJob of its own (flywheel.runtime.kuberay).
    prepare = runner(PREPARE_DATA, profile)
    stats = prepare(profile, data_location, dataset.path, run_id)
    log_metrics(metrics, stats.metrics())
    dataset.metadata["content_hash"] = stats.content_hash
    return stats.content_hash
