"""Bad input to running things (issue 10, cases 2, 4, 9), the fast tier.

2. A stage that asks Ray for more than it has fails before any worker starts, naming the
   fields (`check_resources`, pure, case by case; the wait for an autoscaling cluster).
4. A failed pipeline says why in one line: the failing task's own exception, taken from
   kfp.local's log (`exception_line`, `_TaskStream`); a missing window is a usage error.
9. A failing command prints Flywheel's line, not the libraries' INFO/WARNING lines.
"""

from __future__ import annotations

import logging
import re
import socket

import pytest
from fixtures_cli import flywheel, nonblank

from flywheel.config import RayConfig, load_profile
from flywheel.errors import ConfigError, FlywheelError
from flywheel.kfp.local import _TaskStream, exception_line, task_chain, task_name
from flywheel.runtime import (
    RayResources,
    check_before_start,
    expected_resources,
    local_gpus,
    ray_logging_level,
    wait_for_resources,
)
from flywheel.train.plan import ResourceAsk, check_resources, train_resources, tune_resources

# ------------------------------------------------------------------ case 2: resources


def _ray(cpus=2.0, gpus=0.0, node_cpus=None, node_gpus=None, **kw) -> RayResources:
    return RayResources(
        cpus=cpus,
        gpus=gpus,
        node_cpus=cpus if node_cpus is None else node_cpus,
        node_gpus=gpus if node_gpus is None else node_gpus,
        **kw,
    )


def _profile(*overrides: str):
    return load_profile(None, list(overrides))


def test_the_default_profile_fits_a_two_cpu_ray():
    p = _profile()
    assert check_resources(train_resources(p), _ray(2)) == []
    assert check_resources(tune_resources(p), _ray(2)) == []


def test_more_workers_than_cpus_names_the_fields_and_the_numbers():
    ask = train_resources(_profile("train.scaling.num_workers=4"))
    problems = check_resources(ask, _ray(2, cpu_note="ray.num_cpus"))
    assert problems == [
        "train.scaling.num_workers=4 x cpus_per_worker=1 needs 4 CPUs; "
        "the Ray cluster has 2 (ray.num_cpus)"
    ]


def test_cpus_per_worker_multiplies():
    ask = train_resources(_profile("train.scaling.cpus_per_worker=1.5"))
    assert ask.cpus == 3.0
    [problem] = check_resources(ask, _ray(2))
    assert problem.startswith("train.scaling.num_workers=2 x cpus_per_worker=1.5 needs 3 CPUs;")
    assert check_resources(ask, _ray(3)) == []


def test_use_gpu_without_a_gpu():
    ask = train_resources(_profile("train.scaling.use_gpu=true"))
    problems = check_resources(ask, _ray(8, 0, gpu_note="no GPU visible here"))
    assert problems == [
        "train.scaling.use_gpu=true with num_workers=2 x gpus_per_worker=1 needs 2 GPUs; "
        "the Ray cluster has 0 (no GPU visible here)"
    ]
    assert check_resources(ask, _ray(8, 2)) == []


def test_gpus_per_worker_counts_only_with_use_gpu():
    ask = train_resources(_profile("train.scaling.gpus_per_worker=4"))
    assert ask.gpus == 0
    assert check_resources(ask, _ray(2, 0)) == []


def test_one_worker_larger_than_any_node():
    # 8 CPUs in all, but no node has the 3 one worker needs: Ray would wait forever.
    ask = train_resources(_profile("train.scaling.cpus_per_worker=3"))
    [problem] = check_resources(ask, _ray(8, node_cpus=2))
    assert "one worker needs 3 CPUs; the largest node of the Ray cluster has 2" in problem
    assert check_resources(ask, _ray(8, node_cpus=4)) == []


