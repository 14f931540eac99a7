"""Where the data stage writes, without touching anything it did not create.

The stage builds its dataset in a fresh working directory beside the target (a sibling, so
the final move is one rename on one filesystem) and moves it into place at the end. The
target must not overlap the source, and may already exist only as an empty directory or as
an earlier output of this stage (recognised by its manifest, or by the failure note a failed
run leaves with its reports); anything else is refused before any work starts.

A failed run removes its working directory but keeps what it judged: `rejects.jsonl` and
`dropped.jsonl` move to the target (or, when the target holds a complete dataset that must
survive the failure, to `<target>.failed`), beside a `failed.json` that says why.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

from flywheel import artifacts, contracts
from flywheel.config import DataConfig
from flywheel.data import sources
from flywheel.data.index import INDEX_DIR
from flywheel.errors import DataError

# Dropped documents (filters, dedup) with block, reason and detail: not part of the
# artifact contract of `flywheel.artifacts`, an audit trail next to rejects.jsonl.
DROPPED = "dropped.jsonl"
# Left by a failed run beside its reports: the error, and the mark that this stage wrote it.
FAILED = "failed.json"
REPORTS = (artifacts.REJECTS, DROPPED)
# Inside a working directory: who made it (host, pid), so a later run can tell a crashed
# run's leftovers from a running one's.
OWNER = ".flywheel-owner.json"
FAILED_SUFFIX = ".failed"

_WORK = re.compile(r"^\..*\.incoming-(\d+)-[0-9a-f]{8}$")
_LEGACY_WORK = re.compile(r"^\.incoming-(\d+)$")  # the CLI's own name before this module
_SHARD = re.compile(r"^part-\d{5}\.parquet$")
_TOKENIZER_FILE = re.compile(r"^[\w.-]+\.(json|txt|model|jinja)$")
_INDEX_FILE = re.compile(r"^(part-\d{3}\.parquet|index\.json)$")  # flywheel.data.index
_TOP_FILES = {artifacts.MANIFEST, *REPORTS, FAILED}
_TEXT_FILES = {Path(artifacts.TEST_TEXT).name, Path(artifacts.REFERENCE_TEXT).name}


class OutputDirError(DataError):
    """The output directory cannot be used: a usage error, found before any work."""

    exit_code = 2


# --------------------------------------------------------------------- recognise


def foreign_entries(path: Path, limit: int = 3) -> list[str]:
    """Up to `limit` paths under `path` (relative) that this stage does not write."""
    found: list[str] = []
    for entry in sorted(path.iterdir()):
        name = entry.name
        if entry.is_symlink():
            found.append(name)
        elif entry.is_file() and name in _TOP_FILES:
            continue
        elif entry.is_dir() and name in (
            *artifacts.SPLITS,
            artifacts.TEXT_DIR,
            artifacts.TOKENIZER_DIR,
            INDEX_DIR,
        ):
            pattern = {
                artifacts.TEXT_DIR: None,
                artifacts.TOKENIZER_DIR: _TOKENIZER_FILE,
                INDEX_DIR: _INDEX_FILE,
            }.get(name, _SHARD)
            for child in sorted(entry.iterdir()):
                ok = child.is_file() and not child.is_symlink()
                if name == artifacts.TEXT_DIR:
                    ok = ok and child.name in _TEXT_FILES
                else:
                    ok = ok and bool(pattern and pattern.match(child.name))
                if not ok:
                    found.append(f"{name}/{child.name}")
                    if len(found) >= limit:
                        return found
            continue
        else:
            found.append(name + ("/" if entry.is_dir() else ""))
        if len(found) >= limit:
            return found
    return found


def _is_manifest(path: Path) -> bool:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and {"schema_version", "content_hash"} <= manifest.keys()


def _is_failure_note(path: Path) -> bool:
    try:
        note = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(note, dict) and note.get("stage") == contracts.PREPARE_DATA


def kind_of(path: Path) -> str:
    """'absent', 'empty', 'dataset' (complete, by its manifest), 'failed' (a failed run's
    reports), or 'foreign' (anything else: not ours to replace)."""
    if not path.exists() and not path.is_symlink():
        return "absent"
    if not path.is_dir() or path.is_symlink():
        return "foreign"
    if not any(path.iterdir()):
        return "empty"
    if foreign_entries(path, limit=1):
        return "foreign"
    if _is_manifest(path / artifacts.MANIFEST):
        return "dataset"
    if not (path / artifacts.MANIFEST).exists() and _is_failure_note(path / FAILED):
        return "failed"
    return "foreign"


# ------------------------------------------------------------------------- check


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def _hidden_below(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def overlap(out: Path, source: Path) -> str | None:
    """Why `out` may not be written for `source`, or None. Both are resolved (links too).

    Output inside the source would be read back as input by the next run, unless it sits
    under a hidden directory, which the files source skips (as it skips `.flywheel/`).
    """
    out, source = out.resolve(), source.resolve()
    if out == source:
        return "is the source directory"
    if _inside(source, out):
        return "contains the source"
    if source.is_dir() and _inside(out, source) and not _hidden_below(out, source):
        return "is inside the source"
    return None


def check_target(out: Path, sources: list[Path], label: str | None = None) -> str:
    """Refuse an output directory that overlaps a source or holds what this stage did not
    write; returns its kind (see `kind_of`). `label` names it in errors (e.g. '--out')."""
    name = f"{label} {out}" if label else f"output directory {out}"
    for source in sources:
        why = overlap(out, source)
        if why:
            raise OutputDirError(
                f"{name} {why} (data.source.path={source}); write the dataset elsewhere: "
                "nothing of the source is ever deleted or overwritten"
            )
    kind = kind_of(out)
    if kind == "foreign":
        if out.is_symlink():
            raise OutputDirError(f"{name} is a symbolic link; name the directory itself")
        if out.exists() and not out.is_dir():
            raise OutputDirError(f"{name} exists and is not a directory")
        shown = ", ".join(foreign_entries(out)) if out.is_dir() else out.name
        raise OutputDirError(
            f"{name} holds files this stage did not write ({shown}); name a new or empty "
            "directory (an earlier output of `data prepare` may be replaced)"
        )
    return kind


# --------------------------------------------------------------------- workspace


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(parent: Path, store: bool = False) -> list[Path]:
    """Remove working directories that crashed runs of this stage left in `parent`.

    Only ours (an owner note naming this host and a process that is gone); in the dataset
    store (`store`), also the CLI's older `.incoming-<pid>` directories whose process is gone.
    """
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    host = socket.gethostname()
    for entry in parent.iterdir():
        if not entry.is_dir() or entry.is_symlink():
            continue
        m = _WORK.match(entry.name)
        if m:
            try:
                owner = json.loads((entry / OWNER).read_text())
            except (OSError, ValueError):
                continue
            if owner.get("host") != host or _alive(int(owner.get("pid", m.group(1)))):
                continue
        elif not (store and (m := _LEGACY_WORK.match(entry.name)) and not _alive(int(m.group(1)))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


class Workspace:
    """A fresh working directory for one run, beside where its result goes.

    `publish(final)` moves it into place; `fail(final, error)` keeps only the reports;
    `discard()` removes it. Whatever happens, the working directory does not outlive the run.

    When the parent cannot be written but the target is an existing directory this stage may
    use (a volume mounted as the output, under a read-only root), the working directory is
    made inside the target instead, and its entries are moved up at the end.
    """

    def __init__(self, parent: Path, label: str, store: bool = False, final: Path | None = None):
        self.parent = parent
        self.inside: Path | None = None
        self._made: list[Path] = []  # directories this run creates, innermost first
        p = parent
        while not p.exists() and p != p.parent:
            self._made.append(p)
            p = p.parent
        name = f".{label}.incoming-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            parent.mkdir(parents=True, exist_ok=True)
            sweep(parent, store=store)
            self.path = parent / name
            self.path.mkdir()
        except OSError as exc:
            self._remove_made()
            usable = final is not None and kind_of(final) in ("empty", "dataset", "failed")
            if not (usable and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)):
                raise OutputDirError(
                    f"cannot create a working directory in {parent}: {exc.strerror or exc}"
                ) from None
            assert final is not None
            self.inside, self._had = final, kind_of(final)
            self.path = final / name
            try:
                self.path.mkdir()
            except OSError as inner:
                raise OutputDirError(f"cannot write in {final}: {inner.strerror}") from None
        owner = {"host": socket.gethostname(), "pid": os.getpid()}
        (self.path / OWNER).write_text(json.dumps(owner) + "\n")

    def _remove_made(self) -> None:
        for p in self._made:
            with contextlib.suppress(OSError):
                p.rmdir()  # fails (kept) when something else now lives there
        self._made = []

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._remove_made()

    def publish(self, final: Path) -> None:
        """Move the result to `final`, replacing only an empty dir or this stage's output."""
        (self.path / OWNER).unlink(missing_ok=True)
        if self.inside is not None:
            _clear_stage_entries(self.inside)
            _move_entries(self.path, self.inside)
        else:
            _move_into_place(self.path, final)
        self._made = []

    def fail(self, final: Path | None, error: str) -> Path | None:
        """Keep the reports of a failed run (see the module doc); None when there are none.

        Everything else the run wrote (shards, tokenizer, text) goes with the working dir.
        """
        if final is None or not any((self.path / r).exists() for r in REPORTS):
            self.discard()
            return None
        for entry in self.path.iterdir():
            if entry.name not in REPORTS:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        note = {"stage": contracts.PREPARE_DATA, "error": error, "reports": list(REPORTS)}
        (self.path / FAILED).write_text(json.dumps(note, indent=2) + "\n")
        target = self.reports_dir(final)
        try:
            if target == self.inside:
                _clear_stage_entries(target)
                _move_entries(self.path, target)
            elif target != self.path:
                _move_into_place(self.path, target)
        except OSError:
            target = self.path
        self._made = []
        return target

    def reports_dir(self, final: Path) -> Path:
        """Where `fail(final, ...)` puts the reports (for messages written before it runs).

        Not over a complete dataset (a failed run must not cost the last good one) nor over
        anything this stage did not write; failing both, the working directory keeps them.
        """
        if self.inside is not None:
            return self.inside if self._had != "dataset" else self.path
        for target in (final, final.with_name(final.name + FAILED_SUFFIX)):
            if kind_of(target) in ("absent", "empty", "failed"):
                return target
        return self.path


