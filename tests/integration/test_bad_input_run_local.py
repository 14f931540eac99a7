"""Bad input to running things (issue 10, cases 2, 4, 9) through the real CLI, Ray and kfp.local.

2. `flywheel train` asking Ray for more than it has exits in seconds with the line naming
   the fields (it used to hang after "Started a local Ray instance", silently, forever);
   with Ray already up, the started cluster's own numbers are what is checked.
4. `flywheel monitor` with a bad window, or no champion, ends with the drift check's own
   error line, not "see <log>" alone; `flywheel run` likewise for a failing task.
9. None of these print Ray's, MLflow's or urllib3's INFO/WARNING lines.

Every case asserts the exit code, the one line, and that nothing was left behind. The
monitor cases fail early (the window is read first); they share one state dir, and one
window case and the no-champion case run the whole monitor pipeline (~10 s each).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from fixtures_cli import flywheel, nonblank
from fixtures_data import build_dataset

from flywheel.config import RayConfig, load_profile
from flywheel.errors import ConfigError

pytestmark = pytest.mark.integration

# The tiny model that fits the fixture dataset (block_size 32).
SMALL = ["data.block_size=32", "model.context=32", "model.n_embd=32", "train.micro_batch_size=2"]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under root, files with size and mtime: what "nothing left
    behind" compares."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else ()
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory with a tiny prepared dataset and an (empty) registry, made once."""
    root = tmp_path_factory.mktemp("bad_input_run")
    build_dataset(root / "ds", block_size=32, vocab_size=512, max_docs=200)
    made = flywheel(root, "models", "list")  # creates the state dir and the MLflow store
    assert made.returncode == 0, made.stderr
    return root


# ------------------------------------------------------------------ case 2: resources


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ["train.scaling.num_workers=4"],
            "error: train.scaling.num_workers=4 x cpus_per_worker=1 needs 4 CPUs; "
            "the Ray cluster has 2 (ray.num_cpus)",
        ),
        (
            ["train.scaling.use_gpu=true", "train.scaling.num_workers=1"],
            "error: train.scaling.use_gpu=true with num_workers=1 x gpus_per_worker=1 needs "
            "1 GPU; the Ray cluster has 0 (no GPU visible here)",
        ),
    ],
    ids=["workers", "no-gpu-here"],
)
def test_train_beyond_the_ray_cluster_exits_fast_with_the_fields(workdir, overrides, line):
    from flywheel.runtime import local_gpus

    if "GPU" in line and local_gpus():
        pytest.skip("this machine has a GPU")
    before = _tree(workdir)
    t0 = time.monotonic()
    out = flywheel(workdir, "train", "--data", "ds", "ray.num_cpus=2", *SMALL, *overrides)
    seconds = time.monotonic() - t0
    assert out.returncode == 2, out.stderr
    assert nonblank(out.stderr) == [line]
    assert seconds < 60, f"took {seconds:.0f}s"
    assert _tree(workdir) == before  # no model dir, no MLflow run, no Ray run directory


def test_a_started_ray_is_measured_not_predicted(workdir, monkeypatch):
    """With Ray up (1 CPU, started here) while the profile says 2, stages check what the
    workers would really get: the started cluster's numbers, before anything is created."""
    import ray

    from flywheel.runtime import cluster_resources, ray_session
    from flywheel.train import train
    from flywheel.train.plan import train_resources
    from flywheel.tune import tune

    monkeypatch.chdir(workdir)
    profile = load_profile(None, ["ray.num_cpus=2", *SMALL, "tune.parallel=2"])
    before = _tree(workdir)
    with ray_session(RayConfig(mode="local", num_cpus=1)):
        have = cluster_resources(profile.ray)  # ray.cluster_resources / ray.nodes, real
        assert (have.cpus, have.node_cpus) == (1, 1)
        with pytest.raises(
            ConfigError, match=r"x cpus_per_worker=1 needs 2 CPUs; the Ray cluster has 1"
        ):
            train(profile, workdir / "ds", workdir / "model")
        with pytest.raises(
            ConfigError, match=r"tune.parallel=2 trials .* needs 2 CPUs; the Ray cluster has 1"
        ):
            tune(profile, workdir / "ds", workdir / "tuned")
        # The check after start (wait_for_resources): a local Ray never grows, no wait.
        t0 = time.monotonic()
        with (
            pytest.raises(ConfigError, match="needs 2 CPUs; the Ray cluster has 1"),
            ray_session(profile.ray, [train_resources(profile)]),
        ):
            pytest.fail("the block must not run")
        assert time.monotonic() - t0 < 10
        assert ray.is_initialized()  # the inner session did not start it, so left it up
    assert _tree(workdir) == before  # no study, no MLflow run, no model, no Ray run dir