def test_tune_parallel_trials_times_one_worker_each():
    ask = tune_resources(_profile("tune.parallel=3"))
    assert (ask.count, ask.cpus) == (3, 3.0)
    [problem] = check_resources(ask, _ray(2, cpu_note="ray.num_cpus"))
    assert problem == (
        "tune.parallel=3 trials x train.scaling.cpus_per_worker=1 needs 3 CPUs; "
        "the Ray cluster has 2 (ray.num_cpus)"
    )
    # num_workers does not matter to tuning: each trial trains on one worker.
    assert check_resources(tune_resources(_profile("train.scaling.num_workers=8")), _ray(2)) == []


def test_cpu_and_gpu_problems_are_both_reported():
    ask = tune_resources(_profile("tune.parallel=3", "train.scaling.use_gpu=true"))
    problems = check_resources(ask, _ray(2, 1))
    assert len(problems) == 2
    assert "needs 3 CPUs" in problems[0] and "needs 3 GPUs" in problems[1]


def test_trainer_cpus_are_added_when_a_trainer_asks_for_some():
    ask = ResourceAsk(count=2, cpus_each=1, gpus_each=0, cpu_fields="x", cpus_extra=1)
    assert check_resources(ask, _ray(3)) == []
    assert check_resources(ask, _ray(2.5)) == ["x needs 3 CPUs; the Ray cluster has 2.5"]
    assert ask.bundles() == [{"CPU": 1}, {"CPU": 1}]


def test_a_local_ray_is_predicted_without_starting_it(monkeypatch):
    import os

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    got = expected_resources(RayConfig(mode="local", num_cpus=3))
    assert (got.cpus, got.gpus, got.cpu_note, got.can_grow) == (3, 0, "ray.num_cpus", False)
    unset = expected_resources(RayConfig(mode="local"))
    assert unset.cpus == os.cpu_count()
    assert "ray.num_cpus is unset" in unset.cpu_note
    assert expected_resources(RayConfig(mode="address", address="head:6379")) is None
    assert expected_resources(RayConfig(mode="kuberay")) is None
    import ray

    assert not ray.is_initialized()


@pytest.mark.parametrize(
    ("visible", "count"), [("", 0), ("-1", 0), ("0", 1), ("0,1", 2), ("GPU-a1b2,GPU-c3d4", 2)]
)
def test_local_gpus_follow_cuda_visible_devices(monkeypatch, visible, count):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert local_gpus() == count


def test_check_before_start_raises_a_config_error_and_skips_clusters():
    cfg = RayConfig(mode="local", num_cpus=2)
    ask = train_resources(_profile("train.scaling.num_workers=4"))
    with pytest.raises(ConfigError, match=r"needs 4 CPUs; the Ray cluster has 2 \(ray.num_cpus\)"):
        check_before_start(cfg, [ask])
    check_before_start(cfg, [train_resources(_profile())])
    # A cluster is measured once connected (wait_for_resources), not guessed.
    check_before_start(RayConfig(mode="address", address="head:6379"), [ask])


class _Clock:
    def __init__(self):
        self.t = 0.0
        self.sleeps = 0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s
        self.sleeps += 1


def _cluster(monkeypatch, sizes: list[float]):
    """cluster_resources answering with successive CPU totals (the last one repeats), and
    the autoscaler hints recorded."""
    import flywheel.runtime as rt

    seen = iter(sizes)
    last = [sizes[0]]

    def fake(cfg):
        last[0] = next(seen, last[0])
        return _ray(last[0], where=f"the Ray cluster at {cfg.address}", can_grow=True)

    hints: list[list[dict]] = []
    monkeypatch.setattr(rt, "cluster_resources", fake)
    monkeypatch.setattr(rt, "_request_resources", hints.append)
    return hints


