"""Instruction and chat records, parsed and checked before anything is tokenized.

Both formats end as a `Conversation`: an optional system turn, then user and assistant
turns alternating, ending with an assistant turn. An instruction record (alpaca style) is a
one-exchange conversation: the prompt (with its optional input appended) is the user turn
and the response the assistant turn, so one renderer and one masking rule serve both.

`parse_records` is pure: it returns the good conversations and, for every bad record, a
`Reject` with a reason from the constants below (each one produced by a unit test) and a
detail naming the field, so the data stage can write them to its rejects file and count them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from flywheel.config import ColumnsConfig
from flywheel.text_policy import text_problem

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
ROLES = (SYSTEM, USER, ASSISTANT)
# ShareGPT's role names, read as the usual ones so that dataset needs only a column map.
ROLE_ALIASES = {"human": USER, "gpt": ASSISTANT}

# Reject reasons (bad records). Each one has a unit test that produces it.
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
NON_STRING_FIELD = "non_string_field"
EMPTY_PROMPT = "empty_prompt"
EMPTY_RESPONSE = "empty_response"
MESSAGES_NOT_A_LIST = "messages_not_a_list"
MALFORMED_TURN = "malformed_turn"
MISSING_ROLE = "missing_role"
UNKNOWN_ROLE = "unknown_role"
BAD_TURN_ORDER = "bad_turn_order"
NO_RESPONSE = "no_response"
# Found when rendering (flywheel.sft.render), listed here so every reason lives in one place.
TEMPLATE_REJECTED = "template_rejected"
LONGER_THAN_CONTEXT = "longer_than_context"
NO_RESPONSE_TOKENS = "no_response_tokens"


@dataclass(frozen=True)
class Turn:
    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    id: str
    turns: tuple[Turn, ...]

    def as_messages(self) -> list[dict[str, str]]:
        """The turns in the shape `apply_chat_template` takes."""
        return [{"role": t.role, "content": t.content} for t in self.turns]


@dataclass(frozen=True)
class Reject:
    id: str
    reason: str
    detail: str = ""


class BadRecord(Exception):
    """A record that cannot become a sample: its reject reason and detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _text(record: Mapping[str, Any], key: str, what: str, required: bool = True) -> str | None:
    if key not in record or record[key] is None:
        if required:
            raise BadRecord(MISSING_FIELD, f"no '{key}' field ({what})")
        return None
    value = record[key]
    if not isinstance(value, str):
        raise BadRecord(NON_STRING_FIELD, f"'{key}' ({what}) is {type(value).__name__}, not text")
    _check_text(value, f"'{key}'")
    return value


def _check_text(value: str, where: str) -> None:
    # The text policy (flywheel.text_policy), on every string that becomes a sample's text.
    refused = text_problem(value)
    if refused:
        raise BadRecord(refused[0], f"{where}: {refused[1]}")


def _instruction(record: Mapping[str, Any], cols: ColumnsConfig) -> tuple[Turn, ...]:
    prompt = _text(record, cols.prompt, "data.columns.prompt")
    response = _text(record, cols.response, "data.columns.response")
    extra = _text(record, cols.input, "data.columns.input", required=False) if cols.input else None
    system = (
        _text(record, cols.system, "data.columns.system", required=False) if cols.system else None
    )
    if not prompt or not prompt.strip():
        raise BadRecord(EMPTY_PROMPT, f"'{cols.prompt}' is empty")
    if not response or not response.strip():
        raise BadRecord(EMPTY_RESPONSE, f"'{cols.response}' is empty")
    # Alpaca's own prompt puts the input after the instruction, separated by a blank line.
    user = f"{prompt}\n\n{extra}" if extra and extra.strip() else prompt
    turns = [Turn(SYSTEM, system)] if system and system.strip() else []
    return (*turns, Turn(USER, user), Turn(ASSISTANT, response))


