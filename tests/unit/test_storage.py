"""Storage URIs without a server: parsing, profile-load checks, file:// staging, Ray storage
placement, and the one-line failures of an S3 endpoint that is down (a closed local port).
The S3 round trips against a real S3-compatible server are in
tests/integration/test_storage_s3.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from flywheel import storage
from flywheel.config import load_profile
from flywheel.errors import ConfigError, DataError, StorageError

# ------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("uri", "scheme", "path"),
    [
        ("s3://bucket/prefix/x", "s3", "bucket/prefix/x"),
        ("s3://bucket", "s3", "bucket"),
        ("s3://bucket//a///b/", "s3", "bucket/a/b"),
        ("gs://my.bucket/p", "gs", "my.bucket/p"),
        ("gcs://bucket/p", "gs", "bucket/p"),
        ("S3://bucket/p", "s3", "bucket/p"),
        ("file:///abs/path", "file", "/abs/path"),
        ("file://localhost/abs", "file", "/abs"),
    ],
)
def test_parse_uris(uri, scheme, path):
    loc = storage.parse(uri, "storage.root")
    assert (loc.scheme, loc.path) == (scheme, path)
    assert loc.remote == (scheme in ("s3", "gs"))


def test_plain_path_is_local_and_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = storage.parse("runs/x", "storage.root")
    assert (loc.scheme, loc.path) == ("file", str(tmp_path / "runs" / "x"))
    assert not storage.is_uri("runs/x") and storage.is_uri("s3://b/x")


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("hdfs://namenode/x", "unknown scheme 'hdfs://'"),
        ("http://host/x", "unknown scheme 'http://'"),
        ("s3://", "names no bucket"),
        ("s3:///key", "names no bucket"),
        ("s3://Upper_Case/x", "not a valid bucket name"),
        ("s3://ab/x", "not a valid bucket name"),
        ("s3://b..c/x", "not a valid bucket name"),
        ("s3://bucket/x?versionId=1", "query or fragment"),
        ("s3://bucket/a b", "whitespace"),
        ("file://relative/path", "file:///absolute/path"),
    ],
)
def test_malformed_uris_name_the_field(uri, fragment):
    with pytest.raises(ConfigError) as err:
        storage.parse(uri, "storage.root")
    assert str(err.value).startswith("storage.root: ") and fragment in str(err.value)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("storage.root=hdfs://x/y", "storage.root"),
        ("storage.root=s3://", "storage.root"),
        ("storage.endpoint_url=minio:9000", "storage.endpoint_url"),
        ("storage.endpoint_url=http://", "storage.endpoint_url"),
        ("data.source.path=ftp://host/corpus", "data.source.path"),
        ("drift.window=s3://Bad_Bucket/w", "drift.window"),
    ],
)
def test_profile_rejects_malformed_storage_uris_when_it_loads(override, field):
    with pytest.raises(ConfigError) as err:
        load_profile(None, [override])
    text = str(err.value)
    assert "local.yaml" in text and f"{field}: " in text
    assert "\n" not in text


def test_profile_accepts_storage_uris():
    p = load_profile(
        None,
        [
            "storage.root=s3://ckpt/flywheel",
            "storage.endpoint_url=http://minio.storage:9000",
            "data.source.kind=files",
            "data.source.path=gs://corpus/docs",
            "drift.window=file:///data/window.jsonl",
        ],
    )
    assert p.storage.root == "s3://ckpt/flywheel"
    assert p.to_param()["storage"]["endpoint_url"] == "http://minio.storage:9000"


def test_endpoint_from_profile_then_environment(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env:9000")
    assert storage.endpoint(None) == "http://env:9000"
    assert storage.endpoint("http://profile:9000") == "http://profile:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:9000")
    assert storage.endpoint(None) == "http://s3-only:9000"


def test_filesystems_per_scheme():
    import pyarrow.fs as pafs

    s3 = storage.filesystem(storage.parse("s3://bucket/x", "f"), "http://127.0.0.1:9")
    assert isinstance(s3, pafs.S3FileSystem)
    local = storage.filesystem(storage.parse("file:///tmp", "f"))
    assert isinstance(local, pafs.LocalFileSystem)
    gcs = storage.filesystem(storage.parse("gs://bucket/x", "f"))  # lazy: no request yet
    assert isinstance(gcs, pafs.GcsFileSystem)


# ------------------------------------------------------------------- file:// staging


def _window(path: Path, n: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(n)))
    return path


def test_staged_local_path_and_file_uri_are_read_in_place(tmp_path):
    f = _window(tmp_path / "w" / "a.jsonl", 3)
    with storage.staged(str(f), "window") as local:
        assert local == str(f)
    with storage.staged(f"file://{f}", "window") as local:
        assert local == str(f)
    with storage.staged("relative/w.jsonl", "window") as local:
        assert local == "relative/w.jsonl", "a plain path is passed on as given"


def test_load_window_reads_a_file_uri(tmp_path):
    from flywheel.drift import load_window

    cfg = load_profile(None, ["drift.min_rows=2"]).drift
    f = _window(tmp_path / "w" / "a.jsonl", 5)
    assert len(load_window(f"file://{f.parent}", cfg)) == 5
    with pytest.raises(DataError, match="no such file or directory"):
        load_window(f"file://{tmp_path}/missing", cfg)


def test_data_location_file_uri_means_files(tmp_path):
    from flywheel.profiles import with_data_location

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello")
    p = with_data_location(load_profile(None, []), f"file://{corpus}")
    assert (p.data.source.kind, p.data.source.path) == ("files", str(corpus))


def test_data_location_malformed_uri_is_a_config_error():
    from flywheel.profiles import with_data_location

    with pytest.raises(ConfigError, match=r"^data_location: unknown scheme 'ftp://'"):
        with_data_location(load_profile(None, []), "ftp://host/corpus")


# ------------------------------------------------------------------- Ray storage


def test_ray_storage_defaults_to_the_state_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = storage.ray_storage(load_profile(None, []))
    assert store.filesystem is None and Path(store.path).is_dir()
    assert Path(store.path) == (tmp_path / ".flywheel" / "ray")


def test_ray_storage_under_a_file_root(tmp_path):
    store = storage.ray_storage(load_profile(None, [f"storage.root=file://{tmp_path}/ckpt"]))
    assert (store.path, store.filesystem) == (f"{tmp_path}/ckpt/ray", None)
    assert store.run_uri("train-x") == f"{tmp_path}/ckpt/ray/train-x"
    (Path(store.path) / "tune-1-trial0-a").mkdir()
    (Path(store.path) / "tune-1-trial1-b").mkdir()
    (Path(store.path) / "train-x").mkdir()
    store.remove_runs("tune-1-trial")
    assert sorted(p.name for p in Path(store.path).iterdir()) == ["train-x"]


def test_ray_storage_on_s3_strips_the_scheme():
    import pyarrow.fs as pafs

    p = load_profile(
        None, ["storage.root=s3://ckpt/flywheel/", "storage.endpoint_url=http://127.0.0.1:9"]
    )
    store = storage.ray_storage(p)  # no check: nothing is contacted
    assert store.path == "ckpt/flywheel/ray"  # RunConfig wants the path without s3://
    assert isinstance(store.filesystem, pafs.S3FileSystem)
    assert store.run_uri("train-r1") == "s3://ckpt/flywheel/ray/train-r1"


def test_ray_run_name_is_fixed_per_pipeline_run():
    from flywheel.train.run import ray_run_name

    assert ray_run_name("retrain-2026-11-28 09:00/x") == "train-retrain-2026-11-28-09-00-x"
    assert ray_run_name("abc") == ray_run_name("abc")
    assert ray_run_name(None) != ray_run_name(None)


# ------------------------------------------------- a store that cannot be reached


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_down_is_one_line_naming_field_and_service_in_seconds(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    url = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(StorageError) as err:
        storage.check_readable("s3://bucket/window.jsonl", "drift.window", url)
    elapsed = time.monotonic() - t0
    text = str(err.value)
    assert text.startswith("drift.window: cannot access s3://bucket/window.jsonl on S3 at " + url)
    assert "cannot connect" in text and "\n" not in text
    assert elapsed < 15, f"retries are bounded: {elapsed:.1f} s"


def test_train_fails_before_ray_when_checkpoint_storage_is_down(tmp_path, monkeypatch):
    """The train stage reaches storage.root before MLflow or Ray: one line, no run created."""
    from fixtures_data import build_dataset

    from flywheel.train import train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    ds = build_dataset(tmp_path / "ds", block_size=32, vocab_size=300, max_docs=60)
    url = f"http://127.0.0.1:{_closed_port()}"
    p = load_profile(
        None,
        [
            "data.block_size=32",
            "model.context=32",
            "storage.root=s3://ckpt/runs",
            f"storage.endpoint_url={url}",
        ],
    )
    with pytest.raises(StorageError, match=r"^storage\.root: cannot access s3://ckpt/runs"):
        train(p, ds, tmp_path / "model", run_key="r1")
    assert not (tmp_path / ".flywheel" / "mlflow.db").exists(), "no MLflow run was opened"


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (
            "When getting information for bucket 'b': AWS Error ACCESS_DENIED during "
            "HeadBucket operation: No response body.",
            "access denied",
        ),
        ("AWS Error INVALID_ACCESS_KEY_ID during ListObjectsV2 operation", "access denied"),
        ("AWS Error NO_SUCH_BUCKET during ListObjectsV2 operation", "does not exist"),
        ("curlCode: 7, Could not connect to server", "cannot connect"),
        ("something else\nwith a second line", "something else"),
    ],
)
def test_explain_sorts_store_errors(message, why):
    loc = storage.parse("s3://bkt/x", "storage.root")
    text = storage.explain(OSError(message), loc, "storage.root", "http://h:9")
    assert text.startswith("storage.root: cannot access s3://bkt/x on S3 at http://h:9: ")
    assert why in text and "\n" not in text
