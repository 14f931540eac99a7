"""Issue 24, rule 2: one policy for text (flywheel.text_policy), applied by each reader.

C0 controls other than tab, LF and CR, lone surrogates and non-characters reject the
record with a reason, the same for the data stage's documents (every format goes through
`sources.doc_row`), the SFT stage's prompts, responses and turns, and the monitor's window
records (left out and counted). Nothing of the class reaches tokenized text.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel import artifacts
from flywheel.config import DriftConfig, SourceConfig, load_profile
from flywheel.data import schema, sources
from flywheel.drift import load_window
from flywheel.sft import records as R
from flywheel.text_policy import (
    ALLOWED_CONTROLS,
    CONTROL_CHARACTER,
    INVALID_UNICODE,
    NONCHARACTER,
    text_problem,
)

CONTROLS = [chr(c) for c in range(0x20) if chr(c) not in ALLOWED_CONTROLS]
NONCHARACTERS = [chr(c) for c in range(0xFDD0, 0xFDF0)] + [
    chr(p * 0x10000 + low) for p in range(17) for low in (0xFFFE, 0xFFFF)
]


@pytest.mark.parametrize(
    ("char", "reason"),
    [(c, CONTROL_CHARACTER) for c in CONTROLS]
    + [(chr(c), INVALID_UNICODE) for c in (0xD800, 0xDBFF, 0xDC00, 0xDFFF)]
    + [(c, NONCHARACTER) for c in NONCHARACTERS],
)
def test_each_refused_code_point_names_its_class_and_position(char, reason):
    assert text_problem(f"ab{char}cd{char}") == (reason, f"U+{ord(char):04X} at character 2")


@pytest.mark.parametrize(
    "text", ["tab\tline\nreturn\r", "del\x7f c1\x85", "é ß 中文 😀 \ufeff \ufffd \U000e0001", ""]
)
def test_text_people_write_passes(text):
    assert text_problem(text) is None


# ------------------------------------------------------------------ data stage


def _reasons(rows: list[dict]) -> list[str]:
    return [r["reason"] for r in rows]


def test_the_data_stage_readers_reject_by_the_policy(tmp_path):
    cfg = SourceConfig(kind="files", path=str(tmp_path))
    lines = [
        {"text": "clean text"},
        {"text": "NUL \u0000 from a JSON escape"},
        {"text": "escape \u001b[31m red"},
        {"text": "non-character \ufffe"},
        {"text": "plane 16 \U0010ffff"},
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rows = sources.read_jsonl_file(tmp_path, "a.jsonl", cfg)
    assert _reasons(rows) == ["", CONTROL_CHARACTER, CONTROL_CHARACTER, NONCHARACTER, NONCHARACTER]
    assert rows[1]["detail"] == "'text': U+0000 at character 4"
    assert all(r["dropped_by"] == schema.READ for r in rows[1:])

    (tmp_path / "b.txt").write_bytes(b"raw NUL \x00 in a text file")
    (row,) = sources.read_text_file(tmp_path, "b.txt")
    assert (row["reason"], row["detail"]) == (CONTROL_CHARACTER, "text: U+0000 at character 8")

    pq.write_table(pa.Table.from_pylist(lines), tmp_path / "c.parquet")
    rows = sources.read_parquet_file(tmp_path, "c.parquet", cfg)
    assert _reasons(rows) == ["", CONTROL_CHARACTER, CONTROL_CHARACTER, NONCHARACTER, NONCHARACTER]


def test_a_datasets_record_and_a_document_row_follow_the_same_policy():
    cfg = SourceConfig(kind="files", path=".")
    assert sources.record_row({"text": "a\x08b"}, "1", "hf", cfg)["reason"] == CONTROL_CHARACTER
    assert sources.doc_row("1", "pydocs", "a\x00b")["reason"] == CONTROL_CHARACTER


# ------------------------------------------------------------------- SFT stage


@pytest.mark.parametrize(
    ("record", "reason", "detail"),
    [
        (
            {"prompt": "What\x00?", "response": "ok"},
            CONTROL_CHARACTER,
            "'prompt': U+0000 at character 4",
        ),
        ({"prompt": "Q?", "response": "\ufdd0"}, NONCHARACTER, "'response': U+FDD0 at character 0"),
    ],
)
def test_instruction_fields_follow_the_policy(record, reason, detail):
    good, bad = R.parse_records([record], "instruction", load_profile().data.columns)
    assert good == [] and [(b.reason, b.detail) for b in bad] == [(reason, detail)]


def test_chat_turns_follow_the_policy():
    record = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "lone \udc80 surrogate"},
        ]
    }
    good, bad = R.parse_records([record], "chat", load_profile().data.columns)
    assert good == [] and bad[0].reason == INVALID_UNICODE
    assert bad[0].detail == "turn 1 'content': U+DC80 at character 5"


def test_the_sft_stage_counts_policy_rejects_in_the_manifest(state_dir, tmp_path):
    from flywheel.data.stage import prepare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = [{"prompt": f"What is {w}?", "response": f"{w} is a word."} for w in "abcdefgh"]
    bad = [
        {"prompt": "NUL\u0000?", "response": "x"},
        {"prompt": "ok?", "response": "bell \u0007"},
    ]
    (corpus / "a.jsonl").write_text("\n".join(json.dumps(r) for r in good + bad) + "\n")
    profile = load_profile(
        None,
        [
            "data.format=instruction",
            "data.source.kind=files",
            f"data.source.path={corpus}",
            "data.block_size=64",
            "model.context=64",
            "data.tokenizer.vocab_size=300",
        ],
    )
    stats = prepare(profile, tmp_path / "ds")
    manifest = artifacts.DatasetManifest.read(tmp_path / "ds")
    assert manifest.rejects.by_reason == {CONTROL_CHARACTER: 2} == stats.rejected
    rejects = (tmp_path / "ds" / artifacts.REJECTS).read_text()
    assert "U+0000" in rejects and "U+0007" in rejects
    vocab = (tmp_path / "ds" / artifacts.TOKENIZER_DIR / "tokenizer.json").read_text()
    assert "\\u0000" not in vocab and "\\u0007" not in vocab


# ---------------------------------------------------------------- monitor window


def test_the_window_leaves_out_and_counts_what_the_policy_refuses(tmp_path):
    window = tmp_path / "w.jsonl"
    good = [json.dumps({"text": f"record {i}"}) for i in range(5)]
    bad = [json.dumps({"text": "NUL \u0000"}), json.dumps({"text": "\ufffe"})]
    window.write_bytes(("\n".join(good + bad) + "\n").encode() + b'{"text": "\xff\xfe"}\n')
    frame = load_window(window, DriftConfig(min_rows=5))
    assert frame["text"].tolist() == [f"record {i}" for i in range(5)]
    assert frame.attrs["window"]["records"] == 8
    assert frame.attrs["window"]["rejected"] == {
        CONTROL_CHARACTER: 1,
        NONCHARACTER: 1,
        "undecodable_bytes": 1,
    }


def test_a_window_left_too_small_by_the_policy_says_so(tmp_path):
    from flywheel.errors import DataError

    window = tmp_path / "w.jsonl"
    window.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": "\u0001"}) + "\n")
    with pytest.raises(DataError, match=r"fewer than drift.min_rows=2.*1 left out: 1 control_ch"):
        load_window(window, DriftConfig(min_rows=2))


def test_policy_reasons_are_the_data_stage_reasons():
    assert (schema.CONTROL_CHARACTER, schema.NONCHARACTER, schema.INVALID_UNICODE) == (
        CONTROL_CHARACTER,
        NONCHARACTER,
        INVALID_UNICODE,
    )
