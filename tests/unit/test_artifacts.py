"""The dataset manifest: one typed reader and writer for `manifest.json`."""

from __future__ import annotations

import json

import pytest

from flywheel import artifacts as A
from flywheel.errors import DataError


def _write(root, data) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / A.MANIFEST).write_text(data if isinstance(data, str) else json.dumps(data))


def test_a_minimal_manifest_reads_with_its_identity(tmp_path):
    _write(tmp_path, {"schema_version": A.SCHEMA_VERSION, "content_hash": "ab12"})
    manifest = A.DatasetManifest.read(tmp_path)
    assert manifest.content_hash == "ab12"
    assert manifest.block_size is None and manifest.splits == {}


def test_a_round_trip_keeps_fields_the_model_does_not_name(tmp_path):
    _write(
        tmp_path,
        {
            "schema_version": A.SCHEMA_VERSION,
            "content_hash": "ab12",
            "block_size": 64,
            "splits": {"train": {"docs": 3, "files": ["train/part-0.parquet"], "extra": 1}},
            "newer_field": {"x": 1},
        },
    )
    manifest = A.DatasetManifest.read(tmp_path)
    assert manifest.splits["train"].files == ["train/part-0.parquet"]
    manifest.config["source"] = {"path": "s3://bucket/corpus"}
    manifest.write(tmp_path)
    back = json.loads((tmp_path / A.MANIFEST).read_text())
    assert back["newer_field"] == {"x": 1} and back["splits"]["train"]["extra"] == 1
    assert back["config"]["source"]["path"] == "s3://bucket/corpus"
    assert A.DatasetManifest.read(tmp_path) == manifest


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a dataset manifest"),
        ({"schema_version": 99, "content_hash": "x"}, "schema_version 99"),
        ({"schema_version": A.SCHEMA_VERSION}, "content_hash: Field required"),
        (
            {
                "schema_version": A.SCHEMA_VERSION,
                "content_hash": "x",
                "splits": {"train": {"docs": "many"}},
            },
            "splits.train.docs:",
        ),
    ],
)
def test_a_malformed_manifest_is_one_line_naming_the_file_and_field(tmp_path, content, expected):
    _write(tmp_path, content)
    with pytest.raises(DataError) as err:
        A.DatasetManifest.read(tmp_path)
    msg = str(err.value)
    assert msg.startswith(str(tmp_path / A.MANIFEST)) and expected in msg and "\n" not in msg


def test_a_directory_without_a_manifest_is_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match="not a prepared dataset"):
        A.DatasetManifest.read(tmp_path)


def test_an_absent_report_reads_as_none_and_a_present_one_as_its_model(tmp_path):
    class Report(A.JsonFile):
        score: float

    A.write_absent(tmp_path / "absent.json")
    assert A.load_unless_absent(Report, tmp_path / "absent.json") is None
    Report(score=1.5).save(tmp_path / "present.json")
    assert A.load_unless_absent(Report, tmp_path / "present.json") == Report(score=1.5)
    (tmp_path / "other.json").write_text('{"absent": false}')
    with pytest.raises(DataError, match=r"other\.json: not a Report"):
        A.load_unless_absent(Report, tmp_path / "other.json")
    with pytest.raises(DataError, match=r"missing\.json: Report not found"):
        A.load_unless_absent(Report, tmp_path / "missing.json")