def _clear_stage_entries(path: Path) -> None:
    """Remove what this stage writes in `path` (only its names; `kind_of` vouched for them)."""
    for name in (*artifacts.SPLITS, artifacts.TEXT_DIR, artifacts.TOKENIZER_DIR, INDEX_DIR):
        shutil.rmtree(path / name, ignore_errors=True)
    for name in _TOP_FILES:
        (path / name).unlink(missing_ok=True)


def _move_entries(src: Path, dst: Path) -> None:
    for entry in src.iterdir():
        shutil.move(str(entry), str(dst / entry.name))
    src.rmdir()


def _move_into_place(src: Path, final: Path) -> None:
    kind = kind_of(final)
    if kind == "foreign":
        raise OutputDirError(f"output directory {final} changed while the stage ran; kept {src}")
    if kind in ("absent", "empty"):
        try:
            os.rename(src, final)  # onto an empty directory too (POSIX)
            return
        except OSError as exc:
            if kind == "absent" or exc.errno not in (errno.EBUSY, errno.EXDEV, errno.EPERM):
                raise
        _move_entries(src, final)  # `final` is a mount point: entry by entry
        return
    # An earlier output of this stage: set it aside, move the new one in, then delete it.
    old = final.with_name(f".{final.name}.replaced-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(final, old)
    try:
        os.rename(src, final)
    except OSError:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------ the data stage's own checks


def source_paths(cfg: DataConfig) -> list[Path]:
    """Local paths the stage reads (an output may not overlap them)."""
    src = cfg.source
    if src.kind == "pydocs":
        return [sources.stdlib_root()]
    if src.path and Path(src.path).exists():
        return [Path(src.path)]
    return []  # a hub dataset name: nothing local to protect


def check_dataset_output(
    cfg: DataConfig, out_dir: Path, store: bool = False, label: str | None = None
):
    """Refuse, before any work, an output that overlaps the source or holds what this stage
    did not write (OutputDirError, exit 2). `store`: `out_dir` holds datasets by hash."""
    out_dir = Path(out_dir)
    if store:
        for source in source_paths(cfg):
            why = overlap(out_dir, source)
            if why:
                raise OutputDirError(f"dataset store {out_dir} {why} (data.source.path={source})")
        return
    check_target(out_dir, source_paths(cfg), label)
