from kfp import dsl
from kfp.dsl import Markdown, Output


def summary(
    profile: dict, run_id: str, status: dsl.PipelineTaskFinalStatus, report: Output[Markdown]
):
    """The exit handler: the run summary, written whether the run succeeded or failed."""
    from pathlib import Path

    from flywheel.runtime.kuberay import cleanup_after
    from flywheel.stages import summarize

    # ray.mode kuberay: whatever RayJob a killed step left is deleted, by run-id label.
    with cleanup_after(profile, run_id):
        result = summarize(profile, run_id, status.state, status.error_message or "")
        Path(report.path).write_text(result.markdown)
        print(result.markdown)
