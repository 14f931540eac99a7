"""Drift input handling and descriptors: fast, no Evidently run."""

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drift_corpora import pydoc_paragraphs, train_tokenizer, write_reference, write_window

from flywheel.cli.main import main
from flywheel.config import DriftConfig, load_profile
from flywheel.drift import (
    OovCounter,
    check_drift,
    describe,
    load_reference,
    load_window,
    non_ascii_share,
)
from flywheel.errors import DataError

CFG = DriftConfig(min_rows=5, max_rows=100)


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _stamped_dir(tmp_path: Path) -> Path:
    d = tmp_path / "w"
    d.mkdir()
    _jsonl(
        d / "a.jsonl",
        [{"text": f"old {i}", "timestamp": f"2024-01-0{i + 1}T00:00:00Z"} for i in range(5)],
    )
    pd.DataFrame(
        {
            "text": [f"new {i}" for i in range(5)],
            "timestamp": [f"2024-02-0{i + 1}T00:00:00Z" for i in range(5)],
        }
    ).to_parquet(d / "b.parquet")
    (d / "notes.txt").write_text("ignored")
    return d


# 2024-02-05T12:00Z: half a day after the newest record of _stamped_dir.
NOW = pd.Timestamp("2024-02-05T12:00:00Z").timestamp()


def test_window_from_a_directory_of_jsonl_and_parquet_in_time_order(tmp_path):
    frame = load_window(_stamped_dir(tmp_path), DriftConfig(min_rows=5, max_rows=100))
    assert frame["text"].tolist() == [f"old {i}" for i in range(5)] + [f"new {i}" for i in range(5)]
    assert frame["location"].tolist()[:2] == [f"{tmp_path}/w/a.jsonl:1", f"{tmp_path}/w/a.jsonl:2"]
    assert frame.attrs["window"] == {
        "source": str(tmp_path / "w"),
        "records": 10,
        "rejected": {},
        "recent": 10,
        "rows": 10,
        "seed": 0,
        "window_hours": None,
    }


def test_more_than_max_rows_is_a_seeded_uniform_sample_in_time_order(tmp_path):
    d = _stamped_dir(tmp_path)
    cfg = DriftConfig(min_rows=5, max_rows=6)
    frame = load_window(d, cfg)
    texts = frame["text"].tolist()
    assert len(texts) == 6 and frame.attrs["window"]["rows"] == 6
    assert frame.attrs["window"]["records"] == 10
    # not just the latest 6: a uniform sample reaches into the older file too
    assert any(t.startswith("old") for t in texts)
    assert list(frame["timestamp"]) == sorted(frame["timestamp"])
    assert load_window(d, cfg)["text"].tolist() == texts  # the same seed, the same sample
    other = load_window(d, DriftConfig(min_rows=5, max_rows=6, seed=1))["text"].tolist()
    assert other != texts


def test_window_hours_keeps_only_recent_records(tmp_path):
    d = _stamped_dir(tmp_path)
    # 48 h before NOW reaches back to 2024-02-03T12:00: new 3, new 4
    cfg = DriftConfig(min_rows=2, window_hours=48)
    frame = load_window(d, cfg, now=NOW)
    assert frame["text"].tolist() == ["new 3", "new 4"]
    assert frame.attrs["window"]["recent"] == 2 and frame.attrs["window"]["records"] == 10
    with pytest.raises(DataError, match=r"2 records in the last 48 h, fewer than drift.min_rows=5"):
        load_window(d, DriftConfig(min_rows=5, window_hours=48), now=NOW)
    with pytest.raises(
        DataError, match=r"no record in the last 1 h .*latest timestamp: 2024-02-05T00:00:00"
    ):
        load_window(d, DriftConfig(min_rows=1, window_hours=1), now=NOW)


def test_window_hours_needs_a_timestamp_field(tmp_path):
    path = _jsonl(tmp_path / "w.jsonl", [{"text": f"doc {i}"} for i in range(8)])
    with pytest.raises(DataError, match=r"window_hours=6 needs a timestamp.*'timestamp'"):
        load_window(path, DriftConfig(min_rows=5, window_hours=6))


