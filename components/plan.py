def plan(profile: dict, run_id: str) -> bool:
    """Validate the profile before any work starts. Returns whether tuning runs.

    One return value, not a NamedTuple: kfp.local resolves a condition on a task's
    single `Output` but not on a named output of a NamedTuple.
    """
    from flywheel.stages import plan as run

    return run(profile, run_id).tune_enabled


def skip_tune() -> dict:
    """The tuning branch when `tune.enabled` is false: no parameters to merge."""
    return {}