def test_an_autoscaling_cluster_is_waited_for_visibly_and_asked_to_grow(monkeypatch, caplog):
    hints = _cluster(monkeypatch, [2, 2, 4])
    clock = _Clock()
    cfg = RayConfig(mode="address", address="head:6379", resource_wait_s=60)
    ask = train_resources(_profile("train.scaling.num_workers=4"))
    with caplog.at_level(logging.WARNING, logger="flywheel.runtime"):
        wait_for_resources(cfg, [ask], clock=clock, sleep=clock.sleep)
    assert clock.sleeps == 2
    assert hints == [[{"CPU": 1}] * 4, []]  # asked, then withdrawn
    [record] = caplog.records
    assert "needs 4 CPUs; the Ray cluster at head:6379 has 2" in record.getMessage()
    assert "waiting up to 60s (ray.resource_wait_s)" in record.getMessage()


def test_the_wait_is_bounded(monkeypatch):
    hints = _cluster(monkeypatch, [2])
    clock = _Clock()
    cfg = RayConfig(mode="address", address="head:6379", resource_wait_s=30)
    ask = train_resources(_profile("train.scaling.num_workers=4"))
    with pytest.raises(FlywheelError, match=r"needs 4 CPUs.*waited 30s, ray.resource_wait_s"):
        wait_for_resources(cfg, [ask], clock=clock, sleep=clock.sleep)
    assert 30 <= clock.t <= 40
    assert hints[-1] == []


def test_a_local_ray_or_no_wait_fails_at_once(monkeypatch):
    _cluster(monkeypatch, [2])
    clock = _Clock()
    ask = train_resources(_profile("train.scaling.num_workers=4"))
    for cfg in (
        RayConfig(mode="local", num_cpus=2),
        RayConfig(mode="address", address="head:6379", resource_wait_s=0),
    ):
        with pytest.raises(ConfigError, match="needs 4 CPUs"):
            wait_for_resources(cfg, [ask], clock=clock, sleep=clock.sleep)
    assert clock.sleeps == 0


def test_resource_wait_is_a_profile_field():
    with pytest.raises(ConfigError, match=r"ray\.resource_wait_s"):
        _profile("ray.resource_wait_s=-1")


# --------------------------------------------------------- case 4: the task's own error

_TB = [
    "Traceback (most recent call last):",
    '  File "<frozen runpy>", line 198, in _run_module_as_main',
    '  File "/work/main/flywheel/stages.py", line 359, in drift_check',
    '    reference, tokenizer_dir = monitor.champion_reference(p, out_dir / "reference")',
    "                               ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^",
    "flywheel.errors.DataError: no champion in the registry: nothing to compare production data with",
]


def test_exception_line_is_the_last_line_without_the_module_path():
    assert exception_line(_TB[1:]) == (
        "DataError: no champion in the registry: nothing to compare production data with"
    )


def test_a_multi_line_message_becomes_one_line():
    lines = [
        *_TB[1:5],
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for Profile",
        "train.lr",
        "  Input should be a valid number [type=float_parsing]",
    ]
    assert exception_line(lines) == (
        "ValidationError: 1 validation error for Profile train.lr "
        "Input should be a valid number [type=float_parsing]"
    )


def test_a_remote_traceback_inside_the_message_gives_its_own_last_line():
    lines = [
        *_TB[1:3],
        "ray.exceptions.RayTaskError(ValueError): ray::ReadUnits() (pid=12, ip=10.0.0.1)",
        '  File "/work/main/flywheel/data/blocks.py", line 40, in __call__',
        "    raise ValueError(msg)",
        "ValueError: Can only use .str accessor with string values!",
    ]
    assert exception_line(lines) == "ValueError: Can only use .str accessor with string values!"


def test_no_exception_no_line():
    assert exception_line([]) is None
    assert exception_line(['  File "x.py", line 1, in f', "    f()"]) is None
    assert exception_line(["KeyboardInterrupt"]) == "KeyboardInterrupt"
    assert exception_line(["x" * 2000]).endswith("...")


def test_task_name_from_kfp_chains():
    assert task_chain("'prepare-data' inside 'exit-handler-1'") == "'prepare-data'"
    assert (
        task_chain("'train' inside 'exit-handler-1' inside 'retrain'") == "'train' inside 'retrain'"
    )
    assert task_name("'drift-check'") == "drift-check"
    assert task_name("'train' inside 'retrain'") == "train"
    assert task_name(None) is None