# ------------------------------------------------------- case 4: the task's own error


def _garbage_parquet(path: Path) -> None:
    path.write_bytes(b"PAR1 this is not parquet at all PAR1")


def _records(path: Path, rows: list[dict]) -> None:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


BAD_WINDOWS = {
    "empty": (lambda p: p.write_text(""), "window.jsonl", "is empty: no records"),
    "column-less": (
        lambda p: _records(p, [{"body": f"text {i}"} for i in range(80)]),
        "window.jsonl",
        "80 of 80 records have no text in field 'text'",
    ),
    "garbage": (
        lambda p: p.write_bytes(b"\x00\xff\xfe binary junk\n{not json"),
        "window.jsonl",
        "window.jsonl:2: not valid JSON",  # line 1 is undecodable: a reject, not the error
    ),
    "too-small": (
        lambda p: _records(p, [{"text": f"a document about topic {i}"} for i in range(5)]),
        "window.jsonl",
        "5 records, fewer than drift.min_rows=50",
    ),
    "bad-parquet": (_garbage_parquet, "window.parquet", "not a readable parquet file"),
    "empty-dir": (lambda p: p.mkdir(), "window", "no .jsonl/.json/.parquet files"),
}


def _monitor_fails_with(workdir: Path, window: Path, reason: str) -> str:
    out = flywheel(workdir, "monitor", "--window", str(window))
    assert out.returncode == 1, out.stdout + out.stderr
    lines = nonblank(out.stderr)
    assert len(lines) == 1, out.stderr
    line = lines[0]
    assert line.startswith("error: pipeline monitor failed in task 'drift-check': DataError: ")
    assert reason in line
    log = Path(line.rsplit("; see ", 1)[1])
    assert log.is_file() and reason in log.read_text()
    return line


# The pipeline's drift-check step raises the window's own error (the stage the component
# calls, in this process); one case goes through `flywheel monitor` and the whole pipeline,
# which turns that error into its one line. Each whole-pipeline run costs ~10 s.
THROUGH_THE_PIPELINE = "garbage"


@pytest.mark.parametrize("case", list(BAD_WINDOWS))
def test_monitor_says_why_a_window_is_bad(workdir, tmp_path, case):
    from flywheel.errors import DataError
    from flywheel.registry import Registry
    from flywheel.stages import drift_check

    make, name, reason = BAD_WINDOWS[case]
    window = tmp_path / name
    make(window)
    content = _tree(tmp_path / name) if window.is_dir() else window.read_bytes()
    profile = load_profile(None, [f"state_dir={workdir / '.flywheel'}"])
    if case == THROUGH_THE_PIPELINE:
        _monitor_fails_with(workdir, window, reason)
    else:
        with pytest.raises(DataError, match=re.escape(reason)):
            drift_check(profile.to_param(), str(window), tmp_path / "out", "bad-window-run")
    # the window is read, never touched
    assert (_tree(window) if window.is_dir() else window.read_bytes()) == content
    # And it is the window's reason although the registry has no champion either.
    assert Registry(profile).champion() is None


def test_monitor_without_a_champion_says_so(workdir, tmp_path):
    window = tmp_path / "good.jsonl"
    _records(window, [{"text": f"production document number {i} about Python"} for i in range(80)])
    line = _monitor_fails_with(
        workdir, window, "no champion of flywheel-lm in the registry at sqlite:"
    )
    assert str(workdir / ".flywheel") in line  # the store it looked in


def test_a_failing_retrain_task_ends_with_its_own_error(workdir, tmp_path):
    """Through `flywheel run`: the exit handler (summary) runs after the failure; the line
    still names the task that failed and its error."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("too short")
    out = flywheel(
        workdir, "run", "data.source.kind=files", f"data.source.path={corpus}", "tune.enabled=false"
    )
    assert out.returncode == 1, out.stdout + out.stderr
    lines = nonblank(out.stderr)
    assert len(lines) == 1, out.stderr
    import re

    assert re.fullmatch(
        r"error: pipeline retrain failed in task 'prepare-data': \w+: .+; see \S+\.log", lines[0]
    ), lines[0]
    assert [p.name for p in corpus.iterdir()] == ["a.txt"]  # the corpus is untouched
