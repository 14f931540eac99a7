from typing import NamedTuple

from kfp.dsl import HTML, Metrics, Output


def drift_check(
    profile: dict, window: str, run_id: str, report: Output[HTML], metrics: Output[Metrics]
) -> NamedTuple("Drift", [("retrain", bool), ("reason", str)]):
    """Evidently drift of the production window vs the champion's training sample."""
    import shutil
    from collections import namedtuple

    from flywheel.stages import drift_check as run

    result, decision = run(profile, window, report.path + ".d", run_id)
    shutil.copyfile(result.report_html, report.path)
    for key, value in result.metrics().items():
        metrics.log_metric(key, value)
    metrics.log_metric("retrain", float(decision.retrain))
    return namedtuple("Drift", ["retrain", "reason"])(decision.retrain, decision.reason)


def no_retrain(profile: dict, reason: str, run_id: str) -> str:
    """The branch taken without drift (or inside the cooldown): recorded, nothing started."""
    from flywheel.stages import record_no_retrain

    return record_no_retrain(profile, reason, run_id)
