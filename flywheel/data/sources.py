"""Where documents come from: `pydocs`, `files`, `hf`.

A source is split into *units* listed in the driver (a stdlib module, a file) and read
by the `ReadUnits` block on Ray workers, so parsing runs in parallel and a unit that
cannot be read becomes reject rows instead of an exception. A `datasets` dataset is
already columnar: it becomes a Ray dataset of records that `RecordsToDocs` validates.

Every row carries id, source and (when the input has one) a timestamp; `source` is what
a person would open to fix bad input (a file path, a module, a dataset name).
"""

from __future__ import annotations

import ast
import codecs
import hashlib
import json
import os
import sysconfig
import tempfile
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from flywheel import storage
from flywheel.config import SourceConfig
from flywheel.data import schema
from flywheel.errors import DataError
from flywheel.text_policy import text_problem

TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".parquet")
TOPICS_UNIT = "pydoc_data.topics"
# Test suites and vendored packages are not documentation (and `test/` alone holds
# ~40% of the stdlib's docstrings, most of them one-line test descriptions).
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_DETAIL_CHARS = 200


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_units(cfg: SourceConfig, endpoint_url: str | None = None) -> list[str]:
    """The units to read, in a fixed order (sorted), so `max_docs` picks the same documents.
    A `files` source may be a storage URI (read in place: see `ReadUnits`)."""
    if cfg.kind == "pydocs":
        root = stdlib_root()
        modules = sorted(
            p.relative_to(root).as_posix()
            for p in root.rglob("*.py")
            if not _STDLIB_SKIP.intersection(p.relative_to(root).parts)
        )
        return [TOPICS_UNIT, *modules]
    if cfg.kind == "files" and storage.is_remote(cfg.path):
        return remote_units(cfg.path or "", endpoint_url)[1]
    if cfg.kind == "files":
        root = Path(cfg.path or "")
        if root.is_file():
            return [root.name]
        if not root.is_dir():
            raise DataError(f"data.source.path: {root} is not a file or directory")
        units = sorted(
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not units:
            raise DataError(f"data.source.path: {root} holds no files")
        return units
    raise ValueError(f"source kind {cfg.kind!r} has no units")


def files_root(cfg: SourceConfig) -> Path:
    root = Path(cfg.path or "")
    return root.parent if root.is_file() else root


def remote_units(uri: str, endpoint_url: str | None) -> tuple[str, list[str]]:
    """(the prefix units are relative to, the units) of an object or a prefix in storage."""
    import pyarrow.fs as pafs

    loc = storage.parse(uri, "data.source.path")
    found = [
        f
        for f in storage.list_files(loc, "data.source.path", endpoint_url, recursive=True)
        if f.type == pafs.FileType.File
    ]
    if not found:  # an object, not a prefix (or nothing there: stage_in names the field)
        base = uri.rstrip("/").rsplit("/", 1)
        return base[0], [base[1]]
    prefix = loc.path.rstrip("/") + "/"
    relative = (f.path[len(prefix) :] for f in found)
    units = sorted(r for r in relative if not any(p.startswith(".") for p in r.split("/")))
    if not units:
        raise DataError(f"data.source.path: {uri} holds no files")
    return uri.rstrip("/"), units


def digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(b"\x1f")
        h.update(part if isinstance(part, bytes) else str(part).encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


def printable(name: str) -> str:
    """`name` as text UTF-8 can hold: a file name's undecodable bytes (which Python keeps as
    surrogate escapes) as \\xNN, lone surrogates from JSON escapes as \\uXXXX."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    out = []
    for ch in name:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def unencodable(value: str) -> str | None:
    """Why `value` cannot be stored as UTF-8 (a lone surrogate), or None when it can."""
    try:
        value.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        return f"lone surrogate U+{ord(value[exc.start]):04X} at character {exc.start}"


def _missing(value: Any) -> bool:
    # None, NaN, NaT and pandas' NA all mean "no value"; containers are values.
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def _timestamp(value: Any) -> str | None:
    if _missing(value):
        return None
    if isinstance(value, (datetime, date, pd.Timestamp)):
        return value.isoformat()
    return str(value)


def doc_row(id_: str, source: str, text: str, timestamp: str | None = None) -> dict:
    """A document; a reject (invalid_unicode) if a field cannot be stored as UTF-8, or the
    text policy's reject if its text holds what text may not (`flywheel.text_policy`).
    Every reader of the data stage (files, records, datasets, pydocs) makes its documents
    here, so the policy holds for every format."""
    for field, value in (("text", text), ("id", id_), ("source", source), ("timestamp", timestamp)):
        problem = unencodable(value) if value is not None else None
        if problem:
            return reject_row(id_, source, schema.INVALID_UNICODE, f"{field}: {problem}")
    refused = text_problem(text)
    if refused:
        return reject_row(id_, source, refused[0], f"text: {refused[1]}")
    return {
        "id": id_,
        "source": source,
        "timestamp": timestamp,
        "text": text,
        "dropped_by": "",
        "reason": "",
        "detail": "",
        "digest": digest(id_, source, timestamp, text),
    }


def reject_row(id_: str, source: str, reason: str, detail: str = "") -> dict:
    detail = printable(detail[:_DETAIL_CHARS])
    id_, source = printable(id_), printable(source)
    return {
        "id": id_,
        "source": source,
        "timestamp": None,
        "text": "",
        "dropped_by": schema.READ,
        "reason": reason,
        "detail": detail,
        "digest": digest(id_, source, reason, detail),
    }


def record_row(record: Any, id_: str, source: str, cfg: SourceConfig) -> dict:
    """One record (a JSON object, a parquet or `datasets` row) -> a doc row or a reject."""
    if not isinstance(record, dict):
        return reject_row(id_, source, schema.NOT_AN_OBJECT, f"got {type(record).__name__}")
    if cfg.id_field and not _missing(record.get(cfg.id_field)):
        id_ = str(record[cfg.id_field])
    text = record.get(cfg.text_field)
    if _missing(text):
        return reject_row(id_, source, schema.MISSING_TEXT, f"no '{cfg.text_field}' value")
    if not isinstance(text, str):
        return reject_row(
            id_, source, schema.NON_STRING_TEXT, f"'{cfg.text_field}' is {type(text).__name__}"
        )
    ts = _timestamp(record.get(cfg.timestamp_field)) if cfg.timestamp_field else None
    # Named by the record's own field names, so the reject says what to fix in the file.
    fields = ((cfg.text_field, text), (cfg.id_field, id_), (cfg.timestamp_field, ts))
    for field, value in fields:
        problem = unencodable(value) if field and value is not None else None
        if problem:
            return reject_row(id_, source, schema.INVALID_UNICODE, f"'{field}': {problem}")
    refused = text_problem(text)
    if refused:
        return reject_row(id_, source, refused[0], f"'{cfg.text_field}': {refused[1]}")
    return doc_row(id_, source, text, ts)


def guarded_record_row(record: Any, id_: str, source: str, cfg: SourceConfig) -> dict:
    """`record_row`, with anything unforeseen in one record rejecting that record only."""
    try:
        return record_row(record, id_, source, cfg)
    except Exception as exc:
        return reject_row(id_, source, schema.UNREADABLE_RECORD, f"{type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------ pydocs


def read_topics() -> list[dict]:
    from pydoc_data.topics import topics

    return [
        doc_row(f"pydocs:topic:{name}", TOPICS_UNIT, text) for name, text in sorted(topics.items())
    ]


def read_module_docstrings(root: Path, relpath: str) -> list[dict]:
    """Docstrings of a stdlib module, its classes and functions, via `ast`.

    Parsed, never imported: importing the whole stdlib runs code with side effects
    (`antigravity` opens a browser, `this` prints) and depends on optional C modules.
    """
    source = f"stdlib:{relpath}"
    try:
        tree = ast.parse((root / relpath).read_bytes(), filename=relpath)
    except (SyntaxError, ValueError, OSError) as exc:
        return [reject_row(f"pydocs:{relpath}", source, schema.UNPARSABLE_MODULE, str(exc))]
    rows = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    rows.append(doc_row(f"pydocs:{relpath}:{name}", source, doc))
                visit(child, name + ".")

    doc = ast.get_docstring(tree)
    if doc:
        rows.append(doc_row(f"pydocs:{relpath}", source, doc))
    visit(tree, "")
    return rows


# ------------------------------------------------------------------------- files


def _decode(data: bytes, what: str) -> tuple[str | None, str]:
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError as exc:
        return None, f"{what}: {exc.reason} at byte {exc.start}"


def _utf16(data: bytes) -> bool:
    # Windows editors save "Unicode" text as UTF-16 with a byte-order mark; it is text.
    return data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))


def read_text_file(root: Path, relpath: str) -> list[dict]:
    name = printable(relpath)
    data = (root / relpath).read_bytes()
    if not data.strip():
        return [reject_row(name, name, schema.EMPTY_FILE, f"{len(data)} bytes")]
    text, error = _decode_utf16(data) if _utf16(data) else _decode(data, "file")
    if text is None:
        return [reject_row(name, name, schema.UNDECODABLE, error)]
    return [doc_row(name, name, text.removeprefix("\ufeff"))]


def _decode_utf16(data: bytes) -> tuple[str | None, str]:
    try:
        return data.decode("utf-16"), ""
    except UnicodeDecodeError as exc:
        return None, f"file (UTF-16 by its byte-order mark): {exc.reason} at byte {exc.start}"


def _jsonl_lines(data: bytes) -> list[tuple[int, str | None, str]]:
    """(line number, text or None, decode error) per non-blank line.

    UTF-8 lines are decoded one by one, so one bad line rejects that line only; a UTF-8
    byte-order mark before the first record and CRLF line ends are not part of any record.
    """
    if _utf16(data):
        text, error = _decode_utf16(data)
        if text is None:
            return [(1, None, error)]
        return [
            (n, line.removeprefix("\ufeff"), "")
            for n, line in enumerate(text.split("\n"), start=1)
            if line.strip()
        ]
    data = data.removeprefix(codecs.BOM_UTF8)
    out = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if raw.strip():  # blank lines separate nothing in JSONL; they are not records
            line, error = _decode(raw, f"line {lineno}")
            out.append((lineno, line, error))
    return out


def read_jsonl_file(root: Path, relpath: str, cfg: SourceConfig) -> list[dict]:
    name = printable(relpath)
    data = (root / relpath).read_bytes()
    if not data.strip():
        return [reject_row(name, name, schema.EMPTY_FILE, f"{len(data)} bytes")]
    rows = []
    for lineno, line, error in _jsonl_lines(data):
        id_ = f"{name}:{lineno}"
        if line is None:
            rows.append(reject_row(id_, name, schema.UNDECODABLE, error))
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            # RecursionError: a line of ~100k nested brackets is valid JSON Python cannot parse.
            detail = exc if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            rows.append(reject_row(id_, name, schema.MALFORMED_JSON, f"line {lineno}: {detail}"))
            continue
        rows.append(guarded_record_row(record, id_, name, cfg))
    if not rows:  # a byte-order mark and blank lines: an empty file, said so like one
        return [reject_row(name, name, schema.EMPTY_FILE, f"{len(data)} bytes, no records")]
    return rows


def read_parquet_file(root: Path, relpath: str, cfg: SourceConfig) -> list[dict]:
    import pyarrow.parquet as pq

    name = printable(relpath)
    try:
        table = pq.read_table(root / relpath)
        records = table.to_pylist()  # invalid UTF-8 in a string column fails here
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        return [reject_row(name, name, schema.UNREADABLE_FILE, f"{type(exc).__name__}: {exc}")]
    if not records:
        return [reject_row(name, name, schema.EMPTY_FILE, "0 rows")]
    return [
        guarded_record_row(record, f"{name}:{i}", name, cfg) for i, record in enumerate(records)
    ]


def read_file(root: Path, relpath: str, cfg: SourceConfig) -> list[dict]:
    suffix = Path(relpath).suffix.lower()
    name = printable(relpath)
    try:
        if suffix in TEXT_SUFFIXES:
            return read_text_file(root, relpath)
        if suffix == ".jsonl":
            return read_jsonl_file(root, relpath, cfg)
        if suffix == ".parquet":
            return read_parquet_file(root, relpath, cfg)
    except OSError as exc:
        return [reject_row(name, name, schema.UNREADABLE_FILE, str(exc))]
    supported = ", ".join(TEXT_SUFFIXES + RECORD_SUFFIXES)
    return [
        reject_row(name, name, schema.UNSUPPORTED_FILE, f"'{suffix}' is not one of {supported}")
    ]


# ------------------------------------------------------------------------ blocks


class ReadUnits(schema.Step):
    """Block: a batch of units (column `unit`) -> document rows (DOC_COLUMNS)."""

    def __init__(self, cfg: SourceConfig, endpoint_url: str | None = None):
        self.cfg = cfg
        self.endpoint_url = endpoint_url
        # A storage URI is read where it lies: the task fetches its own units, so a Ray task
        # on another node never opens a path on the driver's disk.
        self.remote = cfg.kind == "files" and storage.is_remote(cfg.path)
        if self.remote:
            self.root_uri = remote_units(cfg.path or "", endpoint_url)[0]
        else:
            self.root = stdlib_root() if cfg.kind == "pydocs" else files_root(cfg)

    def read(self, unit: str | bytes) -> list[dict]:
        # Units travel as bytes (`unit_rows`): a file name that is not UTF-8 cannot be an
        # Arrow string, and its bytes are what opens the file.
        unit = os.fsdecode(unit)
        if self.remote:
            with tempfile.TemporaryDirectory(prefix="flywheel-unit-") as tmp:
                try:
                    storage.stage_in(
                        f"{self.root_uri}/{unit}",
                        (Path(tmp) / unit).parent,
                        "data.source.path",
                        self.endpoint_url,
                    )
                except Exception as exc:  # one unit unreadable: its reject, as for a path
                    name = printable(unit)
                    return [reject_row(name, name, schema.UNREADABLE_FILE, str(exc))]
                return read_file(Path(tmp), unit, self.cfg)
        try:
            if self.cfg.kind == "pydocs":
                if unit == TOPICS_UNIT:
                    return read_topics()
                return read_module_docstrings(self.root, unit)
            return read_file(self.root, unit, self.cfg)
        except Exception as exc:  # a reader bug or an input it does not foresee: one unit's rows
            return [reject_row(unit, unit, schema.UNREADABLE_FILE, f"{type(exc).__name__}: {exc}")]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = [row for unit in batch["unit"] for row in self.read(unit)]
        return schema.doc_frame(rows)


def unit_rows(units: list[str]) -> list[dict]:
    """Items for `ray.data.from_items`: one row per unit, the name as bytes (see ReadUnits)."""
    return [{"unit": os.fsencode(u)} for u in units]


class RecordsToDocs(schema.Step):
    """Block: a batch of `datasets` records (+ `__row`) -> document rows."""

    def __init__(self, cfg: SourceConfig, source: str):
        self.cfg = cfg
        self.source = source

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows_idx = batch.pop("__row")
        records = batch.to_dict("records")
        if self.cfg.text_field not in batch.columns:
            # A column that is absent from the dataset: every record lacks the text.
            for record in records:
                record.pop(self.cfg.text_field, None)
        rows = [
            guarded_record_row(_plain(rec), f"{self.source}:{i}", self.source, self.cfg)
            for i, rec in zip(rows_idx, records, strict=True)
        ]
        return schema.doc_frame(rows)


def _plain(record: dict) -> dict:
    # pandas turns missing strings into NaN/None; keep None as "no value".
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in record.items()}


def hf_source_name(cfg: SourceConfig) -> str:
    return f"hf:{cfg.path}[{cfg.hf_split}]"


def load_hf_table(cfg: SourceConfig):
    """A `datasets` dataset (save_to_disk path, or a hub name where a network exists) as Arrow."""
    import datasets
    import pyarrow as pa

    path = cfg.path or ""
    try:
        if Path(path).exists():
            loaded = datasets.load_from_disk(path)
            if isinstance(loaded, datasets.DatasetDict):
                if cfg.hf_split not in loaded:
                    raise DataError(
                        f"data.source.hf_split: '{cfg.hf_split}' not in {path} "
                        f"(splits: {', '.join(loaded)})"
                    )
                loaded = loaded[cfg.hf_split]
        else:
            loaded = datasets.load_dataset(path, split=cfg.hf_split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types (FileNotFoundError, ConnectionError, ...)
        raise DataError(f"data.source.path: cannot load dataset '{path}': {exc}") from None
    if cfg.max_docs:
        loaded = loaded.select(range(min(cfg.max_docs, len(loaded))))
    table = loaded.with_format("arrow")[:]
    return table.append_column("__row", pa.array(range(table.num_rows), type=pa.int64()))
