"""Object storage for real: an S3-compatible server (moto, in its own process on 127.0.0.1),
pyarrow's S3 client, Ray Train checkpointing to s3://, the data stage and the drift window
reading s3://. Credentials come from the environment, the endpoint from the profile.

The proof that matters for a cluster: a train step that dies after its first checkpoint and
is retried with the same pipeline run id continues from the checkpoint in object storage
(steps 4..6 after a step-3 checkpoint), with nothing of the run on local disk.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import pytest
from fixtures_data import TINY_OVERRIDES, build_dataset
from fixtures_s3 import (
    list_keys,
    make_bucket,
    s3_endpoint,
    s3_filesystem,
    s3_server,
    upload_dir,
)

from flywheel.config import load_profile
from flywheel.errors import DataError, FlywheelError, StorageError

pytestmark = pytest.mark.integration
_ = s3_endpoint  # a fixture, used by name

VOCAB = 512


@pytest.fixture(scope="module")
def workdir(s3_endpoint, ray_workdir):
    # s3_endpoint first: its credentials are in os.environ before Ray starts its workers.
    return ray_workdir


def _profile(endpoint: str, *extra: str):
    return load_profile(
        None,
        [*TINY_OVERRIDES, f"storage.endpoint_url={endpoint}", *extra],
    )


# ------------------------------------------------------------------ drift windows


def _records(n: int, offset: int = 0) -> str:
    return "".join(
        json.dumps({"text": f"production record number {i}", "timestamp": 1_700_000_000 + i}) + "\n"
        for i in range(offset, offset + n)
    )


def test_window_read_from_s3_file_and_prefix(s3_endpoint, tmp_path):
    from flywheel.drift import load_window

    local = tmp_path / "window"
    local.mkdir()
    (local / "a.jsonl").write_text(_records(30))
    (local / "b.jsonl").write_text(_records(30, offset=30))
    upload_dir(s3_endpoint, local, "s3://windows/2026-11-28")
    cfg = _profile(s3_endpoint, "drift.min_rows=10").drift
    before = set(Path(tempfile.gettempdir()).glob("flywheel-stage-*"))

    one = load_window("s3://windows/2026-11-28/a.jsonl", cfg, s3_endpoint)
    both = load_window("s3://windows/2026-11-28/", cfg, s3_endpoint)
    assert len(one) == 30 and len(both) == 60
    assert both["text"].iloc[-1] == "production record number 59"
    assert set(Path(tempfile.gettempdir()).glob("flywheel-stage-*")) == before, "copies removed"


def test_bad_window_in_s3_is_named_by_its_uri(s3_endpoint, tmp_path):
    from flywheel.drift import load_window

    bad = tmp_path / "bad.jsonl"
    bad.write_text(_records(3) + "{not json\n")
    upload_dir(s3_endpoint, bad, "s3://windows/bad/bad.jsonl")
    cfg = _profile(s3_endpoint).drift
    with pytest.raises(DataError) as err:
        load_window("s3://windows/bad/bad.jsonl", cfg, s3_endpoint)
    assert str(err.value).startswith("window s3://windows/bad/bad.jsonl:4: not valid JSON")
    with pytest.raises(StorageError, match="no such object or prefix on S3"):
        load_window("s3://windows/nothing-here/", cfg, s3_endpoint)


# ------------------------------------------------------------ unreadable storage


def test_handoff_uploads_unused_past_their_retention_are_pruned_from_s3(s3_endpoint, tmp_path):
    """The exit handler's retention on object storage: last use is the mark's LastModified
    (moto cannot backdate an object, so the clock moves instead)."""
    from flywheel.runtime import crossing

    root = f"{make_bucket(s3_endpoint, 'handoff-retention')}/runs"
    profile = _profile(
        s3_endpoint,
        "ray.mode=address",
        "ray.address=10.0.0.5:6379",
        f"storage.root={root}",
        "storage.handoff_retention_hours=1",
    )
    base = crossing.storage.parse(root, "storage.root").child(crossing.HANDOFF_DIR)
    local = tmp_path / "model"
    local.mkdir()
    (local / "config.json").write_text("{}")
    uri = crossing.upload_once(local, base, "model", s3_endpoint)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("not an upload")
    upload_dir(s3_endpoint, tmp_path / "other", f"{root}/{crossing.HANDOFF_DIR}/other")

    _, last = crossing.uploads_last_used(profile)
    assert (
        list(last) == [uri.rsplit("/", 1)[-1]]
        and abs(last[uri.rsplit("/", 1)[-1]] - time.time()) < 120
    )
    assert crossing.prune_uploads(profile) == []  # used just now
    assert crossing.prune_uploads(profile, now=time.time() + 2 * 3600) == [uri]
    keys = list_keys(s3_endpoint, root)
    assert keys == [f"handoff-retention/runs/{crossing.HANDOFF_DIR}/other/x.txt"], keys


def test_missing_bucket_and_bad_credentials_fail_in_one_line(s3_endpoint):
    from flywheel import storage

    t0 = time.monotonic()
    with pytest.raises(StorageError) as err:
        storage.check_readable("s3://no-such-bucket/w.jsonl", "drift.window", s3_endpoint)
    assert str(err.value) == (
        f"drift.window: cannot access s3://no-such-bucket/w.jsonl on S3 at {s3_endpoint}: "
        "bucket 'no-such-bucket' does not exist"
    )
    # A server that checks keys, and keys it never issued.
    with s3_server(require_auth=True) as strict, pytest.raises(StorageError) as err:
        storage.check_readable("s3://ckpt/runs", "storage.root", strict, must_exist=False)
    text = str(err.value)
    assert text.startswith(f"storage.root: cannot access s3://ckpt/runs on S3 at {strict}: ")
    assert "access denied" in text and "AWS_ACCESS_KEY_ID" in text and "\n" not in text
    assert time.monotonic() - t0 < 30


# --------------------------------------------------------------------- data stage


@pytest.fixture(scope="module")
def s3_corpus(s3_endpoint, workdir) -> str:
    """The interpreter's pydoc topics, one text file each, under s3://corpus/pydoc in three
    sub-prefixes (a prefix is not a directory: staging must rebuild the tree)."""
    from pydoc_data.topics import topics

    corpus = workdir / "corpus"
    for i, name in enumerate(sorted(topics)):
        path = corpus / f"part{i % 3}" / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(topics[name])
    return upload_dir(s3_endpoint, corpus, "s3://corpus/pydoc")


@pytest.fixture(scope="module")
def s3_prepared(s3_endpoint, s3_corpus, workdir):
    """(dataset directory, stats): the pipeline's prepare from the s3:// corpus."""
    from flywheel import stages

    out = workdir / "prepared"
    return out, stages.prepare(_profile(s3_endpoint).model_dump(), s3_corpus, out, "run-data")


