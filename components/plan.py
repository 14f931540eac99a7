from typing import NamedTuple


def plan(profile: dict, run_id: str) -> NamedTuple(
    "Plan", [("tune_enabled", bool), ("model_name", str)]
):
    """Validate the profile before any work starts and say what this run will do."""
    from collections import namedtuple

    from flywheel.stages import plan as run

    p = run(profile, run_id)
    return namedtuple("Plan", ["tune_enabled", "model_name"])(p["tune_enabled"], p["model_name"])


def skip_tune() -> dict:
    """The tuning branch when `tune.enabled` is false: no parameters to merge."""
    return {}
