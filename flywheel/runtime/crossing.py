"""What the driver hands Ray Train's workers when they may run on other machines.

With `ray.mode: local` every worker runs on this machine and reads this machine's paths.
With `ray.mode: address` (a cluster elsewhere) or inside a RayJob (`kuberay`), a worker
on another node cannot open a path on the driver's disk: the train split when it is
streamed, a model directory (`init_from`, a local `model.base`), `train.resume_from`.
The rule, the same storage-URI hand-off a RayJob step uses (kuberay_entry):

- `storage.root` is a URI (s3://, gs://, or file:// of a mount every node shares): those
  inputs are uploaded once under `storage.root/handoff/<key>/` and the workers get URIs,
  which they read themselves (`local_model_source`, `resume_checkpoint`).
- `storage.root` is a plain path or unset: allowed only when the cluster is this machine
  (a loopback `ray.address`); otherwise a ConfigError naming `storage.root`, before Ray
  starts, rather than workers failing later on a path they do not have.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from flywheel import storage
from flywheel.config import Profile, RayConfig
from flywheel.errors import ConfigError

HANDOFF_DIR = "handoff"
# Written last into an uploaded directory: its presence means the upload is complete, so
# parallel tuning trials and a retried step reuse it instead of uploading again.
DONE_MARK = "_FLYWHEEL_UPLOADED"
# What upload_once names an upload: only these are ever pruned.
UPLOAD_NAME = re.compile(r"(model|data|resume)-[0-9a-f]{16}")
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def crosses_nodes(cfg: RayConfig) -> bool:
    """Whether Ray's workers may run on another machine than this driver."""
    return cfg.mode != "local"


def on_this_machine(cfg: RayConfig) -> bool:
    """A loopback `ray.address`: the cluster's nodes share this machine's disk."""
    if cfg.mode == "local":
        return True
    if cfg.mode != "address" or not cfg.address:
        return False
    from flywheel.ray_address import parse_address

    host = parse_address(cfg.address).host
    return host is not None and host.lower() in LOOPBACK


def handoff_root(profile: Profile) -> storage.Location | None:
    """Where inputs for the workers are uploaded; None where paths may pass as they are.

    Raises ConfigError (naming storage.root) where workers on other machines would be
    handed paths of this one."""
    if not crosses_nodes(profile.ray):
        return None
    root = profile.storage.root
    if root and storage.is_uri(root):
        return storage.parse(root, "storage.root").child(HANDOFF_DIR)
    if on_this_machine(profile.ray):
        return None
    where = f"ray.address {profile.ray.address!r}" if profile.ray.address else "a RayJob"
    raise ConfigError(
        f"storage.root: Ray runs on other machines ({where}), whose workers cannot read "
        "this machine's dataset, model or checkpoint paths; set storage.root to a URI they "
        "all reach (s3://bucket/prefix, gs://..., or file:// of a shared mount); it is "
        + (f"{root!r}, a path on this machine" if root else "unset")
    )


def _key(path: Path) -> str:
    """A name for a local directory's upload: its path and its files' sizes and mtimes, so a
    changed directory is uploaded again and an unchanged one is not."""
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def upload_once(local: Path, base: storage.Location, kind: str, url: str | None) -> str:
    """Upload a local directory under base/<kind>-<key>/ unless already there; its URI
    (file:///... on a shared mount, so the workers tell it from a path of their own).

    The mark is written again on every use: its modification time is the upload's last
    use, which `prune_uploads` keeps for `storage.handoff_retention_hours`."""
    dest = base.child(f"{kind}-{_key(local)}")
    uri = dest.as_uri()
    if not _complete(dest, url):
        storage.upload_dir(local, uri, "storage.root", url)
    with tempfile.TemporaryDirectory(prefix="flywheel-mark-") as tmp:
        (Path(tmp) / DONE_MARK).write_text(str(local))
        storage.upload_dir(Path(tmp), uri, "storage.root", url)
    return uri


def _complete(dest: storage.Location, url: str | None) -> bool:
    """The mark and something beside it. A mark alone is what a use leaves when another
    run's exit handler pruned the upload in the same moment: uploaded again, not trusted."""
    names = {Path(i.path).name for i in storage.list_files(dest, "storage.root", url)}
    return DONE_MARK in names and len(names) > 1


# ------------------------------------------------------------------------ retention


def expired_uploads(last_used: dict[str, float], now: float, retention_s: float) -> list[str]:
    """The uploads (name -> last use, epoch seconds) unused for longer than the retention."""
    return sorted(name for name, used in last_used.items() if now - used > retention_s)


