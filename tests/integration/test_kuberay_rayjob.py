"""`ray.mode: kuberay` end to end: the real `kubernetes` client against the Kubernetes
stand-in (tests/k8s_standin.py), whose operator part submits the RayJob's entrypoint to a
REAL `ray start --head` on 127.0.0.1 (the address-mode tests' fixture) over the Ray Jobs
API, as KubeRay does in HTTPMode. The train stage runs there on a tiny model; the step
streams the driver's log, collects the model from storage, and deletes the RayJob.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from fixtures_data import TINY_MODEL, build_dataset, tiny_steps
from k8s_standin import StandIn, crds_present
from test_ray_address import cluster  # noqa: F401  (the real head, reused)

from flywheel.config import load_profile
from flywheel.errors import FlywheelError
from flywheel.runtime import kuberay, kuberay_manifest
from flywheel.runtime.kuberay_entry import train

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not crds_present(), reason="../shared/contracts/kuberay-crds/ is absent"),
]

TINY = [
    *TINY_MODEL,
    *tiny_steps(6, checkpoint_every=6, log_every=2),
]
TINY_DATA = ["data.source.max_docs=200", "data.tokenizer.vocab_size=300"]
RUN_ID = "6f1c2b9e-0d4a-4f7e-9a51-3c8e2d7b1a04"


@pytest.fixture(scope="module")
def head(request, tmp_path_factory):
    """The real head, started with this interpreter's bin first on PATH: the RayJob's
    entrypoint says `python`, which in the image is the one with flywheel installed."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    mp.setenv("RAY_AUTH_MODE", "token")  # the head uses token auth; so do we, explicitly
    mp.delenv("RAY_ADDRESS", raising=False)
    try:
        yield request.getfixturevalue("cluster")
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kuberay")
    build_dataset(root / "dataset", block_size=32, vocab_size=512)
    return root


@pytest.fixture
def standin(head, work, monkeypatch):
    with StandIn(dashboard=head.dashboard, behaviour="run") as s:
        monkeypatch.setenv("KUBECONFIG", str(s.kubeconfig(work / "kubeconfig")))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield s


def _profile(work: Path, *extra: str):
    return load_profile(
        None,
        [
            *TINY,
            f"state_dir={work / '.flywheel'}",
            "ray.mode=kuberay",
            "ray.kuberay.poll_s=0.5",
            f"storage.root=file://{work / 'store'}",
            *extra,
        ],
    )


def test_train_runs_in_a_rayjob_and_the_step_gets_the_model(standin, work, capsys):
    profile = _profile(work)
    result = train(profile.to_param(), work / "dataset", {}, work / "model", "test", RUN_ID)

    # The model came back through storage into the step's own output directory.
    assert result.model_dir == str(work / "model")
    assert (work / "model" / "config.json").is_file()
    assert Path(result.loss_curve_html).is_file() and result.steps == 6
    assert result.final_loss < result.first_loss + 0.5
    # The driver's log was streamed into the step's log.
    out = capsys.readouterr().out
    assert f"flywheel: stage train of run {RUN_ID} in this RayJob" in out
    assert "flywheel: stage train done" in out
    # Only URIs crossed: the spec names the store, never the step's dataset path.
    handoff = work / "store" / kuberay_manifest.HANDOFF_DIR / RUN_ID / "train"
    spec = (handoff / "spec.json").read_text()
    assert str(work / "dataset") not in spec and str(work / "store") in spec
    # The payload copies are gone once the step holds its model; the small records stay.
    assert sorted(p.name for p in handoff.rglob("*") if p.is_file()) == ["result.json", "spec.json"]
    # Cleaned up on success: no RayJob, no RayCluster left.
    assert standin.names("rayjobs") == [] and standin.names("rayclusters") == []
    name = kuberay.job_name(RUN_ID, "train")
    assert ("DELETE", f"/apis/ray.io/v1/namespaces/default/rayjobs/{name}") in standin.requests


def test_a_failing_stage_fails_the_step_with_the_ray_error_and_cleans_up(standin, work):
    profile = _profile(work)
    bad = work / "not-a-dataset"
    bad.mkdir(exist_ok=True)
    (bad / "README").write_text("no manifest here")
    with pytest.raises(FlywheelError) as info:
        train(profile.to_param(), bad, {}, work / "model-bad", "test", "run-that-fails")
    line = str(info.value)
    assert "\n" not in line
    name = kuberay.job_name("run-that-fails", "train")
    assert line.startswith(f"RayJob {name} Failed, job FAILED (AppFailed): "), line
    assert "manifest" in line, line  # the stage's own error, from the driver's log
    assert standin.names("rayjobs") == [] and standin.names("rayclusters") == []


def test_prepare_data_runs_in_a_rayjob_and_the_step_gets_the_dataset(standin, work):
    from flywheel.artifacts import read_manifest
    from flywheel.runtime.kuberay_entry import prepare

    profile = _profile(work, *TINY_DATA)
    stats = prepare(profile.to_param(), "", work / "prepared", RUN_ID)
    assert stats.out_dir == str(work / "prepared")  # the job's path, made the step's
    assert read_manifest(work / "prepared")["content_hash"] == stats.content_hash
    assert stats.docs_kept > 0 and stats.sequences["train"] > 0
    assert standin.names("rayjobs") == [] and standin.names("rayclusters") == []
