"""The monitor pipeline, run on a schedule:

    drift-check -> if retrain: the retrain pipeline, nested (trigger reason "drift: ...")
                -> else:       no-retrain (records why: no drift, cooldown, retrain in flight)

The retrain trains on the production window it was triggered by (`data_location`), so
the candidate learns the new distribution and is gated against the champion on it.
"""
# No `from __future__ import annotations`: KFP reads the pipeline signature's real types.

from kfp import dsl

import components
from flywheel import contracts
from flywheel.config import Profile
from pipelines import retrain as retrain_pipeline
from pipelines.retrain import configure

PIPELINE_NAME = "flywheel-monitor"


def build(profile: Profile):
    c = components.build(profile.kfp)
    kfp_config = profile.kfp
    retrain = retrain_pipeline.build(profile)
    default_profile = profile.to_param()

    @dsl.pipeline(
        name=PIPELINE_NAME, description="Drift check with Evidently; retrain when production moved."
    )
    def monitor(profile: dict = default_profile, window: str = ""):
        # Unique per run; the nested retrain resolves it to this same id (see pipelines/retrain.py).
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        drift = configure(
            c.drift_check(profile=profile, window=window, run_id=run_id),
            contracts.DRIFT_CHECK,
            "Drift check (Evidently)",
            kfp_config,
        )
        with dsl.If(drift.outputs["Output"] != "", name="drifted-and-cooled-down"):
            nested = retrain(
                profile=profile, trigger_reason=drift.outputs["Output"], data_location=window
            )
            nested.set_display_name("Retrain (nested pipeline)").set_caching_options(
                enable_caching=False
            )
        with dsl.Else(name="no-retrain"):
            configure(
                c.no_retrain(profile=profile, run_id=run_id),
                contracts.NO_RETRAIN,
                "No retrain",
                kfp_config,
            )

    return monitor
