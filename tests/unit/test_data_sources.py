"""Sources: every bad-input case becomes a reject row with its reason and source."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel.config import SourceConfig
from flywheel.data import schema, sources
from flywheel.errors import DataError


def _cfg(path: Path, **kw) -> SourceConfig:
    return SourceConfig(kind="files", path=str(path), **kw)


def _read(tmp_path: Path, name: str, data: bytes, **kw) -> pd.DataFrame:
    (tmp_path / name).write_bytes(data)
    return sources.ReadUnits(_cfg(tmp_path, **kw))(pd.DataFrame({"unit": [name]}))


def test_text_file_is_one_document(tmp_path):
    out = _read(tmp_path, "a.md", "\ufeffCafé au lait\n".encode())
    assert list(out.columns) == list(schema.DOC_COLUMNS)
    row = out.iloc[0]
    assert (row.id, row.source, row.reason, row.text) == ("a.md", "a.md", "", "Café au lait\n")
    assert row.timestamp is None
    assert len(row.digest) == 32


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("empty.txt", b"", schema.EMPTY_FILE),
        ("blank.txt", b"  \n\n", schema.EMPTY_FILE),
        ("latin1.txt", "déjà vu".encode("latin-1"), schema.UNDECODABLE),
        ("empty.jsonl", b"\n", schema.EMPTY_FILE),
        ("data.csv", b"a,b\n", schema.UNSUPPORTED_FILE),
        ("broken.parquet", b"PAR1 not really", schema.UNREADABLE_FILE),
    ],
)
def test_bad_files_are_rejected_with_reason(tmp_path, name, data, reason):
    out = _read(tmp_path, name, data)
    assert len(out) == 1
    row = out.iloc[0]
    assert (row.dropped_by, row.reason, row.source, row.id) == (schema.READ, reason, name, name)
    assert row.detail


def test_jsonl_lines_each_judged(tmp_path):
    lines = [
        json.dumps({"text": "good one", "id": "x1", "ts": "2024-01-02"}),
        "",  # blank line: not a record, not a reject
        "{not json",
        json.dumps({"body": "no text field"}),
        json.dumps({"text": 42}),
        json.dumps({"text": None}),
        json.dumps(["a", "list"]),
    ]
    data = "\n".join(lines).encode() + b"\n" + b'{"text": "caf\xe9"}\n'
    out = _read(tmp_path, "d.jsonl", data, id_field="id", timestamp_field="ts")
    assert out["reason"].tolist() == [
        "",
        schema.MALFORMED_JSON,
        schema.MISSING_TEXT,
        schema.NON_STRING_TEXT,
        schema.MISSING_TEXT,
        schema.NOT_AN_OBJECT,
        schema.UNDECODABLE,
    ]
    good = out.iloc[0]
    assert (good.id, good.timestamp, good.text) == ("x1", "2024-01-02", "good one")
    # Rejects are named by file and line, so a person can find them.
    assert out["id"].tolist()[1:] == [f"d.jsonl:{n}" for n in (3, 4, 5, 6, 7, 8)]
    assert "line 3" in out.iloc[1].detail
    assert "int" in out.iloc[3].detail
    assert set(out["source"]) == {"d.jsonl"}


def test_parquet_rows(tmp_path):
    table = pa.table({"text": ["hello world", None], "when": ["2024-05-01", None]})
    pq.write_table(table, tmp_path / "p.parquet")
    out = sources.ReadUnits(_cfg(tmp_path, timestamp_field="when"))(
        pd.DataFrame({"unit": ["p.parquet"]})
    )
    assert out["reason"].tolist() == ["", schema.MISSING_TEXT]
    assert out["timestamp"].tolist() == ["2024-05-01", None]
    assert out["id"].tolist() == ["p.parquet:0", "p.parquet:1"]


def test_parquet_with_non_string_column(tmp_path):
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    out = sources.ReadUnits(_cfg(tmp_path))(pd.DataFrame({"unit": ["n.parquet"]}))
    assert out["reason"].tolist() == [schema.NON_STRING_TEXT] * 2


def test_list_units_sorted_and_skips_hidden(tmp_path):
    for name in ("b.txt", "a/c.md", ".git/x.txt", "a/.hidden.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert sources.list_units(_cfg(tmp_path)) == ["a/c.md", "b.txt"]
    assert sources.list_units(_cfg(tmp_path / "b.txt")) == ["b.txt"]
    with pytest.raises(DataError, match="not a file or directory"):
        sources.list_units(_cfg(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no files"):
        sources.list_units(_cfg(tmp_path / "empty"))


def test_pydocs_units_and_documents():
    units = sources.list_units(SourceConfig(kind="pydocs"))
    assert units[0] == sources.TOPICS_UNIT
    assert "json/decoder.py" in units
    assert not any(u.startswith("test/") for u in units)
    assert units[1:] == sorted(units[1:])
    topics = sources.read_topics()
    assert len(topics) > 50 and all(r["source"] == sources.TOPICS_UNIT for r in topics)
    docs = sources.read_module_docstrings(sources.stdlib_root(), "json/decoder.py")
    ids = [d["id"] for d in docs]
    assert "pydocs:json/decoder.py" in ids
    assert "pydocs:json/decoder.py:JSONDecoder.decode" in ids


def test_module_docstrings_nested_and_unparsable(tmp_path):
    (tmp_path / "m.py").write_text(
        '"""Module doc."""\nclass A:\n    """Class doc."""\n    def f(self):\n        """Method doc."""\n'
    )
    (tmp_path / "bad.py").write_text("def (:\n")
    docs = sources.read_module_docstrings(tmp_path, "m.py")
    assert [d["id"] for d in docs] == ["pydocs:m.py", "pydocs:m.py:A", "pydocs:m.py:A.f"]
    bad = sources.read_module_docstrings(tmp_path, "bad.py")
    assert bad[0]["reason"] == schema.UNPARSABLE_MODULE


def test_records_to_docs_validates_each_record():
    cfg = SourceConfig(kind="hf", path="x", id_field="uid")
    batch = pd.DataFrame({"text": ["ok", None, 3.5], "uid": ["u0", None, "u2"], "__row": [0, 1, 2]})
    out = sources.RecordsToDocs(cfg, "hf:x[train]")(batch)
    assert out["reason"].tolist() == ["", schema.MISSING_TEXT, schema.NON_STRING_TEXT]
    assert out["id"].tolist() == ["u0", "hf:x[train]:1", "u2"]
    missing = sources.RecordsToDocs(SourceConfig(kind="hf", path="x", text_field="body"), "s")(
        pd.DataFrame({"text": ["a"], "__row": [0]})
    )
    assert missing["reason"].tolist() == [schema.MISSING_TEXT]


def test_digest_changes_with_content():
    a = sources.doc_row("1", "s", "text")
    assert a["digest"] == sources.doc_row("1", "s", "text")["digest"]
    assert a["digest"] != sources.doc_row("1", "s", "text!")["digest"]
    assert a["digest"] != sources.doc_row("2", "s", "text")["digest"]
