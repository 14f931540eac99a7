"""The row contract every data step shares.

A batch is a `pandas.DataFrame` with (at least) these columns. A step never deletes a
row it judges; it writes `dropped_by` (its own name), `reason` and `detail` on it, so the
stage can count every drop and write every reject with its cause. Rows whose `reason` is
non-empty pass through later steps untouched until `keep_only` takes them out.
"""

from __future__ import annotations

import functools
import re

import pandas as pd

from flywheel.errors import DataError

# Reject reasons decided by the text policy, named here with the others.
from flywheel.text_policy import CONTROL_CHARACTER, INVALID_UNICODE, NONCHARACTER  # noqa: F401

# Columns of a document row as it leaves a source.
# Groups for the keyed shuffles. Ray's map_groups calls Python once per group, so keying
# on the band hash itself (~100k distinct values) costs ~1 ms per group; keying on a
# coarse bucket of it and grouping with pandas inside the UDF is ~40x faster on 2 cores.
# The result does not depend on this number, only the parallelism does.
NUM_BUCKETS = 16


def bucket(keys: pd.Series) -> pd.Series:
    """The shuffle bucket of each content key (steps' groupbys and the dedup index agree)."""
    # "!": a champion document's key in the near-duplicate graph (flywheel.data.index.MARK).
    return keys.map(lambda k: int(k.lstrip("!")[:8], 16) % NUM_BUCKETS).astype("int64")


DOC_COLUMNS = ("id", "source", "timestamp", "text", "dropped_by", "reason", "detail", "digest")

# `dropped_by` values (step names), in pipeline order; `read` marks rejects (bad input), the rest are drops.
READ = "read"
NORMALIZE = "normalize"
QUALITY = "quality"
EXACT_DEDUP = "exact_dedup"
NEAR_DEDUP = "near_dedup"
PIPELINE_STEPS = (READ, NORMALIZE, QUALITY, EXACT_DEDUP, NEAR_DEDUP)

# Reject reasons (bad input). Each one has a unit test that produces it.
UNDECODABLE = "undecodable_bytes"
EMPTY_FILE = "empty_file"
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_TEXT = "missing_text"
NON_STRING_TEXT = "non_string_text"
UNREADABLE_FILE = "unreadable_file"
UNREADABLE_RECORD = "unreadable_record"
UNSUPPORTED_FILE = "unsupported_file_type"
UNPARSABLE_MODULE = "unparsable_module"
# INVALID_UNICODE, CONTROL_CHARACTER, NONCHARACTER (imported above) are the text policy's.
# Valid JSON ("\\ud800") can hold a lone surrogate, which no UTF-8 file, Arrow column or
# tokenizer can store: one such string poisons a whole Ray block, so the row goes there.


class StepFailure(DataError):
    """A step raised on a batch. The message names the step and the row that fails alone.

    Raised inside Ray workers: Ray delivers it to the driver as text inside its own
    exception, which `step_failure_message` reads back.
    """


_FAILURE = re.compile(r"StepFailure: (.+)")
_DETAIL_CHARS = 300


def step_failure_message(exc: BaseException) -> str | None:
    """The one-line StepFailure message carried by `exc` (Ray's wrapper or the error itself)."""
    if isinstance(exc, StepFailure):
        return str(exc)
    found = _FAILURE.findall(str(exc))
    return found[-1].strip() if found else None


def _where(row: pd.Series) -> str:
    if "id" in row and "source" in row:
        return f"row {row['id']!r} from {row['source']}"
    if "unit" in row:
        return f"unit {row['unit']!r}"
    if "key" in row:
        return f"the document with content key {row['key']}"
    return "a row"


_TEXT_COLUMNS = ("id", "source", "text", "dropped_by", "reason", "detail", "digest")


def _contract_problem(row: pd.Series) -> str | None:
    """How a row breaks the row contract (a text column that is not storable text), if it does.

    Checked first when a step fails: one such value makes Ray store the whole column as
    pickled objects, and then every row fails alike, so retrying row by row would blame
    the first row instead of the bad one.
    """
    for col in _TEXT_COLUMNS:
        if col not in row.index:
            continue
        value = row[col]
        if not isinstance(value, str):
            return f"its {col} is {type(value).__name__}, not text"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"its {col} holds a lone surrogate"
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text[:_DETAIL_CHARS]}"


