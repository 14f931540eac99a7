"""The whole retraining DAG through kfp.local, on a tiny profile, several runs in order.

1. first run: no champion -> the candidate meets the absolute bounds -> promoted, with lineage
2. second run: warm-starts from the champion and is gated against it (fresh evaluation of both)
3. sabotaged challenger (a fresh model trained for one step): not promoted, run still succeeds
4. a failing step: the run fails, and the exit handler's summary is still written
5. configs/sft-local.yaml chained onto that champion: LoRA on models:/flywheel-lm@champion
   with the pydoc instruction set, gated on the fine-tuning metrics against its own base
"""

from __future__ import annotations

import json

import pytest
from fixtures_data import TINY_OVERRIDES

from flywheel import contracts, ledger
from flywheel.config import load_profile
from flywheel.kfp.local import run_local
from flywheel.registry import Registry

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def profile_for(workdir):
    # Context 128 (blocks stay 32): room for the instruction samples the SFT run (the last test)
    # renders with this champion's tokenizer; the extra positions cost nothing per step.
    overrides = [
        f"state_dir={workdir / '.flywheel'}",
        *TINY_OVERRIDES,
        "tune.enabled=false",
        "model.context=128",
    ]

    def make(*extra: str):
        return load_profile(None, overrides + list(extra))

    return make


def _version(registry: Registry, number: str):
    return next(v for v in registry.versions() if str(v.version) == str(number))


def test_first_run_promotes_with_lineage(profile_for):
    p = profile_for()
    run = run_local("retrain", p, arguments={"trigger_reason": "first"})
    assert run.succeeded, run.log_file.read_text()[-3000:]
    registry = Registry(p)
    champ = registry.champion()
    assert champ is not None
    for tag in (
        "data_manifest_hash",
        "training_run_id",
        "pipeline_run_id",
        "trigger_reason",
        "verdict",
    ):
        assert champ.tags.get(tag), f"champion lacks lineage tag {tag}: {champ.tags}"
    assert champ.tags["pipeline_run_id"] == run.run_id
    assert champ.tags["trigger_reason"] == "first"
    # what a person inspects in the UI exists as typed artifacts
    assert (
        run.artifact("train", "loss_curve")
        .read_text()
        .lstrip()
        .lower()
        .startswith(("<!doctype", "<html"))
    )
    assert "promote" in run.artifact("gate", "decision").read_text().lower()
    report = run.artifact("summary", "report").read_text()
    assert "**Outcome:** succeeded" in report and "(as reported by KFP: SUCCEEDED)" in report
    stages = ledger.collect(p, run.run_id)
    assert {"plan", "prepare-data", "train", "gate", "promote", "summary"} <= set(stages)
    assert stages["summary"]["tags"][contracts.SUMMARY_OUTCOME] == "succeeded"


def test_sabotaged_challenger_is_gated_and_run_succeeds(profile_for):
    p = profile_for(
        "model.warm_start=false", "train.max_steps=1", "train.warmup_steps=0", "train.lr=0"
    )
    registry = Registry(p)
    before = registry.champion().version
    run = run_local("retrain", p, arguments={"trigger_reason": "sabotage"})
    assert run.succeeded, run.log_file.read_text()[-3000:]
    stages = ledger.collect(p, run.run_id)
    assert stages["gate"]["tags"]["promote"] == "False"
    # kfp.local says SUCCEEDED; the ledger says how: the challenger lost, the champion stays
    assert stages["summary"]["tags"][contracts.SUMMARY_OUTCOME] == "gated"
    assert registry.champion().version == before
    assert run.artifact("promote", "executor_output.json") is None  # the promote task never ran
    assert "reject" in run.artifact("gate", "decision").read_text().lower()


def test_failing_step_still_writes_the_summary(profile_for, workdir):
    p = profile_for()
    run = run_local("retrain", p, arguments={"data_location": str(workdir / "no-such-dir")})
    assert not run.succeeded
    summary = run.artifact("summary", "report")
    assert summary is not None, "the exit handler did not run"
    assert "(as reported by KFP: FAILED)" in summary.read_text()
    assert json.loads((run.run_dir / "summary" / "executor_output.json").read_text()) is not None
    tags = ledger.collect(p, run.run_id)["summary"]["tags"]
    assert tags[contracts.SUMMARY_OUTCOME] == "failed"
    assert tags[contracts.SUMMARY_FAILED_TASK] == contracts.PREPARE_DATA


def test_sft_profile_chains_lora_onto_the_champion(profile_for, workdir):
    """The README's second command on this module's state: the SFT DAG adapts the champion
    the runs above promoted (no second pretraining DAG), tiny steps."""
    from flywheel.registry.lineage import TAG_DATA_FORMAT, TAG_METHOD

    registry = Registry(profile_for())
    base = registry.champion()
    assert base is not None, "tests 1-2 promote the champion this run adapts"
    p = load_profile(
        "configs/sft-local.yaml",
        [
            f"state_dir={workdir / '.flywheel'}",
            "data.block_size=128",  # the champion's context; longer samples are rejects
            "data.max_reject_share=0.5",  # its 512-token BPE spells the docstrings long
            "model.context=128",
            "model.n_embd=32",
            *[o for o in TINY_OVERRIDES if o.startswith(("train.", "eval."))],
            "train.max_steps=8",
            "train.checkpoint_every=8",
            "eval.max_new_tokens=8",
        ],
    )
    assert p.model.base == "models:/flywheel-lm@champion" and p.train.method == "lora"
    run = run_local("retrain", p, arguments={"trigger_reason": "sft"})
    assert run.succeeded, run.log_file.read_text()[-3000:]

    stages = ledger.collect(p, run.run_id)
    gate = stages["gate"]
    # Both models scored on the held-out responses, and the named guards compared them.
    for name in ("response_loss", "rouge_l", "exact_match"):
        assert f"challenger_{name}" in gate["metrics"], name
        assert f"champion_{name}" in gate["metrics"], name
    decision = run.artifact("gate", "decision").read_text()
    assert "rouge_l (higher is better)" in decision, decision
    assert "response_loss (lower is better)" in decision, decision

    version = _version(registry, gate["tags"]["version"])
    assert version.tags[TAG_METHOD] == "lora", version.tags
    assert version.tags[TAG_DATA_FORMAT] == "instruction", version.tags
    assert version.tags["trigger_reason"] == "sft"
    if gate["tags"]["promote"] == "True":
        assert registry.champion().version == version.version
    else:  # an honest rejection is an outcome too: the champion stays, the reasons say why
        assert registry.champion().version == base.version, decision
        assert "reject" in decision.lower()
    print(f"SFT version {version.version}: {gate['tags']['verdict']}\n{decision}")
