def promote(profile: dict, version: str, trigger_reason: str, run_id: str) -> str:
    """Move alias `champion` to the version that won the gate (recorded in the history)."""
    from flywheel.stages import promote as run

    run(profile, version, f"won the gate ({trigger_reason})", run_id)
    return version
