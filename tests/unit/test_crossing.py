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