def test_data_location_s3_prefix_is_staged_for_the_data_stage(s3_endpoint, s3_corpus, s3_prepared):
    """The `data_location` knob names an s3:// prefix of text files; the data stage reads a
    temporary copy, and the manifest keeps the URI."""
    from flywheel import stages
    from flywheel.artifacts import MANIFEST

    profile = _profile(s3_endpoint)
    out, stats = s3_prepared
    from pydoc_data.topics import topics

    assert stats.docs_read == len(topics)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["config"]["source"] == manifest["config"]["source"] | {
        "kind": "files",
        "path": "s3://corpus/pydoc",
    }
    with pytest.raises(StorageError, match=r"^data_location: .*bucket 'missing-corpus'"):
        stages.prepare(profile.model_dump(), "s3://missing-corpus/x", out, "run-data-2")


def test_dedup_index_read_in_place_from_s3(s3_endpoint, s3_prepared, workdir):
    """data.dedup.index = the champion's dataset under s3:// (as a Kubeflow step names it:
    no pod has the local dataset store): Ray's tasks read the index from the bucket, and
    the new data's copies of the champion's documents are dropped and counted."""
    from pydoc_data.topics import topics

    from flywheel.artifacts import MANIFEST
    from flywheel.data import index, prepare, sources

    first, _ = s3_prepared
    uri = upload_dir(s3_endpoint, first, "s3://datasets/champion")
    new = workdir / "new-corpus"
    new.mkdir()
    names = sorted(topics, key=lambda n: -len(topics[n]))[:3]
    for name in names:
        (new / f"copy-{name}.txt").write_text(topics[name])
    for i, doc in enumerate(sources.read_module_docstrings(sources.stdlib_root(), "textwrap.py")):
        (new / f"fresh-{i}.txt").write_text(doc["text"])
    split = ["data.split.validation_share=0", "data.split.test_share=0"]
    source = ["data.source.kind=files", f"data.source.path={new}"]
    out = workdir / "deduped-against-s3"
    prepare(_profile(s3_endpoint, *source, *split, f"data.dedup.index={uri}"), out)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["dropped"]["by_reason"].get(f"exact_dedup:{index.COPY}") == len(names)
    champion_hash = json.loads((first / MANIFEST).read_text())["content_hash"]
    assert manifest["dedup_index"]["deduplicated_against"] == champion_hash
    with pytest.raises(DataError, match=r"^data\.dedup\.index: s3://datasets/nothing holds no"):
        prepare(_profile(s3_endpoint, *source, "data.dedup.index=s3://datasets/nothing"), out)