def _as_list(value: Any) -> list[Any] | None:
    # Parquet/Arrow hands a list column to pandas as a numpy array: accept it as a list.
    if isinstance(value, (list, tuple)):
        return list(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        listed = value.tolist()
        return listed if isinstance(listed, list) else None
    return None


def _turn(i: int, raw: Any, cols: ColumnsConfig) -> Turn:
    if not isinstance(raw, Mapping):
        raise BadRecord(MALFORMED_TURN, f"turn {i} is {type(raw).__name__}, not an object")
    role = raw.get(cols.role)
    if role is None or (isinstance(role, str) and not role.strip()):
        raise BadRecord(MISSING_ROLE, f"turn {i} has no '{cols.role}' (data.columns.role)")
    if not isinstance(role, str) or ROLE_ALIASES.get(role, role) not in ROLES:
        raise BadRecord(UNKNOWN_ROLE, f"turn {i} role {role!r} is not one of {', '.join(ROLES)}")
    role = ROLE_ALIASES.get(role, role)
    content = raw.get(cols.content)
    if content is None:
        raise BadRecord(MISSING_FIELD, f"turn {i} has no '{cols.content}' (data.columns.content)")
    if not isinstance(content, str):
        raise BadRecord(NON_STRING_FIELD, f"turn {i} '{cols.content}' is {type(content).__name__}")
    _check_text(content, f"turn {i} '{cols.content}'")
    if not content.strip():
        reason = EMPTY_RESPONSE if role == ASSISTANT else EMPTY_PROMPT
        raise BadRecord(reason, f"turn {i} ({role}) is empty")
    return Turn(role, content)


def check_order(turns: Sequence[Turn]) -> None:
    """An optional leading system turn, then user/assistant alternating, assistant last.

    The order every common chat template accepts (several raise on anything else), and the
    one where each assistant turn answers the user turn before it.
    """
    body = list(turns[1:] if turns and turns[0].role == SYSTEM else turns)
    if not any(t.role == ASSISTANT for t in body):
        raise BadRecord(NO_RESPONSE, "no assistant turn: nothing to learn from")
    for i, turn in enumerate(body):
        expected = USER if i % 2 == 0 else ASSISTANT
        if turn.role != expected:
            at = i + (len(turns) - len(body))
            where = "a system turn after the first" if turn.role == SYSTEM else turn.role
            raise BadRecord(BAD_TURN_ORDER, f"turn {at} is {where}, expected {expected}")
    if body[-1].role != ASSISTANT:
        raise BadRecord(
            BAD_TURN_ORDER, "the last turn is user; a sample ends with an assistant turn"
        )


def _chat(record: Mapping[str, Any], cols: ColumnsConfig) -> tuple[Turn, ...]:
    if cols.messages not in record or record[cols.messages] is None:
        raise BadRecord(MISSING_FIELD, f"no '{cols.messages}' field (data.columns.messages)")
    raw = _as_list(record[cols.messages])
    if raw is None:
        kind = type(record[cols.messages]).__name__
        raise BadRecord(MESSAGES_NOT_A_LIST, f"'{cols.messages}' is {kind}, not a list of turns")
    turns = tuple(_turn(i, t, cols) for i, t in enumerate(raw))
    check_order(turns)
    return turns


def parse_records(
    records: Iterable[Any],
    fmt: Literal["instruction", "chat"],
    columns: ColumnsConfig,
    ids: Iterable[str] | None = None,
) -> tuple[list[Conversation], list[Reject]]:
    """Good conversations and, for each bad record, a reject with its reason.

    `ids` names the records (default: their position), so a reject points at its row.
    """
    good: list[Conversation] = []
    rejects: list[Reject] = []
    names = iter(ids) if ids is not None else None
    for i, record in enumerate(records):
        rid = next(names) if names is not None else str(i)
        try:
            if not isinstance(record, Mapping):
                raise BadRecord(NOT_AN_OBJECT, f"record is {type(record).__name__}, not an object")
            turns = (
                _instruction(record, columns) if fmt == "instruction" else _chat(record, columns)
            )
        except BadRecord as bad:
            rejects.append(Reject(rid, bad.reason, bad.detail))
            continue
        good.append(Conversation(rid, turns))
    return good, rejects
