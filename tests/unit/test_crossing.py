"""Address mode made multi-node safe (flywheel.runtime.crossing): what the driver hands Ray
Train's workers names no path of the driver's disk where the workers may be elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures_data import build_dataset

from flywheel.config import load_profile
from flywheel.errors import ConfigError
from flywheel.runtime import crossing
from flywheel.train.plan import ModelSource, make_plan
from flywheel.train.run import loop_config

TINY = ["data.block_size=32", "model.context=32", "model.n_embd=32", "model.n_head=2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("cross") / "dataset", max_docs=60)


def _profile(tmp_path: Path, *extra: str):
    return load_profile(None, [*TINY, f"state_dir={tmp_path / '.flywheel'}", *extra])


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def _local_dirs(tmp_path: Path, dataset: Path) -> tuple[Path, Path]:
    model = tmp_path / "champion"
    model.mkdir()
    (model / "config.json").write_text('{"weights": "stand-in"}')
    resume = tmp_path / "run" / "checkpoint_000001"
    (resume / "sub").mkdir(parents=True)
    (resume / "state.json").write_text('{"step": 1}')
    (resume / "sub" / "shard.bin").write_bytes(b"\x00\x01")
    return model, resume


def test_a_remote_cluster_with_a_uri_root_gets_uris_only(tmp_path, dataset):
    root = tmp_path / "shared"
    profile = _profile(
        tmp_path, "ray.mode=address", "ray.address=10.0.0.5:6379", f"storage.root=file://{root}"
    )
    model, resume = _local_dirs(tmp_path, dataset)
    plan = make_plan(profile, dataset).model_copy(
        update={"model_source": ModelSource(kind="init_from", path=str(model))}
    )
    config = loop_config(profile, plan, resume_from=resume)

    # No path of the driver's disk (dataset, model, checkpoint) reaches a worker's config,
    # except the dataset directory, which only the driver reads (`plan.dataset.path`).
    driver_paths = [str(dataset), str(model), str(resume)]
    crossing_values = [s for s in _strings(config) if s != config["plan"]["dataset"]["path"]]
    leaked = [s for s in crossing_values if any(p in s for p in driver_paths)]
    assert leaked == []
    assert config["plan"]["model_source"]["path"].startswith(f"file://{root}/handoff/model-")
    assert config["resume_from"].startswith(f"file://{root}/handoff/resume-")
    files = config["plan"]["dataset"]["train_files"]
    assert files and all(f.startswith(f"file://{root}/handoff/data-") for f in files)
    # What the URIs name is the driver's content.
    for local, uri in zip(plan.dataset.train_files, files, strict=True):
        assert Path(uri.removeprefix("file://")).read_bytes() == Path(local).read_bytes()

    # Worker side: the model is read from the shared mount (an object store's would be
    # staged into the worker's directory), the checkpoint opened from the URI, nested shard too.
    source = crossing.local_model_source(
        ModelSource.model_validate(config["plan"]["model_source"]), None, tmp_path / "worker"
    )
    assert Path(source.path).is_relative_to(root / "handoff")
    assert json.loads((Path(source.path) / "config.json").read_text()) == {"weights": "stand-in"}
    ckpt = crossing.resume_checkpoint(config["resume_from"], None)
    with ckpt.as_directory() as d:
        assert (Path(d) / "sub" / "shard.bin").read_bytes() == b"\x00\x01"


def test_an_upload_is_reused_until_the_directory_changes(tmp_path):
    base = crossing.storage.parse(f"file://{tmp_path / 'store'}", "storage.root")
    local = tmp_path / "model"
    local.mkdir()
    (local / "a.txt").write_text("one")
    first = crossing.upload_once(local, base, "model", None)
    assert crossing.upload_once(local, base, "model", None) == first
    (local / "a.txt").write_text("two!")
    second = crossing.upload_once(local, base, "model", None)
    assert second != first
    assert Path(second.removeprefix("file://"), "a.txt").read_text() == "two!"
    assert (Path(second.removeprefix("file://")) / crossing.DONE_MARK).is_file()


@pytest.mark.parametrize("root", [None, "rel/store", "/abs/store"])
def test_a_remote_cluster_with_a_path_root_is_refused_naming_storage_root(tmp_path, root):
    extra = [f"storage.root={root}"] if root else []
    profile = _profile(tmp_path, "ray.mode=address", "ray.address=ray-head.svc:6379", *extra)
    with pytest.raises(ConfigError) as info:
        crossing.handoff_root(profile)
    line = str(info.value)
    assert line.startswith("storage.root: ") and "ray-head.svc:6379" in line and "\n" not in line
    assert ("unset" in line) if root is None else (repr(root) in line)


@pytest.mark.parametrize(
    "extra",
    [
        ["ray.mode=local"],
        ["ray.mode=address", "ray.address=127.0.0.1:6379"],
        ["ray.mode=address", "ray.address=localhost:6379", "storage.root=/abs/store"],
    ],
)
def test_paths_pass_as_they_are_where_the_workers_share_this_disk(tmp_path, dataset, extra):
    profile = _profile(tmp_path, *extra)
    assert crossing.handoff_root(profile) is None
    plan = make_plan(profile, dataset)
    config = loop_config(profile, plan, resume_from=tmp_path)
    assert config["plan"]["dataset"]["train_files"] == plan.dataset.train_files
    assert config["resume_from"] == str(tmp_path)


def test_the_train_stage_refuses_before_ray_starts(tmp_path, dataset):
    """The rule is checked at plan time: no Ray, no MLflow run, one line naming the field."""
    from flywheel.train.run import train

    profile = _profile(tmp_path, "ray.mode=address", "ray.address=10.1.2.3:6379")
    with pytest.raises(ConfigError, match=r"^storage\.root: Ray runs on other machines"):
        train(profile, dataset, tmp_path / "model")
    assert not (tmp_path / ".flywheel" / "mlruns").exists()


def test_auto_is_a_cluster_of_unknown_shape_and_needs_a_uri_root(tmp_path):
    """ray.address=auto (a Ray Job's driver) may have workers on any node of its cluster."""
    profile = _profile(tmp_path, "ray.mode=address", "ray.address=auto")
    with pytest.raises(ConfigError, match=r"^storage\.root: .*\(ray\.address 'auto'\)"):
        crossing.handoff_root(profile)
    ok = _profile(tmp_path, "ray.mode=address", "ray.address=auto", "storage.root=s3://bkt/p")
    assert crossing.handoff_root(ok).display() == "s3://bkt/p/handoff"


# ------------------------------------------------------------------------ retention

HOUR = 3600.0


def test_expired_uploads_are_those_unused_past_the_retention():
    last = {"model-a": 1000.0, "data-b": 1000.0 + HOUR, "resume-c": 1000.0 + 2 * HOUR}
    now = 1000.0 + 2 * HOUR
    assert crossing.expired_uploads(last, now, HOUR) == ["model-a"]
    assert crossing.expired_uploads(last, now, 2 * HOUR) == []  # exactly the retention: kept
    assert crossing.expired_uploads(last, now, 0.5) == ["data-b", "model-a"]
    assert crossing.expired_uploads({}, now, HOUR) == []


def _age(entry: Path, seconds: float) -> None:
    """Set every file of an upload `seconds` into the past."""
    import os
    import time

    then = time.time() - seconds
    for f in entry.rglob("*"):
        if f.is_file():
            os.utime(f, (then, then))


def test_the_exit_handler_prunes_unused_uploads_and_nothing_else(tmp_path):
    store = tmp_path / "store"
    profile = _profile(
        tmp_path,
        "ray.mode=address",
        "ray.address=10.0.0.5:6379",
        f"storage.root=file://{store}",
        "storage.handoff_retention_hours=24",
    )
    base = crossing.storage.parse(f"file://{store}", "storage.root").child(crossing.HANDOFF_DIR)
    dirs = {}
    for kind, text in (("model", "old"), ("data", "reused"), ("resume", "recent")):
        local = tmp_path / kind
        local.mkdir()
        (local / "f.txt").write_text(text)
        dirs[kind] = Path(crossing.upload_once(local, base, kind, None).removeprefix("file://"))
    handoff = store / crossing.HANDOFF_DIR
    cut_short = handoff / "model-0123456789abcdef"  # an upload cut short: no mark
    cut_short.mkdir()
    (cut_short / "config.json").write_text("{}")
    not_ours = [handoff / "notes", handoff / "data-not-a-key"]
    for d in not_ours:
        d.mkdir()
        (d / "keep.txt").write_text("a user's file")
    for d in [dirs["model"], dirs["data"], cut_short, *not_ours]:
        _age(d, 48 * HOUR)
    # Used again by a later run: the mark is rewritten, so it is not idle.
    crossing.upload_once(tmp_path / "data", base, "data", None)
    _age(dirs["resume"], 2 * HOUR)

    from flywheel.runtime import kuberay

    with kuberay.cleanup_after(profile, "run-1"):
        pass

    assert not dirs["model"].exists() and not cut_short.exists()
    assert dirs["data"].is_dir() and dirs["resume"].is_dir()
    assert all((d / "keep.txt").read_text() == "a user's file" for d in not_ours)
    # Where Ray runs on this machine nothing is handed off, and nothing is listed.
    local = _profile(tmp_path, f"storage.root=file://{store}", "storage.handoff_retention_hours=1")
    assert kuberay.prune_handoff(local) == []
    assert dirs["data"].is_dir()


def test_an_unreachable_store_is_a_warning_in_the_exit_handler(tmp_path, caplog):
    from flywheel.runtime import kuberay

    profile = _profile(
        tmp_path,
        "ray.mode=address",
        "ray.address=10.0.0.5:6379",
        "storage.root=s3://no-bucket/x",
        "storage.endpoint_url=http://127.0.0.1:9",  # nothing listens on the discard port
    )
    with kuberay.cleanup_after(profile, "run-1"):
        pass
    assert "hand-off uploads not pruned: storage.root" in caplog.text


def test_a_retention_shorter_than_a_rayjobs_deadline_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"storage.handoff_retention_hours \(2 h\) is shorter"):
        _profile(
            tmp_path,
            "ray.mode=kuberay",
            "ray.kuberay.active_deadline_seconds=86400",
            "storage.handoff_retention_hours=2",
        )


def test_a_mark_left_alone_by_a_pruned_upload_is_not_trusted(tmp_path):
    """A run reusing an upload as another run's exit handler prunes it can leave the mark
    alone in the directory: the next use uploads again instead of handing out nothing."""
    base = crossing.storage.parse(f"file://{tmp_path / 'store'}", "storage.root")
    local = tmp_path / "model"
    local.mkdir()
    (local / "config.json").write_text("{}")
    uri = Path(crossing.upload_once(local, base, "model", None).removeprefix("file://"))
    (uri / "config.json").unlink()  # pruned; the reusing run's mark survives
    assert crossing.upload_once(local, base, "model", None) == f"file://{uri}"
    assert (uri / "config.json").read_text() == "{}"