def test_cli_data_prepare_reads_an_s3_source(s3_endpoint, s3_corpus, workdir):
    """`flywheel data prepare` with data.source.path=s3://... (the profile's own source)."""
    from flywheel.artifacts import MANIFEST
    from flywheel.cli.main import main

    out = workdir / "prepared-cli"
    args = [*TINY_OVERRIDES, f"storage.endpoint_url={s3_endpoint}", "data.source.kind=files"]
    main(["data", "prepare", "--out", str(out), *args, f"data.source.path={s3_corpus}"])
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["config"]["source"]["path"] == s3_corpus
    assert manifest["docs"]["train"] > 0
    with pytest.raises(SystemExit) as exit_:
        main(["data", "prepare", *args, "data.source.path=s3://corpus/no-such-prefix"])
    assert exit_.value.code == 1


# ------------------------------------------------------- Ray Train checkpoints on S3


def test_retried_train_step_resumes_from_the_s3_checkpoint(s3_endpoint, workdir):
    """Attempt 1 checkpoints at step 3 to s3:// and dies at step 5 (a worker SIGKILLed,
    no restarts allowed: the pod is gone). Attempt 2, the same pipeline run id, continues
    at step 4 from the checkpoint in object storage."""
    from mlflow import MlflowClient

    from flywheel import tracking
    from flywheel.train import train

    make_bucket(s3_endpoint, "ckpt")
    ds = build_dataset(workdir / "ds-train", block_size=32, vocab_size=VOCAB)
    profile = _profile(
        s3_endpoint,
        "storage.root=s3://ckpt/flywheel",
        "train.max_steps=6",
        "train.checkpoint_every=3",
        "train.max_failures=0",
        "train.keep_checkpoints=2",
    )
    marker = workdir / "fault-fired.json"
    t0 = time.monotonic()
    with pytest.raises(FlywheelError, match="s3://ckpt/flywheel/ray/train-pipeline-run-7"):
        train(
            profile,
            ds,
            workdir / "model-1",
            run_key="pipeline-run-7",
            fault={"step": 5, "rank": 0, "marker": str(marker)},
        )
    first_s = time.monotonic() - t0
    assert json.loads(marker.read_text())["step"] == 5
    keys = list_keys(s3_endpoint, "s3://ckpt/flywheel/ray/train-pipeline-run-7")
    assert any(k.endswith("/state.json") for k in keys), keys
    assert not (workdir / ".flywheel" / "ray" / "train-pipeline-run-7").exists()

    t0 = time.monotonic()
    r = train(profile, ds, workdir / "model-2", run_key="pipeline-run-7")
    second_s = time.monotonic() - t0
    assert (r.resumed_from_step, r.steps, r.restarts) == (3, 6, 0)
    assert r.checkpoint.startswith("s3://ckpt/flywheel/ray/train-pipeline-run-7/checkpoint_")
    # The retried attempt trained steps 4-6 only, starting from the step-3 weights.
    client = MlflowClient(tracking.tracking_uri(profile))
    steps = sorted(m.step for m in client.get_metric_history(r.mlflow_run_id, "loss"))
    assert steps == [4, 5, 6]
    info = json.loads((Path(r.model_dir) / "flywheel_training.json").read_text())
    assert info["summary"]["steps"] == 6 and info["summary"]["resumed_from_step"] == 3
    assert (Path(r.model_dir) / "config.json").is_file(), "weights exported from s3"
    # The final checkpoint's record, read back from the bucket: one continuous history,
    # steps 1-3 from attempt 1, 4-6 from the retry, which trained on from step 3's loss.
    state = json.loads(
        s3_filesystem(s3_endpoint)
        .open_input_stream(r.checkpoint.removeprefix("s3://") + "/state.json")
        .read()
    )
    history = state["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert [h["attempt"] for h in history] == [0, 0, 0, 1, 1, 1]
    assert history[0]["loss"] == pytest.approx(math.log(VOCAB), abs=0.3)
    assert abs(history[3]["loss"] - history[2]["loss"]) < 0.3, history
    print(f"\nS3 train: attempt 1 {first_s:.1f} s, retried attempt {second_s:.1f} s")