def test_custom_text_field_and_no_timestamp(tmp_path):
    path = _jsonl(tmp_path / "w.jsonl", [{"body": f"doc {i}"} for i in range(8)])
    frame = load_window(path, DriftConfig(text_field="body", min_rows=5, max_rows=3))
    assert len(frame) == 3
    texts = frame["text"].tolist()
    assert texts == sorted(texts, key=lambda t: int(t.split()[1]))  # file order kept


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([], "is empty"),
        (
            [{"message": "hi"}] * 10,
            r"10 of 10 records have no text in field 'text'.*fields seen: message",
        ),
        ([{"text": "ok"}] * 9 + [{"text": None}], r"1 of 10 records have no text.*w.jsonl:10"),
        ([{"text": "   "}] * 10, "have no text"),
        ([{"text": "ok"}] * 4, r"4 records, fewer than drift.min_rows=5"),
    ],
)
def test_bad_windows_are_data_errors_naming_the_problem(tmp_path, records, message):
    path = _jsonl(tmp_path / "w.jsonl", records)
    with pytest.raises(DataError, match=message):
        load_window(path, CFG)


def test_missing_window_broken_json_and_empty_directory(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_window(tmp_path / "nope.jsonl", CFG)
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_window(tmp_path / "bad.jsonl", CFG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.jsonl/\.json/\.parquet files"):
        load_window(tmp_path / "empty", CFG)


def test_reference_needs_a_text_column_and_enough_rows(tmp_path):
    pd.DataFrame({"body": ["x"] * 10}).to_parquet(tmp_path / "r.parquet")
    with pytest.raises(DataError, match="no 'text' column"):
        load_reference(tmp_path / "r.parquet", CFG)
    write_reference(["a doc"] * 3, tmp_path / "s.parquet")
    with pytest.raises(DataError, match="3 documents, fewer than"):
        load_reference(tmp_path / "s.parquet", CFG)
    with pytest.raises(DataError, match="not found"):
        load_reference(tmp_path / "none.parquet", CFG)
    write_reference([f"doc {i}" for i in range(500)], tmp_path / "big.parquet")
    assert len(load_reference(tmp_path / "big.parquet", CFG)) == 100  # sampled to max_rows


def test_descriptors():
    assert non_ascii_share("abcé") == 0.25 and non_ascii_share("") == 0.0
    frame = describe(["hello", "héllo wörld"])
    assert frame["length"].tolist() == [5.0, 11.0]
    assert "oov_share" not in frame.columns


def test_oov_counts_shattered_words_and_unknown_tokens():
    pieces = {" the": [1], " tokenizer": [2, 3], " zyzzyva": [4, 5, 6, 7], " unk": [0]}
    calls: list[list[str]] = []

    def encode(words):
        calls.append(words)
        return [pieces[w] for w in words]

    oov = OovCounter(encode, unk_id=0, min_tokens=3)
    assert oov.share("the tokenizer zyzzyva unk 42 !!") == 0.5  # zyzzyva (4 pieces) and unk
    assert oov.share("the the") == 0.0
    assert calls == [[" the", " tokenizer", " unk", " zyzzyva"]]  # each word encoded once
    assert oov.share("1234 ...") == 0.0


def test_oov_under_a_real_byte_level_bpe(tmp_path):
    paras = pydoc_paragraphs()
    oov = OovCounter.from_dir(train_tokenizer(paras[:1200], tmp_path / "tok", vocab_size=1024))
    assert oov.unk_id is None  # byte-level: no unknown token, so shattering is the signal
    in_domain = oov.share(" ".join(paras[1200:1210]))  # held out, same kind: ~0.2
    legal = oov.share(
        "Licensee hereby indemnifies the Licensor against liabilities whatsoever, "
        "notwithstanding any warranties of merchantability"
    )
    assert in_domain < 0.3 and legal > 2 * in_domain


def test_cli_bad_window_exits_1_with_one_line(state_dir, tmp_path, capsys):
    ref = write_reference([f"doc {i}" for i in range(60)], tmp_path / "text" / "reference.parquet")
    window = write_window(["only a few"] * 3, tmp_path / "w.jsonl")
    with pytest.raises(SystemExit) as exit_:
        main(["drift", "check", "--window", str(window), "--reference", str(ref)])
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert "fewer than drift.min_rows=50" in err and len(err.strip().splitlines()) == 1


def test_check_drift_refuses_bad_input_before_running_evidently(state_dir, tmp_path):
    profile = load_profile(None, [])
    ref = write_reference([f"doc {i}" for i in range(60)], tmp_path / "reference.parquet")
    with pytest.raises(DataError, match="is empty"):
        check_drift(profile, _jsonl(tmp_path / "w.jsonl", []), ref)


def test_a_uri_window_names_its_records_by_uri(tmp_path):
    path = _jsonl(tmp_path / "w.jsonl", [{"text": f"doc {i}"} for i in range(5)])
    frame = load_window(f"file://{tmp_path}/", DriftConfig(min_rows=5))
    assert frame["location"].tolist()[0] == f"file://{path}:1"
    assert frame.attrs["window"]["source"] == f"file://{tmp_path}/"