def uploads_last_used(profile: Profile) -> tuple[storage.Location | None, dict[str, float]]:
    """The hand-off place and, for each upload `upload_once` made there, its last use: the
    newest modification time among its files (the mark, rewritten on each use; for an
    upload cut short, its newest file). Names of any other shape are not ours: left out."""
    import pyarrow.fs as pafs

    root = profile.storage.root
    if not (root and storage.is_uri(root)):
        return None, {}
    base = storage.parse(root, "storage.root").child(HANDOFF_DIR)
    infos = storage.list_files(base, "storage.root", profile.storage.endpoint_url, recursive=True)
    prefix = base.path.rstrip("/") + "/"
    last: dict[str, float] = {}
    for info in infos:
        if info.type != pafs.FileType.File or info.mtime is None:
            continue
        top = info.path[len(prefix) :].split("/", 1)[0] if info.path.startswith(prefix) else ""
        if UPLOAD_NAME.fullmatch(top):
            last[top] = max(last.get(top, 0.0), info.mtime.timestamp())
    return base, last


def prune_uploads(profile: Profile, now: float | None = None) -> list[str]:
    """Delete the hand-off uploads unused for `storage.handoff_retention_hours` (the
    retrain pipeline's exit handler calls this). They are keyed by content, so runs share
    them and no run may delete them on its own exit. Returns the URIs deleted."""
    base, last = uploads_last_used(profile)
    if base is None:
        return []
    retention_s = profile.storage.handoff_retention_hours * 3600
    gone = []
    for name in expired_uploads(last, time.time() if now is None else now, retention_s):
        uri = base.child(name).as_uri()
        if storage.remove_tree(uri, "storage.root", profile.storage.endpoint_url):
            gone.append(uri)
    return gone


def for_workers(profile: Profile, plan: Any, resume: Path | None) -> tuple[Any, str | None]:
    """The plan and `resume_from` as the workers must see them: pod-local directories
    replaced by URIs under storage.root/handoff where the workers may be elsewhere.

    The train split's files become URIs too (read by `ray.data.read_parquet` on the
    cluster); the dataset directory (`plan.dataset.path`) stays: only the driver reads it.
    """
    base = handoff_root(profile)
    if base is None:
        return plan, str(resume) if resume else None
    url = profile.storage.endpoint_url
    source = plan.model_source
    if source.kind != "fresh" and source.path and Path(str(source.path)).is_dir():
        source = source.model_copy(
            update={"path": upload_once(Path(str(source.path)), base, "model", url)}
        )
    dataset = plan.dataset
    local_files = [f for f in dataset.train_files if not storage.is_uri(f)]
    if local_files:
        split = Path(os.path.commonpath(local_files))
        split = split.parent if split.is_file() else split
        uri = upload_once(split, base, "data", url)
        files = [
            f"{uri}/{Path(f).relative_to(split).as_posix()}" if not storage.is_uri(f) else f
            for f in dataset.train_files
        ]
        dataset = dataset.model_copy(update={"train_files": files})
    plan = plan.model_copy(update={"model_source": source, "dataset": dataset})
    resume_uri = upload_once(resume, base, "resume", url) if resume else None
    return plan, resume_uri


# ----------------------------------------------------------------------- worker side


def is_handed(value: str | None) -> bool:
    """A value `for_workers` made: an object-store or file:// URI (not, say, a hub id)."""
    return storage.is_remote(value) or str(value or "").startswith("file://")


def local_model_source(source: Any, endpoint_url: str | None, work: Path) -> Any:
    """On a worker: a model source whose path is a URI, staged into `work` first (a
    file:// URI, a shared mount, is read where it is)."""
    if source.kind == "fresh" or not is_handed(source.path):
        return source
    local = storage.stage_in(str(source.path), work / "model", "storage.root", endpoint_url)
    return source.model_copy(update={"path": str(local)})


def resume_checkpoint(value: str, endpoint_url: str | None) -> Any:
    """On a worker: `train.resume_from` as a Ray Train Checkpoint (a path or a URI)."""
    import ray.train

    if not storage.is_uri(value):
        return ray.train.Checkpoint.from_directory(value)
    loc = storage.parse(value, "train.resume_from")
    return ray.train.Checkpoint(path=loc.path, filesystem=storage.filesystem(loc, endpoint_url))


def dataset_filesystem(files: list[str], endpoint_url: str | None) -> Any:
    """The pyarrow filesystem for train files that are URIs (None for local paths)."""
    if not files or not storage.is_uri(files[0]):
        return None
    return storage.filesystem(storage.parse(files[0], "storage.root"), endpoint_url)