def _guarded(call):
    """Wrap a step's `__call__`: an exception becomes a StepFailure naming step and row.

    A row-wise step is run again row by row on an untouched copy of the batch to find the
    first row that fails alone (steps mark rows in place, so the batch itself may be half
    done); a keyed step names the group. Costs one batch copy per call (object columns copy
    references, not strings).
    """

    @functools.wraps(call)
    def guarded(self, batch):
        if not isinstance(batch, pd.DataFrame):  # an Arrow table: immutable, nothing to copy
            try:
                return call(self, batch)
            except StepFailure:
                raise
            except Exception as exc:
                name, why = type(self).__name__, _one_line(exc)
                raise StepFailure(
                    f"data step {name} failed on a batch of {len(batch)} rows: {why}"
                ) from exc
        pristine = batch.copy()
        try:
            return call(self, batch)
        except StepFailure:
            raise
        except Exception as exc:
            name = type(self).__name__
            where, cause = f"a batch of {len(pristine)} rows", exc
            if not self.row_wise and len(pristine):
                where = f"a group of {len(pristine)} rows (first: {_where(pristine.iloc[0])})"
            bad = ((i, _contract_problem(pristine.iloc[i])) for i in range(len(pristine)))
            found = next(((i, why) for i, why in bad if why), None)
            if found:
                where = f"{_where(pristine.iloc[found[0]])} ({found[1]})"
            for i in range(len(pristine) if self.row_wise and not found else 0):
                try:
                    call(self, pristine.iloc[[i]].copy())
                except Exception as row_exc:
                    where, cause = _where(pristine.iloc[i]), row_exc
                    break
            raise StepFailure(f"data step {name} failed on {where}: {_one_line(cause)}") from exc

    return guarded


class Step:
    """Base of the data steps: `__call__(batch: pd.DataFrame) -> pd.DataFrame`.

    Gives instances a `__name__` (the class name), which Ray uses to name operators.
    """

    __name__ = property(lambda self: type(self).__name__)  # type: ignore[assignment]
    # Each output row comes from one input row, so a failing batch can be retried row by
    # row to name the culprit. Keyed steps (map_groups) set False.
    row_wise = True

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "__call__" in cls.__dict__:
            cls.__call__ = _guarded(cls.__dict__["__call__"])  # type: ignore[method-assign]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        raise NotImplementedError


class Chain(Step):
    """`first` on the whole batch, then `then` one after another on slices of `batch_size`
    of its rows, all inside one Ray task.

    Why not one `map_batches` per step: Ray Data fuses a map that sets a batch size with the
    map before it and then bundles that map's *input* rows up to the batch size. After the
    file reader (one input row per file, thousands of documents out) that put up to 256
    files into one task, so a corpus of fewer files than that was read, cleaned and hashed
    on one core, and the few large blocks it made kept later steps there too.
    """

    row_wise = False  # `first` may turn one row into many: failures are named by the steps

    def __init__(self, first: Step, *then: Step, batch_size: int):
        self.first = first
        self.then = then
        self.batch_size = batch_size

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        frame = self.first(batch)
        parts = []
        # An empty frame goes through the steps too: its block gets their columns.
        for start in range(0, max(len(frame), 1), self.batch_size):
            part = frame.iloc[start : start + self.batch_size].reset_index(drop=True)
            for step in self.then:
                part = step(part)
            parts.append(part)
        return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def doc_frame(rows: list[dict]) -> pd.DataFrame:
    """A batch with exactly DOC_COLUMNS (string columns; timestamp may be None)."""
    frame = pd.DataFrame(rows, columns=list(DOC_COLUMNS))
    for col in ("id", "source", "text", "dropped_by", "reason", "detail", "digest"):
        frame[col] = frame[col].fillna("").astype(str)
    frame["timestamp"] = frame["timestamp"].astype(object).where(frame["timestamp"].notna(), None)
    return frame


def pending(batch: pd.DataFrame) -> pd.Series:
    """Rows no step has dropped yet."""
    return batch["reason"] == ""


def mark(
    batch: pd.DataFrame, mask: pd.Series, step: str, reason: str | pd.Series, detail=""
) -> None:
    """Drop `mask` rows (in place) with a reason, leaving rows already dropped alone."""
    mask = mask & pending(batch)
    if not mask.any():
        return
    batch.loc[mask, "dropped_by"] = step
    batch.loc[mask, "reason"] = reason[mask] if isinstance(reason, pd.Series) else reason
    batch.loc[mask, "detail"] = detail[mask] if isinstance(detail, pd.Series) else detail


def keep_only(batch: pd.DataFrame) -> pd.DataFrame:
    return batch[pending(batch)]


def dropped_only(batch: pd.DataFrame) -> pd.DataFrame:
    return batch.loc[~pending(batch), ["id", "source", "dropped_by", "reason", "detail"]]
