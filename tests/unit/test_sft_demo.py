"""The demo instruction set: real Python documentation, every record valid, deterministic."""

from __future__ import annotations

import json

from flywheel.config import ColumnsConfig
from flywheel.sft import demo
from flywheel.sft.records import parse_records


def test_demo_records_are_real_valid_and_stable(tmp_path):
    records = demo.instruction_records()
    assert len(records) > 150
    assert records == demo.instruction_records()
    by_prompt = {r["prompt"]: r["response"] for r in records}
    assert (
        by_prompt["What does `json.dumps` do?"] == "Serialize ``obj`` to a JSON formatted ``str``."
    )
    assert by_prompt['Explain the "with" statement.'].startswith(
        'The "with" statement is used to wrap'
    )
    assert len(by_prompt) == len(records)  # each prompt once
    good, rejects = parse_records(records, "instruction", ColumnsConfig())
    assert rejects == [] and len(good) == len(records)
    n = demo.write_jsonl(tmp_path / "sft" / "train.jsonl")
    lines = (tmp_path / "sft" / "train.jsonl").read_text().splitlines()
    assert n == len(lines) == len(records) and json.loads(lines[0]) == records[0]


def test_signature_lines_and_titles_are_not_answers():
    assert demo._first_paragraph(
        "Title\n*****\n\n   grammar ::= x\n\nThe real answer is here, in prose."
    ) == ("The real answer is here, in prose.")
    assert demo._first_paragraph("short") is None
