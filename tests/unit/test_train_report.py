"""Result, loss curve, checkpoint lookup, tracking resolution: the pure parts around a run."""

from __future__ import annotations

import json
import math

import pytest

from flywheel import tracking
from flywheel.config import load_profile
from flywheel.errors import ConfigError
from flywheel.train.loop import _maybe_inject_fault
from flywheel.train.report import TrainResult, loop_throughput, loss_curve_html
from flywheel.train.run import find_checkpoint, flat_params


def _history(n: int, restart_at: int | None = None) -> list[dict]:
    rows = []
    for s in range(1, n + 1):
        attempt = 1 if restart_at and s >= restart_at else 0
        rows.append(
            {"step": s, "loss": 6.0 - 0.1 * s, "step_s": 2.0 if s == 1 else 0.5, "attempt": attempt}
        )
    return rows


def test_loop_throughput_leaves_out_the_first_step_of_each_attempt():
    tps, loop_s = loop_throughput(_history(5), tokens_per_step=100)
    assert loop_s == pytest.approx(4.0)
    assert tps == pytest.approx(100 / 0.5)
    # After a restart the first step again pays for start-up; it is left out too.
    hist = _history(6, restart_at=4)
    hist[3]["step_s"] = 9.0
    tps, _ = loop_throughput(hist, tokens_per_step=100)
    assert tps == pytest.approx(200.0)


def test_loss_curve_is_self_contained_and_marks_restarts():
    page = loss_curve_html(_history(30, restart_at=11), "training loss", "sub <b>")
    assert page.startswith("<!doctype html>")
    assert "<script" not in page and "https://" not in page and "http://cdn" not in page
    assert page.count('<g id="loss">') == 1  # the loss line, drawn once
    assert "restart (attempt 1)" in page
    assert "sub &lt;b&gt;" in page
    assert len(page) < 20_000


def test_loss_curve_survives_nan_and_a_single_point():
    page = loss_curve_html([{"step": 1, "loss": math.nan}, {"step": 2, "loss": 3.0}], "t")
    assert '<g id="loss">' in page and "nan" not in page.lower().replace("nan-", "")


def test_train_result_metrics_and_rows():
    r = TrainResult(
        model_dir="/m",
        loss_curve_html="/m/loss_curve.html",
        final_loss=4.0,
        first_loss=6.0,
        steps=10,
        tokens=2560,
        wall_s=12.5,
        tokens_per_s=1000.0,
        mlflow_run_id=None,
    )
    m = r.metrics()
    assert m["final_loss"] == 4.0 and m["steps"] == 10.0 and m["tokens"] == 2560.0
    assert all(isinstance(v, float) for v in m.values())
    rows = dict(r.rows())
    assert rows["loss (first -> final)"] == "6.000 -> 4.000"
    assert rows["mlflow run"] == "-"


def test_find_checkpoint_picks_the_latest_step(tmp_path):
    for name, step in [("checkpoint_a", 20), ("checkpoint_b", 60), ("checkpoint_c", 40)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.json").write_text(json.dumps({"step": step}))
    (tmp_path / "checkpoint_partial").mkdir()  # no state.json: an interrupted upload
    path, step = find_checkpoint(tmp_path)
    assert (path.name, step) == ("checkpoint_b", 60)
    assert find_checkpoint(tmp_path / "checkpoint_c") == (tmp_path / "checkpoint_c", 40)
    with pytest.raises(ConfigError, match="is not a directory"):
        find_checkpoint(tmp_path / "missing")


def test_fault_injection_fires_once_per_marker(tmp_path):
    marker = tmp_path / "marker"
    marker.write_text("already fired")
    # The marker exists, so the matching step and rank do not kill this process.
    _maybe_inject_fault({"step": 3, "rank": 0, "marker": str(marker)}, 3, 0)
    # Other steps or ranks never look at the marker.
    _maybe_inject_fault({"step": 3, "rank": 1, "marker": str(tmp_path / "m2")}, 3, 0)
    _maybe_inject_fault({"step": 3, "rank": 0, "marker": str(tmp_path / "m2")}, 2, 0)
    _maybe_inject_fault(None, 3, 0)
    assert not (tmp_path / "m2").exists()


def test_flat_params_cover_model_and_train(state_dir, tmp_path):
    from fixtures_data import build_dataset

    from flywheel.train.plan import make_plan

    ds = build_dataset(tmp_path / "ds", block_size=32, vocab_size=300, max_docs=80)
    p = load_profile(None, ["data.block_size=32", "model.context=32"])
    params = flat_params(p, make_plan(p, ds))
    assert params["model.n_embd"] == "64"
    assert params["train.scaling.num_workers"] == "2"
    assert params["plan.global_batch"] == "16"
    assert len(params) < 100 and all(isinstance(v, str) for v in params.values())


# ---------------------------------------------------------------------- tracking


def test_tracking_uri_order(state_dir, monkeypatch):
    p = load_profile(None, [])
    uri = tracking.tracking_uri(p)
    assert uri.startswith("sqlite:///") and uri.endswith(".flywheel/mlflow/mlflow.db")
    assert tracking.artifact_location(p).startswith("file://")
    assert tracking.artifact_location(p).endswith(".flywheel/mlflow/artifacts")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri(p) == "http://127.0.0.1:5999"
    assert tracking.artifact_location(p) is None  # the server owns its artifact store
    p2 = load_profile(None, ["registry.tracking_uri=sqlite:////tmp/x.db"])
    assert tracking.tracking_uri(p2) == "sqlite:////tmp/x.db"