def _kfp_log(*tasks: tuple[str, list[str], str], failed: str) -> str:
    """A kfp.local log in its own shape: task output indented by 4, status lines plain."""
    out = []
    for task, body, status in tasks:
        out.append(f"09:13:03.600 - INFO - Executing task \x1b[96m'{task}'\x1b[0m")
        out += [f"    {line}" for line in body]
        out.append(
            f"09:13:09.129 - ERROR - Task \x1b[96m'{task}'\x1b[0m finished with status {status}"
        )
    out.append(
        "09:13:09.130 - ERROR - Pipeline \x1b[95m'flywheel-retrain'\x1b[0m finished with status "
        f"\x1b[91mFAILURE\x1b[0m. Inner task failed: \x1b[96m{failed}\x1b[0m."
    )
    return "\n".join(out) + "\n"


def _stream(text: str) -> _TaskStream:
    import io

    stream = _TaskStream(io.StringIO(), None)
    for i in range(0, len(text), 97):  # arbitrary chunks, as print() writes them
        stream.write(text[i : i + 97])
    return stream


def test_the_failing_task_keeps_its_error_when_an_exit_handler_runs_after_it():
    summary_tb = [
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in f',
        "    g()",
        "RuntimeError: the summary's own trouble",
    ]
    chained = [
        "Traceback (most recent call last):",
        '  File "a.py", line 1, in f',
        "    open(p)",
        "FileNotFoundError: [Errno 2] No such file or directory: 'corpus'",
        "",
        "During handling of the above exception, another exception occurred:",
        "",
        *_TB,
    ]
    text = _kfp_log(
        ("plan", ["ok"], "SUCCESS"),
        ("prepare-data", ["INFO lots of lines", *chained], "FAILURE"),
        ("summary", summary_tb, "FAILURE"),
        failed="'prepare-data'",
    )
    stream = _stream(text)
    assert stream.pipeline_status == ("FAILURE", "'prepare-data'")
    assert stream.task_errors["prepare-data"].startswith("DataError: no champion")
    assert "plan" not in stream.task_errors


def test_a_nested_pipeline_failure_finds_the_inner_task():
    stream = _stream(
        _kfp_log(
            ("drift-check", ["fine"], "SUCCESS"),
            ("train", _TB, "FAILURE"),
            failed="'train' inside 'retrain'",
        )
    )
    assert stream.task_errors[task_name(stream.pipeline_status[1])].startswith("DataError:")


def test_pipeline_error_is_one_line_with_the_log_after_it(tmp_path):
    from flywheel.cli.pipeline import pipeline_error

    log = tmp_path / "monitor.log"
    err = pipeline_error("monitor", "'drift-check'", "DataError: window w.jsonl is empty", log)
    assert str(err) == (
        f"pipeline monitor failed in task 'drift-check': DataError: window w.jsonl is empty; "
        f"see {log}"
    )
    assert err.exit_code == 1
    assert pipeline_error("retrain", "'plan'", "ConfigError: tune.x: bad", log).exit_code == 2
    assert str(pipeline_error("retrain", None, None, log)) == f"pipeline retrain failed; see {log}"


