from kfp.dsl import HTML, Metrics, Output


def drift_check(
    profile: dict, window: str, run_id: str, report: Output[HTML], metrics: Output[Metrics]
) -> str:
    """The production window vs the champion: distribution drift (Evidently, against its
    training sample) and its bits per byte (against its held-out sample), under drift.trigger.

    Returns the trigger reason of the retrain to start ("drift: 0.94 (4/4 features) and the
    champion is worse on it: ..."), or "" when none starts; why not (no drift, not worse,
    cooldown, a retrain in flight) is in the metrics and the ledger. One return value:
    kfp.local resolves conditions on a single `Output` only.
    """
    import shutil

    from flywheel.kfp.metrics import log_metrics
    from flywheel.stages import drift_check as run

    result = run(profile, window, report.path + ".d", run_id)
    shutil.copyfile(result.report_html, report.path)
    log_metrics(metrics, result.metrics())
    return result.decision.reason if result.decision.retrain else ""


def no_retrain(profile: dict, run_id: str) -> str:
    """The branch taken without drift (or inside the cooldown): recorded, nothing started."""
    from flywheel.stages import record_no_retrain

    return record_no_retrain(profile, run_id)
