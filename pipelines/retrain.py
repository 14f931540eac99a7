"""The retraining DAG.

    plan -> prepare-data -> [tune | skip] -> train -> evaluate challenger  \
                         \\-----------------------> evaluate champion ---- gate -> if promote: promote
    all inside an exit handler whose summary task runs even when a step fails.

Built from a profile at compile time (`build(profile)`): the profile names the images and
the per-task resources, retries, caching and Kubernetes settings; the profile itself travels
as the one dict parameter, validated again inside every component.

Every task gets `run_id`, the key of the run ledger (`flywheel.ledger`), from
`dsl.PIPELINE_JOB_ID_PLACEHOLDER`: the run's UUID on Kubeflow (a random id under kfp.local),
unique per run. The job *name* placeholder is the run's display name on a cluster and
repeats. When the monitor nests this pipeline, its tasks resolve the same placeholder to
the monitor run's id (one run, one id; KFP resolves only the bare placeholder, so no suffix
can be added): the nested retrain's ledger entries share the monitor's id, and their stage
names (plan ... summary) are disjoint from the monitor's (drift-check, no-retrain).
"""

from kfp import dsl

import components
from flywheel import contracts
from flywheel.config import KfpConfig, Profile
from flywheel.kfp import platform

PIPELINE_NAME = "flywheel-retrain"


def configure(
    task: dsl.PipelineTask, name: str, display: str, kfp_config: KfpConfig
) -> dsl.PipelineTask:
    """Display name, resources, retries, caching and Kubernetes settings for one task, from
    the profile. `name` is the task's key in `kfp.resources` (one of `flywheel.config.TASKS`)."""
    res = kfp_config.for_task(name)
    task.set_display_name(display)
    # Request what the task is given as its limit: a training pod that is scheduled on a node
    # that cannot hold its limit gets OOM-killed mid-run instead of waiting for room.
    task.set_cpu_request(res.cpu).set_cpu_limit(res.cpu)
    task.set_memory_request(res.memory).set_memory_limit(res.memory)
    if res.accelerator_type and res.accelerator_count:
        task.set_accelerator_type(res.accelerator_type).set_accelerator_limit(res.accelerator_count)
    if res.retries:
        # Argo ends retrying at first start + backoffMaxDuration (see TaskResources.retries).
        window = f"{round(res.retry_window_hours * 3600)}s"
        task.set_retry(num_retries=res.retries, backoff_max_duration=window)
    task.set_caching_options(enable_caching=res.caching)
    return platform.apply(task, name, kfp_config)


def build(profile: Profile):
    """The retrain pipeline function for this profile's image and resources."""
    c = components.build(profile.kfp)
    kfp_config = profile.kfp
    default_profile = profile.to_param()

    def retrain_body(profile: dict, trigger_reason: str, data_location: str, run_id: str):
        plan = configure(
            c.plan(profile=profile, run_id=run_id), contracts.PLAN, "Validate profile", kfp_config
        )
        prep = configure(
            c.prepare_data(profile=profile, data_location=data_location, run_id=run_id),
            contracts.PREPARE_DATA,
            "Prepare data (Ray Data)",
            kfp_config,
        ).after(plan)
        with dsl.If(plan.output == True, name="tune-enabled"):  # noqa: E712 (a KFP condition, not Python)
            tuned = configure(
                c.tune(profile=profile, dataset=prep.outputs["dataset"], run_id=run_id),
                contracts.TUNE,
                "Tune (Optuna on Ray)",
                kfp_config,
            )
        with dsl.Else(name="tune-disabled"):
            untuned = configure(c.skip_tune(), contracts.SKIP_TUNE, "Tuning disabled", kfp_config)
        trained = configure(
            c.train(
                profile=profile,
                dataset=prep.outputs["dataset"],
                params=dsl.OneOf(tuned.outputs["Output"], untuned.output),
                trigger_reason=trigger_reason,
                run_id=run_id,
            ),
            contracts.TRAIN,
            "Train (DeepSpeed on Ray Train)",
            kfp_config,
        )
        challenger = configure(
            c.evaluate(
                profile=profile,
                dataset=prep.outputs["dataset"],
                model=trained.outputs["model"],
                run_id=run_id,
            ),
            contracts.EVALUATE,
            "Evaluate challenger",
            kfp_config,
        )
        # The champion is evaluated fresh, on the same split, after training: the model
        # the gate compares against is the one in production now, not at registration.
        champion = configure(
            c.evaluate_champion(profile=profile, dataset=prep.outputs["dataset"], run_id=run_id),
            contracts.EVALUATE_CHAMPION,
            "Evaluate champion",
            kfp_config,
        ).after(trained)
        gate = configure(
            c.gate(
                profile=profile,
                challenger=challenger.outputs["report"],
                champion=champion.outputs["report"],
                model=trained.outputs["model"],
                dataset=prep.outputs["dataset"],
                train_run_id=trained.outputs["Output"],
                trigger_reason=trigger_reason,
                run_id=run_id,
            ),
            contracts.GATE,
            "Gate: challenger vs champion",
            kfp_config,
        )
        with dsl.If(gate.outputs["Output"] != "", name="promote-if-better"):
            configure(
                c.promote(
                    profile=profile,
                    version=gate.outputs["Output"],
                    trigger_reason=trigger_reason,
                    run_id=run_id,
                ),
                contracts.PROMOTE,
                "Promote to champion",
                kfp_config,
            )

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Prepare, tune, train, evaluate, gate and promote a causal LM.",
    )
    def retrain(
        profile: dict = default_profile,
        trigger_reason: str = "manual",
        data_location: str = "",
    ):
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        summary = configure(
            c.summary(profile=profile, run_id=run_id), contracts.SUMMARY, "Run summary", kfp_config
        )
        with dsl.ExitHandler(summary, name="retrain"):
            retrain_body(profile, trigger_reason, data_location, run_id)

    return retrain