def test_the_window_is_checked_before_the_pipeline(tmp_path):
    from flywheel.cli.pipeline import check_window

    p = _profile()
    with pytest.raises(ConfigError, match=r"--window .*nope.jsonl: no such file or directory"):
        check_window(p, str(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match="no production window"):
        check_window(p, "")
    with pytest.raises(ConfigError, match=r"^drift.window .*gone: no such file"):
        check_window(_profile(f"drift.window={tmp_path / 'gone'}"), "")
    (tmp_path / "w.jsonl").write_text("")
    assert check_window(p, str(tmp_path / "w.jsonl")) == str(tmp_path / "w.jsonl")
    assert check_window(p, "s3://bucket/window/") == "s3://bucket/window/"  # the task reads it


def test_the_window_is_read_before_the_champion_is_looked_up(tmp_path, monkeypatch):
    """stages.drift_check: a bad window is reported even when the registry is empty too."""
    from flywheel import monitor, stages
    from flywheel.errors import DataError

    looked_up = []
    monkeypatch.setattr(monitor, "champion_reference", lambda *a: looked_up.append(a))
    (tmp_path / "w.jsonl").write_text('{"text": "one"}\n')
    p = _profile(f"state_dir={tmp_path / 'state'}")
    with pytest.raises(DataError, match=r"fewer than drift\.min_rows"):
        stages.drift_check(p.model_dump(), str(tmp_path / "w.jsonl"), tmp_path / "out", "run-1")
    assert looked_up == []


# ------------------------------------------------------------- CLI, in a subprocess


def test_run_refuses_more_workers_than_cpus_before_the_pipeline(tmp_path):
    out = flywheel(tmp_path, "run", "ray.num_cpus=2", "train.scaling.num_workers=4")
    assert out.returncode == 2, out.stderr
    assert nonblank(out.stderr) == [
        "error: train.scaling.num_workers=4 x cpus_per_worker=1 needs 4 CPUs; "
        "the Ray cluster has 2 (ray.num_cpus)"
    ]
    assert list(tmp_path.iterdir()) == []  # no state dir, no pipeline run, no log


def test_run_refuses_tune_parallel_beyond_the_cpus(tmp_path):
    out = flywheel(tmp_path, "run", "ray.num_cpus=2", "tune.parallel=3")
    assert out.returncode == 2
    assert "tune.parallel=3 trials x train.scaling.cpus_per_worker=1 needs 3 CPUs" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_monitor_with_a_missing_window_is_a_usage_error(tmp_path):
    out = flywheel(tmp_path, "monitor", "--window", "no-such-window.jsonl")
    assert out.returncode == 2
    assert nonblank(out.stderr) == [
        "error: --window no-such-window.jsonl: no such file or directory"
    ]
    assert list(tmp_path.iterdir()) == []


# Lines a library prints on its own: level words in Ray's, MLflow's and our handler's formats.
LIBRARY_NOISE = re.compile(
    r"\b(INFO|WARNING)\b.*\b(ray|mlflow|alembic|urllib3|authentication_token|worker\.py)\b"
    r"|^\S+ \S+\s+(INFO|WARNING) \S+\.py:\d+ --"
)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_errors_come_without_urllib3_retry_warnings(tmp_path):
    host = f"http://127.0.0.1:{_closed_port()}"
    out = flywheel(tmp_path, "schedule", "list", "--host", host)
    assert out.returncode == 1
    lines = nonblank(out.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and host in lines[0], out.stderr
    assert "urllib3" not in out.stderr
    # --verbose shows what was hidden: the traceback (the health check that comes first
    # makes one try, with a timeout, so there is no retry for urllib3 to warn about).
    verbose = flywheel(tmp_path, "--verbose", "schedule", "list", "--host", host)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr, verbose.stderr


def test_first_use_of_mlflow_prints_no_info_lines(tmp_path):
    out = flywheel(tmp_path, "models", "list")
    assert out.returncode == 0, out.stderr
    noise = [line for line in nonblank(out.stderr) if LIBRARY_NOISE.search(line)]
    assert noise == [], out.stderr
    assert (tmp_path / ".flywheel").is_dir()  # it did create the store: the INFO was due


def test_ray_logs_follow_the_verbosity_this_process_chose():
    root = logging.getLogger()
    before = root.level
    try:
        root.setLevel(logging.WARNING)
        assert ray_logging_level() == logging.ERROR
        root.setLevel(logging.DEBUG)  # --verbose
        assert ray_logging_level() == logging.INFO
        root.setLevel(logging.INFO)  # a KFP task's executor
        assert ray_logging_level() == logging.INFO
    finally:
        root.setLevel(before)
