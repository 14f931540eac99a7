"""The champion alias's append-only history and the alias-move protocol. Pure: no MLflow.

History lives in the registry itself, as one tag per move on the registered model:
``flywheel.history.00000042 = {"seq": 42, "time": ..., "actor": ..., "kind": ...,
"from": "3", "to": "4", "reason": ...}``. One key per move, never rewritten, makes it
append-only by construction; a single JSON-lines tag would be read-modify-written on
every move (a lost update under races) and would grow past the 5,000-character tag limit
of SQL-backed stores. Any MLflow client (the UI, another tool) can read it back without
flywheel.

A move (`plan_move`) is decided from what the registry holds when the lock is taken:
the current champion, the history and the target version's tags. Executing it is the
adapter's job, in the order `MovePlan` documents.
"""

from __future__ import annotations

import getpass
import logging
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from flywheel.errors import RegistryError
from flywheel.registry.lineage import REGISTERED_BY_FLYWHEEL, TAG_REGISTERED_BY, clip

log = logging.getLogger(__name__)

HISTORY_PREFIX = "flywheel.history."
MoveKind = Literal["promotion", "manual", "rollback"]


class HistoryEntry(BaseModel):
    """One move of the champion alias. Serialised with the keys `from` and `to`."""

    model_config = ConfigDict(populate_by_name=True, frozen=True)

    seq: int
    time: datetime
    actor: str
    kind: MoveKind
    from_version: str | None = Field(None, alias="from")
    to_version: str = Field(alias="to")
    reason: str

    def to_tag(self) -> str:
        return self.model_dump_json(by_alias=True)

    @property
    def key(self) -> str:
        """The registered-model tag this entry is stored under (zero-padded: sorts by seq)."""
        return f"{HISTORY_PREFIX}{self.seq:08d}"


@dataclass(frozen=True)
class MovePlan:
    """One champion move, decided; executed in this order. 1: `version_tags` on the
    target, so the alias never points at a version without them. 2: `entry` appended, so
    no alias move is ever off the record (a crash between 2 and 3 leaves an entry whose
    `to` is not the champion, visible as such; the next entry's `from` records the true
    state). 3: the alias. If 3 fails, the entry is withdrawn: it was never in effect."""

    entry: HistoryEntry
    version_tags: dict[str, str]


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def read_history(tags: dict[str, str]) -> list[HistoryEntry]:
    """Every move recorded in a registered model's tags, oldest first."""
    entries = []
    for key, value in tags.items():
        if key.startswith(HISTORY_PREFIX):
            try:
                entries.append(HistoryEntry.model_validate_json(value))
            except ValueError:
                log.warning("ignoring unreadable history tag %s", key)
    return sorted(entries, key=lambda e: e.seq)


def rollback_target(history: list[HistoryEntry], current: str, name: str = "model") -> str:
    """The champion before the current one, with rollbacks undone like a stack.

    Replays the history: a promotion pushes the version it replaced; a rollback to the top
    of that stack pops it (a rollback elsewhere, with --to, counts as a move). So after
    1 -> 2 -> 3, two rollbacks give 2 then 1, not 2, 3, 2, ...
    """
    stack: list[str | None] = []
    for e in history:
        if e.kind == "rollback" and stack and stack[-1] == e.to_version:
            stack.pop()
        else:
            stack.append(e.from_version)
    if not history or history[-1].to_version != current:
        raise RegistryError(
            f"{name}: the champion ({current}) was not set through flywheel's history; "
            "name a version with --to"
        )
    if not stack or stack[-1] is None:
        raise RegistryError(
            f"{name}: no earlier champion than version {current} in the history; name one with --to"
        )
    return stack[-1]


def require_reason(reason: str) -> None:
    if not reason.strip():
        raise RegistryError("a reason is required for every champion move")


def plan_move(
    *,
    name: str,
    kind: MoveKind,
    reason: str,
    actor: str,
    current: str | None,
    history: list[HistoryEntry],
    to: str,
    to_tags: dict[str, str],
    now: datetime,
) -> MovePlan | None:
    """The move of the champion alias from `current` to version `to`, or None when a
    promotion finds `to` already champion (nothing to do: a retried promotion succeeds
    without a second history entry). Refuses a version without flywheel's lineage, and a
    rollback onto the champion itself."""
    require_reason(reason)
    if to_tags.get(TAG_REGISTERED_BY) != REGISTERED_BY_FLYWHEEL:
        raise RegistryError(
            f"{name} version {to} has no flywheel lineage tags; refusing to make it champion"
        )
    if to == current:
        if kind == "rollback":
            raise RegistryError(f"{name} version {to} is already the champion")
        return None
    entry = HistoryEntry.model_validate(
        {
            "seq": (history[-1].seq + 1) if history else 1,
            "time": now,
            "actor": actor,
            "kind": kind,
            "from": current,
            "to": to,
            "reason": clip(reason, 2000),
        }
    )
    version_tags = {
        "flywheel.promoted_at": entry.time.isoformat(),
        "flywheel.promoted_by": actor,
        "flywheel.promotion_kind": kind,
        "flywheel.promotion_reason": entry.reason,
    }
    return MovePlan(entry, version_tags)
