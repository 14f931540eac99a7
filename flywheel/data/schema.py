"""The row contract every data block shares.

A batch is a `pandas.DataFrame` with (at least) these columns. A block never deletes a
row it judges; it writes `block`, `reason` and `detail` on it, so the stage can count
every drop and write every reject with its cause. Rows whose `reason` is non-empty pass
through later blocks untouched until `keep_only` takes them out.
"""

from __future__ import annotations

import pandas as pd

# Columns of a document row as it leaves a source.
DOC_COLUMNS = ("id", "source", "timestamp", "text", "block", "reason", "detail", "digest")

# `block` names, in pipeline order; `read` marks rejects (bad input), the rest are drops.
READ = "read"
NORMALIZE = "normalize"
QUALITY = "quality"
EXACT_DEDUP = "exact_dedup"
NEAR_DEDUP = "near_dedup"
PIPELINE_BLOCKS = (READ, NORMALIZE, QUALITY, EXACT_DEDUP, NEAR_DEDUP)

# Reject reasons (bad input). Each one has a unit test that produces it.
UNDECODABLE = "undecodable_bytes"
EMPTY_FILE = "empty_file"
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_TEXT = "missing_text"
NON_STRING_TEXT = "non_string_text"
UNREADABLE_FILE = "unreadable_file"
UNSUPPORTED_FILE = "unsupported_file_type"
UNPARSABLE_MODULE = "unparsable_module"


class Block:
    """Base of the blocks: `__call__(batch: pd.DataFrame) -> pd.DataFrame`.

    Gives instances a `__name__` (the class name), which Ray uses to name operators.
    """

    __name__ = property(lambda self: type(self).__name__)  # type: ignore[assignment]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        raise NotImplementedError


def doc_frame(rows: list[dict]) -> pd.DataFrame:
    """A batch with exactly DOC_COLUMNS (string columns; timestamp may be None)."""
    frame = pd.DataFrame(rows, columns=list(DOC_COLUMNS))
    for col in ("id", "source", "text", "block", "reason", "detail", "digest"):
        frame[col] = frame[col].fillna("").astype(str)
    frame["timestamp"] = frame["timestamp"].astype(object).where(frame["timestamp"].notna(), None)
    return frame


def pending(batch: pd.DataFrame) -> pd.Series:
    """Rows no block has dropped yet."""
    return batch["reason"] == ""


def mark(
    batch: pd.DataFrame, mask: pd.Series, block: str, reason: str | pd.Series, detail=""
) -> None:
    """Drop `mask` rows (in place) with a reason, leaving rows already dropped alone."""
    mask = mask & pending(batch)
    if not mask.any():
        return
    batch.loc[mask, "block"] = block
    batch.loc[mask, "reason"] = reason[mask] if isinstance(reason, pd.Series) else reason
    batch.loc[mask, "detail"] = detail[mask] if isinstance(detail, pd.Series) else detail


def keep_only(batch: pd.DataFrame) -> pd.DataFrame:
    return batch[pending(batch)]


def dropped_only(batch: pd.DataFrame) -> pd.DataFrame:
    return batch.loc[~pending(batch), ["id", "source", "block", "reason", "detail"]]
