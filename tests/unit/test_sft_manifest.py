"""The dataset manifest says what its rows are (`format`), so readers can branch on it."""

from __future__ import annotations

import json

import pytest

from flywheel import artifacts as A
from flywheel.errors import DataError


def _write(root, data: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / A.MANIFEST).write_text(json.dumps(data))


def test_a_manifest_without_format_is_raw_text(tmp_path):
    _write(tmp_path, {"schema_version": A.SCHEMA_VERSION, "content_hash": "ab"})
    assert A.DatasetManifest.read(tmp_path).format == "text"


def test_format_round_trips_and_a_bad_one_names_the_field(tmp_path):
    _write(tmp_path, {"schema_version": A.SCHEMA_VERSION, "content_hash": "ab", "format": "chat"})
    manifest = A.DatasetManifest.read(tmp_path)
    assert manifest.format == "chat"
    (tmp_path / "again").mkdir()
    manifest.write(tmp_path / "again")
    assert A.DatasetManifest.read(tmp_path / "again").format == "chat"
    _write(tmp_path, {"schema_version": A.SCHEMA_VERSION, "content_hash": "ab", "format": "xml"})
    with pytest.raises(DataError, match=r"manifest.json: format: "):
        A.DatasetManifest.read(tmp_path)
