"""Instruction and chat records: the good ones parse, every bad one is rejected with its reason."""

from __future__ import annotations

import numpy as np
import pytest

from flywheel.config import ColumnsConfig
from flywheel.sft import records as R

COLS = ColumnsConfig()
ALPACA = ColumnsConfig(prompt="instruction", input="input", response="output")
SHAREGPT = ColumnsConfig(messages="conversations", role="from", content="value")


def one(record, fmt="chat", cols=COLS):
    good, rejects = R.parse_records([record], fmt, cols)
    assert len(good) + len(rejects) == 1
    return good[0] if good else rejects[0]


def chat(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def test_alpaca_record_with_input_becomes_one_exchange():
    conv = one(
        {"instruction": "Sum these.", "input": "2 and 3", "output": "5"}, "instruction", ALPACA
    )
    assert conv.turns == (R.Turn("user", "Sum these.\n\n2 and 3"), R.Turn("assistant", "5"))


def test_instruction_without_input_or_with_empty_input_is_the_prompt_alone():
    for record in (
        {"prompt": "Hi?", "response": "Hello."},
        {"prompt": "Hi?", "input": " ", "response": "Hello."},
    ):
        assert one(record, "instruction").turns[0] == R.Turn("user", "Hi?")


def test_instruction_system_column_leads():
    cols = ColumnsConfig(system="sys")
    conv = one({"prompt": "Q", "response": "A", "sys": "Be brief."}, "instruction", cols)
    assert [t.role for t in conv.turns] == ["system", "user", "assistant"]


def test_chat_record_keeps_its_turns_in_order():
    conv = one(
        chat(
            ("system", "S"),
            ("user", "U1"),
            ("assistant", "A1"),
            ("user", "U2"),
            ("assistant", "A2"),
        )
    )
    assert [t.content for t in conv.turns] == ["S", "U1", "A1", "U2", "A2"]


def test_sharegpt_columns_and_role_names():
    record = {
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    }
    assert [t.role for t in one(record, cols=SHAREGPT).turns] == ["user", "assistant"]


def test_messages_as_numpy_array_from_parquet():
    record = {
        "messages": np.array(
            [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
        )
    }
    assert len(one(record).turns) == 2


def test_ids_name_rejects():
    good, rejects = R.parse_records(
        [chat(("user", "Q")), chat(("user", "Q"), ("assistant", "A"))], "chat", COLS, ids=["a", "b"]
    )
    assert [c.id for c in good] == ["b"] and [r.id for r in rejects] == ["a"]


@pytest.mark.parametrize(
    ("record", "fmt", "reason", "detail"),
    [
        ("just text", "chat", R.NOT_AN_OBJECT, "str"),
        ({"response": "A"}, "instruction", R.MISSING_FIELD, "'prompt'"),
        ({"prompt": "Q"}, "instruction", R.MISSING_FIELD, "'response'"),
        ({"prompt": "Q", "response": 5}, "instruction", R.NON_STRING_FIELD, "int"),
        (
            {"prompt": "Q", "input": ["x"], "response": "A"},
            "instruction",
            R.NON_STRING_FIELD,
            "'input'",
        ),
        ({"prompt": "  ", "response": "A"}, "instruction", R.EMPTY_PROMPT, "'prompt'"),
        ({"prompt": "Q", "response": "\n"}, "instruction", R.EMPTY_RESPONSE, "'response'"),
        ({}, "chat", R.MISSING_FIELD, "'messages'"),
        ({"messages": "user: hi"}, "chat", R.MESSAGES_NOT_A_LIST, "str"),
        ({"messages": ["hi"]}, "chat", R.MALFORMED_TURN, "turn 0"),
        (
            {"messages": [{"content": "Q"}, {"role": "assistant", "content": "A"}]},
            "chat",
            R.MISSING_ROLE,
            "turn 0",
        ),
        (chat(("user", "Q"), ("bot", "A")), "chat", R.UNKNOWN_ROLE, "'bot'"),
        (
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "A"}]},
            "chat",
            R.MISSING_FIELD,
            "turn 0",
        ),
        ({"messages": [{"role": "user", "content": 3}]}, "chat", R.NON_STRING_FIELD, "turn 0"),
        (chat(("user", "Q"), ("assistant", " ")), "chat", R.EMPTY_RESPONSE, "turn 1"),
        (chat(("user", ""), ("assistant", "A")), "chat", R.EMPTY_PROMPT, "turn 0"),
        (chat(("user", "Q")), "chat", R.NO_RESPONSE, "no assistant"),
        (chat(("system", "S")), "chat", R.NO_RESPONSE, "no assistant"),
        (chat(("assistant", "A"), ("user", "Q")), "chat", R.BAD_TURN_ORDER, "turn 0 is assistant"),
        (
            chat(("user", "Q"), ("user", "Q2"), ("assistant", "A")),
            "chat",
            R.BAD_TURN_ORDER,
            "turn 1 is user",
        ),
        (
            chat(("user", "Q"), ("system", "S"), ("assistant", "A")),
            "chat",
            R.BAD_TURN_ORDER,
            "system turn after",
        ),
        (
            chat(("user", "Q"), ("assistant", "A"), ("user", "Q2")),
            "chat",
            R.BAD_TURN_ORDER,
            "last turn",
        ),
    ],
)
def test_bad_record_rejected_with_reason(record, fmt, reason, detail):
    rejected = one(record, fmt)
    assert isinstance(rejected, R.Reject), rejected
    assert rejected.reason == reason
    assert detail in rejected.detail


def test_good_and_bad_counted_together():
    rows = [
        chat(("user", "Q"), ("assistant", "A")),
        {},
        chat(("user", "Q")),
        chat(("user", "Q"), ("assistant", "B")),
    ]
    good, rejects = R.parse_records(rows, "chat", COLS)
    assert [c.id for c in good] == ["0", "3"]
    assert [(r.id, r.reason) for r in rejects] == [("1", R.MISSING_FIELD), ("2", R.NO_RESPONSE)]
