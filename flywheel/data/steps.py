"""The data steps. One contract: `step(batch: pd.DataFrame) -> pd.DataFrame`.

Each step is small and runs under Ray Data `map_batches(batch_format="pandas")` (or
`groupby(...).map_groups` for the ones that need all rows of a key together); the stage
in `flywheel.data.stage` wires them. Steps that judge documents mark rows (see
`schema.mark`: the `dropped_by` column names the step) instead of deleting them, so every
drop is counted with its reason. State that is expensive to build (a tokenizer) lives in a
callable class, built once per Ray worker. ("Block" is kept for Ray's meaning: a chunk of
a Ray dataset; a packed run of `data.block_size` training tokens is a "sequence".)
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from flywheel import artifacts
from flywheel.config import DedupConfig, FilterConfig, SplitConfig
from flywheel.data import schema

if TYPE_CHECKING:
    from tokenizers import Tokenizer

NUM_BUCKETS = schema.NUM_BUCKETS

_SPACES = re.compile(r"[^\S\n]+")  # runs of whitespace other than newlines
_TRAILING = re.compile(r"[^\S\n]+\n")
_BLANKS = re.compile(r"\n{3,}")
_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")


_bucket = schema.bucket


# --------------------------------------------------------------------- normalize


# ASCII whitespace other than " " and "\n" (what str.isspace() accepts below 128).
_ODD_ASCII_SPACE = tuple(c for c in map(chr, range(128)) if c.isspace() and c not in " \n")


def _plain_ascii(text: str) -> str | None:
    """normalize_text for the common case, with str methods only (~30x faster than the
    line loop): ASCII, no whitespace but spaces and newlines, no indented line. None when
    the text is not that case. Held equal to the general path by a fuzz test."""
    if not isinstance(text, str) or not text.isascii() or text.startswith(" ") or "\n " in text:
        return None
    if any(c in text for c in _ODD_ASCII_SPACE):
        return None
    while " \n" in text:  # trailing spaces (no line is indented, so every run is inner)
        text = text.replace(" \n", "\n")
    while "  " in text:  # inner runs of spaces
        text = text.replace("  ", " ")
    if "\n\n\n" in text:
        text = _BLANKS.sub("\n\n", text)
    return text.strip()


def normalize_text(text: str) -> str:
    """NFC, unified newlines, no invisible characters, no trailing spaces, <=1 blank line.

    Leading indentation stays: the Python docs hold code examples whose meaning is
    their indentation. Runs of inner spaces collapse only when they follow a
    non-space (so `a    b` -> `a b`, but an indented line keeps its indent).
    """
    plain = _plain_ascii(text)  # ASCII is NFC and has no invisible characters
    return plain if plain is not None else normalize_general(text)


def normalize_general(text: str) -> str:
    """normalize_text for any text, line by line (the definition the fast path matches)."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _INVISIBLE.sub("", text)
    text = _TRAILING.sub("\n", text)
    lines = []
    for line in text.split("\n"):
        body = line.lstrip(" \t")
        indent = line[: len(line) - len(body)].replace("\t", "    ")
        lines.append(indent + _SPACES.sub(" ", body))
    text = "\n".join(lines)
    return _BLANKS.sub("\n\n", text).strip()


class Normalize(schema.Step):
    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        todo = schema.pending(batch)
        batch.loc[todo, "text"] = batch.loc[todo, "text"].map(normalize_text)
        return batch


# ----------------------------------------------------------------------- quality


_ASCII_SPACES = bytes(c for c in range(128) if chr(c).isspace())
_ASCII_LETTERS = bytes(c for c in range(128) if chr(c).isalpha())


def alpha_share(text: str) -> float:
    if (
        isinstance(text, str) and text.isascii()
    ):  # count by deleting bytes in C (5x the per-character map below)
        raw = text.encode("ascii")
        visible = len(raw.translate(None, _ASCII_SPACES))
        alpha = len(raw) - len(raw.translate(None, _ASCII_LETTERS))
        return alpha / visible if visible else 0.0
    # map() over str methods runs the per-character loop in C (3x a comprehension).
    visible = len(text) - sum(map(str.isspace, text))
    return sum(map(str.isalpha, text)) / visible if visible else 0.0


def repeated_line_share(text: str) -> float:
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    return (1 - len(set(lines)) / len(lines)) if lines else 0.0


class QualityFilter(schema.Step):
    """Length bounds, alphabetic share, repeated-line share (thresholds in `data.filters`)."""

    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        cfg = self.cfg
        todo = schema.pending(batch)
        text = batch["text"].where(todo, "")
        n = text.str.len()
        short = todo & (n < cfg.min_chars)
        schema.mark(batch, short, schema.QUALITY, "too_short", _detail(n, short, "{} chars"))
        long = todo & (n > cfg.max_chars)
        schema.mark(batch, long, schema.QUALITY, "too_long", _detail(n, long, "{} chars"))
        todo = schema.pending(batch)
        alpha = text.where(todo, "").map(alpha_share)
        low = todo & (alpha < cfg.min_alpha_share)
        schema.mark(
            batch, low, schema.QUALITY, "low_alpha_share", _detail(alpha, low, "alpha share {:.2f}")
        )
        todo = schema.pending(batch)
        rep = text.where(todo, "").map(repeated_line_share)
        many = todo & (rep > cfg.max_repeated_line_share)
        schema.mark(
            batch,
            many,
            schema.QUALITY,
            "repeated_lines",
            _detail(rep, many, "repeated-line share {:.2f}"),
        )
        return batch


def _detail(values: pd.Series, mask: pd.Series, fmt: str) -> pd.Series:
    """`fmt` of the marked rows' values ("" elsewhere): formatted only where it is kept."""
    out = pd.Series("", index=values.index, dtype=object)
    out[mask] = [fmt.format(v) for v in values[mask]]
    return out


# ------------------------------------------------------------------------ dedup


class ContentKey(schema.Step):
    """`key`: the hash of the normalized text (exact-duplicate identity, split hash input)."""

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch["key"] = batch["text"].map(
            lambda t: hashlib.sha256(t.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        )
        batch["bucket"] = _bucket(batch["key"])
        return batch


class ExactDedup(schema.Step):
    """Per group of buckets: keep the smallest id of each `key`, mark the rest.

    Runs under `groupby("bucket").map_groups`, so every copy of a text is in one call.
    Smallest id (not first seen) keeps the choice independent of Ray's ordering.
    """

    row_wise = False

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        todo = batch[schema.pending(batch)].sort_values(["key", "id"])
        first = todo.groupby("key")["id"].transform("first")
        dup = first != todo["id"]
        mask = pd.Series(False, index=batch.index)
        mask[dup[dup].index] = True
        detail = pd.Series("", index=batch.index)
        detail[dup[dup].index] = "copy of " + first[dup]
        schema.mark(batch, mask, schema.EXACT_DEDUP, "exact_duplicate", detail)
        return batch


def frame_of_refs(refs: list) -> pd.DataFrame:
    """Ray object refs of Arrow tables as one frame (an empty block's columns are null-typed,
    which pa.concat_tables refuses beside string ones; pandas concatenates both)."""
    import ray

    frames = [t.to_pandas() for t in ray.get(refs) if t.num_rows] if refs else []
    if frames:
        return pd.concat(frames, ignore_index=True)
    return pd.DataFrame(
        {c: pd.Series([], dtype=object) for c in ("key", "kept", "kept_id", "first")}
    )


class ExactFirst(schema.Step):
    """Per group of buckets of (`key`, `id`) rows: (`key`, `first`) for each key held by
    more than one id, `first` its smallest id. The stage's exact dedup shuffles only these
    two columns (not the texts) and marks the copies with MarkCopies: the same drops as
    ExactDedup, which stays as the one-batch definition a unit test holds them to."""

    row_wise = False

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        # Only keys seen more than once are grouped: a groupby's min/max over string ids
        # runs row by row in Python (~50 us a row), and most keys are unique.
        batch = batch[batch["key"].duplicated(keep=False)]
        ids = batch.groupby("key", sort=True)["id"].agg(["min", "max"])
        dup = ids[ids["min"] != ids["max"]]
        return pd.DataFrame({"key": dup.index.astype(object), "first": dup["min"].to_numpy()})


class MarkCopies(schema.Step):
    """Mark rows whose key has a smaller `first` id (ExactFirst's rows, as Ray object refs
    of Arrow tables, read once per task): a broadcast join whose size is the number of
    duplicated texts, not the corpus."""

    def __init__(self, tables: list):
        self.tables = tables
        self.first: dict[str, str] | None = None

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        if self.first is None:
            table = frame_of_refs(self.tables)
            self.first = dict(zip(table["key"], table["first"], strict=True))
        if not self.first:
            return batch
        first = batch["key"].map(self.first)
        mask = first.notna() & (first != batch["id"]) & schema.pending(batch)
        detail = pd.Series("", index=batch.index, dtype=object)
        detail[mask] = "copy of " + first[mask]
        schema.mark(batch, mask, schema.EXACT_DEDUP, "exact_duplicate", detail)
        return batch


# Odd 64-bit constants (splitmix64's); the arithmetic below wraps modulo 2**64 on purpose.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_BASE = np.uint64(0x100000001B3)  # FNV's prime: the base of the polynomials below
# Words as Python's `\w+` sees them (letters, digits, underscore), in RE2's syntax.
_NON_WORD = r"[^\pL\pN_]+"


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, vectorised: every input bit moves every output bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


def _string_hashes(strings: pa.Array) -> np.ndarray:
    """A 64-bit hash of each (non-empty) string over its UTF-8 bytes, with no Python loop."""
    if len(strings) == 0:
        return np.zeros(0, dtype=np.uint64)
    offsets = np.frombuffer(strings.buffers()[1], dtype=np.int32)
    offsets = offsets[strings.offset : strings.offset + len(strings) + 1].astype(np.int64)
    data = np.frombuffer(strings.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    starts, lengths = offsets[:-1] - offsets[0], np.diff(offsets)
    # Each byte's distance from its word's end is its power of the base.
    from_end = np.repeat(starts + lengths, lengths) - 1 - np.arange(len(data))
    powers = np.full(int(lengths.max()), _BASE, dtype=np.uint64)
    powers[0] = 1
    powers = np.cumprod(powers, dtype=np.uint64)
    sums = np.add.reduceat(data.astype(np.uint64) * powers[from_end], starts)
    return _mix64(sums ^ (lengths.astype(np.uint64) * _GOLDEN))


def _chain(first: np.ndarray, *rest: np.ndarray) -> np.ndarray:
    """The hash of a sequence of word hashes (order matters)."""
    h = first
    for w in rest:
        h = _mix64(h * _BASE + w)
    return h


# Bytes that are word characters for `_NON_WORD` in ASCII text (`\w`: letters, digits,
# underscore), and each ASCII byte lowercased: the fast path of `_word_hashes`.
_ASCII_WORD = np.zeros(256, dtype=bool)
_ASCII_WORD[list(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")] = True
_ASCII_LOWER = np.arange(256, dtype=np.uint8)
_ASCII_LOWER[65:91] += 32


def _hashed(words: pa.Array) -> np.ndarray:
    """_string_hashes of each word, computed once per distinct word (most repeat)."""
    encoded = pc.dictionary_encode(words)
    return _string_hashes(encoded.dictionary)[encoded.indices.to_numpy(zero_copy_only=False)]


def _regex_words(texts: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(document index, word) of every word, lowercased, split by RE2 on `_NON_WORD`."""
    words = pc.split_pattern_regex(pc.utf8_lower(texts), _NON_WORD)
    doc = pc.list_parent_indices(words).to_numpy()
    flat = pc.list_flatten(words)
    nonempty = pc.greater(pc.binary_length(flat), 0)
    return doc[nonempty.to_numpy(zero_copy_only=False)], flat.filter(nonempty)


def _ascii_words(texts: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """`_regex_words` for ASCII texts, on their bytes with NumPy: the same words (in ASCII,
    word characters are letters, digits and underscore), several times faster than the
    regex split, which was most of the cost of a MinHash signature."""
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int32)
    offsets = offsets[texts.offset : texts.offset + len(texts) + 1].astype(np.int64)
    data = np.frombuffer(texts.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    offsets -= offsets[0]
    word = _ASCII_WORD[data]
    if not word.any():
        return np.zeros(0, dtype=np.int64), pa.array([], type=pa.string())
    # A word starts (ends) at a word byte whose neighbour before (after) is not one, or
    # is in another document.
    before = np.append(False, word[:-1])
    after = np.append(word[1:], False)
    inner = offsets[1:-1]
    inner = inner[(inner > 0) & (inner < len(data))]
    before[inner] = False
    after[inner - 1] = False
    starts = np.flatnonzero(word & ~before)
    ends = np.flatnonzero(word & ~after) + 1
    doc = np.searchsorted(offsets, starts, side="right") - 1
    lengths = ends - starts
    kept = _ASCII_LOWER[data[word]]
    word_offsets = np.zeros(len(starts) + 1, dtype=np.int32)
    np.cumsum(lengths, out=word_offsets[1:])
    words = pa.Array.from_buffers(
        pa.string(), len(starts), [None, pa.py_buffer(word_offsets), pa.py_buffer(kept)]
    )
    return doc, words


def _word_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(document index, word hash) of every word of every text, in text order."""
    arr = pa.array(texts, type=pa.string())
    ascii = pc.string_is_ascii(arr).to_numpy(zero_copy_only=False)
    parts = []
    for mask, words_of in ((ascii, _ascii_words), (~ascii, _regex_words)):
        if mask.any():
            rows = np.flatnonzero(mask)
            doc, words = words_of(arr if mask.all() else arr.filter(pa.array(mask)))
            parts.append((rows[doc], _hashed(words)))
    if len(parts) == 1:
        return parts[0]
    doc = np.concatenate([d for d, _ in parts]) if parts else np.zeros(0, dtype=np.int64)
    word = np.concatenate([w for _, w in parts]) if parts else np.zeros(0, dtype=np.uint64)
    order = np.argsort(doc, kind="stable")
    return doc[order], word[order]


def shingle_hashes(texts: list[str], size: int, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of each text's word `size`-grams (lowercased), as one flat array and
    row offsets (row i is `hashes[offsets[i]:offsets[i + 1]]`), computed for the whole batch
    in pyarrow and NumPy: per-document Python here was the stage's largest cost.

    A text of fewer than `size` words is one shingle of all its words; a text with no word
    at all is one shingle from its content `key` (an empty set would give every such text
    the same all-max signature and make them look like duplicates of each other).
    """
    n = len(texts)
    doc, word = _word_hashes(texts)
    count = np.bincount(doc, minlength=n)
    parts: list[tuple[np.ndarray, np.ndarray]] = []  # (document index, hash)
    if len(word) >= size:
        last = len(word) - size + 1
        whole = doc[:last] == doc[size - 1 :]  # the n-gram does not cross a document
        grams = _chain(*(word[j : j + last] for j in range(size)))
        parts.append((doc[:last][whole], grams[whole]))
    starts = np.r_[0, np.cumsum(count)]
    for i in np.flatnonzero(count < size):  # rare: short texts, one shingle each
        if count[i]:
            h = _chain(*(word[j : j + 1] for j in range(starts[i], starts[i + 1])))
        else:
            h = np.array([int(keys[i][:16], 16)], dtype=np.uint64)
        parts.append((np.array([i]), h))
    docs = np.concatenate([d for d, _ in parts]) if parts else np.zeros(0, dtype=np.int64)
    hashes = np.concatenate([h for _, h in parts]) if parts else np.zeros(0, dtype=np.uint64)
    order = np.argsort(docs, kind="stable")
    offsets = np.r_[0, np.cumsum(np.bincount(docs, minlength=n))].astype(np.uint64)
    return hashes[order], offsets


class MinHashSignature(schema.Step):
    """`minhash`: a MinHash signature (num_perm uint32 values, as bytes) of word shingles.

    rensa (Rust) computes the signatures of a whole batch from the flat shingle hashes in
    one call; its Jaccard estimate is the share of equal values, as before.
    """

    def __init__(self, cfg: DedupConfig, seed: int = 1):
        self.cfg = cfg
        self.seed = seed

    def signatures(self, texts: list[str], keys: list[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32 signatures."""
        from rensa import RMinHash

        if not texts:
            return np.zeros((0, self.cfg.num_perm), dtype=np.uint32)
        hashes, offsets = shingle_hashes(texts, self.cfg.shingle_size, keys)
        matrix = RMinHash.digest_matrix_from_flat_token_hashes(
            hashes, offsets, self.cfg.num_perm, self.seed
        )
        return np.asarray(matrix.to_rows(), dtype="<u4")

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        todo = schema.pending(batch).to_numpy()
        sigs = self.signatures(batch["text"][todo].tolist(), batch["key"][todo].tolist())
        column = np.full(len(batch), b"", dtype=object)
        column[todo] = [row.tobytes() for row in sigs]
        batch["minhash"] = column
        return batch


def band_hashes(signatures: np.ndarray, bands: int) -> np.ndarray:
    """(n, bands) int64: the hash of each band's slice of each signature (band index salted
    in, so equal slices in different bands do not meet)."""
    rows = signatures.shape[1] // bands
    sig = signatures.astype(np.uint64)
    out = np.empty((len(sig), bands), dtype=np.uint64)
    for b in range(bands):
        h = np.full(len(sig), b + 1, dtype=np.uint64) * _GOLDEN
        for j in range(b * rows, (b + 1) * rows):
            h = _mix64(h * _BASE + sig[:, j])
        out[:, b] = h
    return out.view(np.int64)


class LshBands(schema.Step):
    """One row per (document, band): `band` = hash of the band's slice of the signature."""

    def __init__(self, cfg: DedupConfig):
        self.bands = cfg.bands

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        sigs = np.frombuffer(b"".join(batch["minhash"]), dtype="<u4").reshape(len(batch), -1)
        band = band_hashes(sigs, self.bands).reshape(-1)
        out = pd.DataFrame({"key": np.repeat(batch["key"].to_numpy(), self.bands), "band": band})
        out["bucket"] = (out["band"] % NUM_BUCKETS).astype("int64")
        return out


class BandCandidates(schema.Step):
    """Per group: candidate pairs (a < b) of documents that share a band.

    All pairs inside a band of up to `max_all_pairs` members; a larger band (boilerplate
    shared by many documents) pairs each member with the band's smallest key only, so
    the work stays linear. Union-find later joins what the star misses transitively.
    """

    row_wise = False

    def __init__(self, max_all_pairs: int = 16):
        self.max_all_pairs = max_all_pairs

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        # Most bands hold one document: keep the others first, on the integer column alone
        # (dropping duplicate (band, key) string pairs over every row cost seconds).
        batch = batch[batch["band"].duplicated(keep=False)]
        rows = batch[["band", "key"]].drop_duplicates()
        size = rows.groupby("band")["key"].transform("size")
        rows = rows[size > 1]
        size = size[size > 1]
        small = rows[size <= self.max_all_pairs]
        pairs = small.merge(small, on="band", suffixes=("_a", "_b"))
        pairs = pairs.loc[pairs["key_a"] < pairs["key_b"], ["key_a", "key_b"]]
        big = rows[size > self.max_all_pairs].sort_values(["band", "key"])
        first = big.groupby("band")["key"].transform("first")
        star = pd.DataFrame({"key_a": first, "key_b": big["key"]})
        star = star[star["key_a"] != star["key_b"]]
        out = pd.concat([pairs, star], ignore_index=True).drop_duplicates()
        return out.rename(columns={"key_a": "a", "key_b": "b"}).reset_index(drop=True)


class AttachSignature(schema.Step):
    """Per group of `key` buckets: pair rows (sig empty) get the signature of their `key`.

    Input rows are either signatures (`key`, `minhash`, `other` == "") or pair rows
    (`key`, `other`, `minhash` == b""). Output: pair rows (`key`=other, `other`=key,
    `peer`=signature of key), so a second grouping brings both signatures together —
    a join of pairs and signatures done with two Ray groupbys instead of a dictionary.
    """

    row_wise = False

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        is_sig = batch["other"] == ""
        sigs = batch.loc[is_sig, ["key", "minhash"]].drop_duplicates("key")
        pairs = batch.loc[~is_sig, ["key", "other"]]
        joined = pairs.merge(sigs, on="key", how="inner")
        return pd.DataFrame({"a": joined["other"], "b": joined["key"], "peer": joined["minhash"]})


class VerifyPairs(schema.Step):
    """Per group: estimated Jaccard of each candidate pair; keep pairs >= threshold."""

    row_wise = False

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        is_sig = batch["other"] == ""
        sigs = batch.loc[is_sig, ["key", "minhash"]].drop_duplicates("key")
        pairs = batch.loc[~is_sig, ["key", "other", "peer"]]
        joined = pairs.merge(sigs, on="key", how="inner")
        if joined.empty:
            return pd.DataFrame(
                {
                    "a": pd.Series([], dtype=str),
                    "b": pd.Series([], dtype=str),
                    "jaccard": pd.Series([], dtype=float),
                }
            )
        a = np.frombuffer(b"".join(joined["minhash"]), dtype="<u4").reshape(len(joined), -1)
        b = np.frombuffer(b"".join(joined["peer"]), dtype="<u4").reshape(len(joined), -1)
        jaccard = (a == b).mean(axis=1)
        keep = jaccard >= self.threshold
        return pd.DataFrame(
            {
                "a": joined["key"][keep].values,
                "b": joined["other"][keep].values,
                "jaccard": jaccard[keep],
            }
        )


def duplicate_components(edges: pd.DataFrame) -> dict[str, str]:
    """Union-find over verified near-duplicate edges: {dropped key: kept key}.

    Only the edges (documents that have a near-duplicate) reach this function, never the
    whole corpus. Each connected component keeps its smallest key, so the choice does not
    depend on the order pairs arrive in. Kept over scipy's `connected_components`: on
    200k edges it is ~5x faster here, because numbering string keys for scipy costs more
    than the whole union-find (scripts/bench/bench_data.py measures both).
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(edges["a"], edges["b"], strict=True):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {k: find(k) for k in parent if find(k) != k}


def components_frame(edges: pd.DataFrame) -> pd.DataFrame:
    """`duplicate_components` as rows (`key`, `kept`): the one-task path of the stage."""
    drops = duplicate_components(edges)
    return pd.DataFrame(
        {"key": pd.Series(list(drops), dtype=object), "kept": pd.Series(list(drops.values()))}
    )


# Near-duplicate components in Ray when the edges are too many for one task: min-label
# propagation. Every node starts labelled with the smallest key among itself and its
# neighbours; each round sends every node's label to its neighbours (SendLabels, grouped
# by the sender) and keeps the smallest label each node received (MinLabel, grouped by
# the receiver), until no label changes. The fixed point labels each node with the
# smallest key of its component: the same answer as the union-find. A task holds one
# bucket of edges and labels, so its memory is (edges + nodes) / NUM_BUCKETS.
# Rows of both steps: `key`, `target`, `label` (strings; "" where not used), `bucket`.


class SendLabels(schema.Step):
    """Per group of senders: label rows (`target` == "") and edge rows (`key` -> `target`).
    Out: candidate rows (`key`=receiver, `label`=candidate, `target`="own" on the row that
    carries a node's current label)."""

    row_wise = False

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        is_label = batch["target"] == ""
        labels = batch.loc[is_label, ["key", "label"]]
        sends = batch.loc[~is_label, ["key", "target"]].merge(labels, on="key", how="inner")
        keys = pd.concat([labels["key"], sends["target"]], ignore_index=True)
        return pd.DataFrame(
            {
                "key": keys,
                "target": ["own"] * len(labels) + [""] * len(sends),
                "label": pd.concat([labels["label"], sends["label"]], ignore_index=True),
                "bucket": _bucket(keys) if len(keys) else pd.Series([], dtype="int64"),
            }
        )


class MinLabel(schema.Step):
    """Per group of receivers: each node's new label (the smallest candidate), `changed`
    where it is smaller than the label it had (its `target == "own"` row)."""

    row_wise = False

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        new = batch.groupby("key", sort=True)["label"].min()
        old = batch[batch["target"] == "own"].set_index("key")["label"]
        old = old[~old.index.duplicated()].reindex(new.index)
        return pd.DataFrame(
            {
                "key": new.index.astype(object),
                "target": "",
                "label": new.to_numpy(),
                "bucket": _bucket(pd.Series(new.index, dtype=object)).to_numpy()
                if len(new)
                else np.zeros(0, dtype=np.int64),
                "changed": (old.isna() | (new != old)).to_numpy().astype(np.int64),
            }
        )


def propagate_components(edges: pd.DataFrame) -> dict[str, str]:
    """The Ray path's rounds run in one process (all rows one group): {dropped: kept}.
    The reference that tests hold equal to the union-find."""
    both = edge_rows(edges)
    labels = MinLabel()(initial_rows(both))
    while True:
        sent = SendLabels()(pd.concat([labels.drop(columns="changed"), both], ignore_index=True))
        labels = MinLabel()(sent)
        if not labels["changed"].any():
            break
    moved = labels[labels["key"] != labels["label"]]
    return dict(zip(moved["key"], moved["label"], strict=True))


def edge_rows(edges: pd.DataFrame) -> pd.DataFrame:
    """Both directions of each edge as send rows (`key` sends its label to `target`)."""
    a, b = edges["a"].astype(str), edges["b"].astype(str)
    keys = pd.concat([a, b], ignore_index=True)
    return pd.DataFrame(
        {
            "key": keys,
            "target": pd.concat([b, a], ignore_index=True),
            "label": "",
            "bucket": _bucket(keys) if len(keys) else pd.Series([], dtype="int64"),
        }
    )


def initial_rows(both: pd.DataFrame) -> pd.DataFrame:
    """Round 0's candidates from send rows: each node's own key ("own") and its
    neighbours' keys, grouped by the receiving node."""
    keys = pd.concat([both["key"], both["key"]], ignore_index=True)
    return pd.DataFrame(
        {
            "key": keys,
            "target": ["own"] * len(both) + [""] * len(both),
            "label": pd.concat([both["key"], both["target"]], ignore_index=True),
            "bucket": pd.concat([both["bucket"], both["bucket"]], ignore_index=True),
        }
    )


class ApplyDrops(schema.Step):
    """Mark documents whose key is in `drops` ({key: kept key}) as near-duplicates.

    `tables`/`id_tables`: instead of dicts, Ray object refs of Arrow tables (`key`, `kept`)
    and (`kept`, `kept_id`) made by Ray tasks: the drops reach each task without passing
    through the driver (a broadcast join; a task holds the documents that have a
    near-duplicate, not the corpus). `copy_tables`: (`key`, `kept_id`) of exact copies of
    the champion's data (flywheel.data.index). A kept key starting with `index.MARK` is a
    champion document; replayed champion documents are never dropped for it.
    """

    def __init__(
        self,
        drops: dict[str, str] | None = None,
        kept_ids: dict[str, str] | None = None,
        tables: list | None = None,
        id_tables: list | None = None,
        copy_tables: list | None = None,
    ):
        self.drops = drops or {}
        self.kept_ids = kept_ids or {}
        self.copies: dict[str, str] = {}
        self.tables = tables or []
        self.id_tables = id_tables or []
        self.copy_tables = copy_tables or []

    def _load(self) -> None:
        """Once per task: Ray calls one instance for each of its batches."""
        if not (self.tables or self.id_tables or self.copy_tables):
            return
        frame = frame_of_refs
        if self.tables:
            table = frame(self.tables)
            self.drops = dict(zip(table["key"], table["kept"], strict=True))
        if self.id_tables:
            ids = frame(self.id_tables)
            self.kept_ids = dict(zip(ids["kept"], ids["kept_id"], strict=True))
        if self.copy_tables:
            copies = frame(self.copy_tables)
            self.copies = dict(zip(copies["key"], copies["kept_id"], strict=True))
        self.tables = self.id_tables = self.copy_tables = []

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from flywheel.data import index

        self._load()
        replay = batch["source"] == index.REPLAY_SOURCE if "source" in batch else False
        if self.copies:
            kept = batch["key"].map(self.copies)
            mask = kept.notna() & ~replay
            detail = pd.Series("", index=batch.index, dtype=object)
            detail[mask] = [f"copy of {k} (champion's data)" for k in kept[mask]]
            schema.mark(batch, mask, schema.EXACT_DEDUP, index.COPY, detail)
        if not self.drops:
            return batch
        kept = batch["key"].map(self.drops)
        champion = kept.fillna("").str.startswith(index.MARK)
        mask = kept.notna() & ~(champion & replay)
        detail = pd.Series("", index=batch.index, dtype=object)
        detail[mask] = [
            f"near-duplicate of {self.kept_ids.get(k, k)}"
            + (" (champion's data)" if k.startswith(index.MARK) else "")
            for k in kept[mask]
        ]
        reason = pd.Series("near_duplicate", index=batch.index, dtype=object)
        reason[champion] = index.NEAR
        schema.mark(batch, mask, schema.NEAR_DEDUP, reason, detail)
        return batch


# ------------------------------------------------------------------------- split


def split_point(key: str, salt: str) -> float:
    """A uniform number in [0, 1) from the document's content hash and the salt."""
    h = hashlib.sha256(f"{salt}\x1f{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


class AssignSplit(schema.Step):
    """`split` by content hash: the same text lands in the same split on every run."""

    def __init__(self, cfg: SplitConfig):
        self.cfg = cfg

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        u = batch["key"].map(lambda k: split_point(k, self.cfg.salt))
        test = self.cfg.test_share
        val = test + self.cfg.validation_share
        batch["split"] = np.where(u < test, "test", np.where(u < val, "validation", "train"))
        batch["split_point"] = u.astype(float)
        return batch


# ---------------------------------------------------------------------- tokenize


class Tokenize(schema.Step):
    """`input_ids` (list<int32>) and `n_tokens` for each text, with the injected tokenizer.

    Holds the tokenizer as its serialized JSON (small, picklable) and builds the Rust
    tokenizer on first use in each worker process. Ray runs it as tasks: an actor pool
    would load it once per actor, but starting actors costs seconds on a 2-core machine
    and the build costs milliseconds. `add_special_tokens=False`: packing adds the EOS.
    """

    def __init__(self, tokenizer_json: str):
        self.tokenizer_json = tokenizer_json
        self._tokenizer: Tokenizer | None = None

    def __getstate__(self) -> dict:
        return {"tokenizer_json": self.tokenizer_json, "_tokenizer": None}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_str(self.tokenizer_json)
        return self._tokenizer

    def __call__(self, batch: pd.DataFrame) -> pa.Table:  # type: ignore[override]
        # encode_batch_fast: no character offsets, which nothing here uses (~25% faster).
        encoded = self.tokenizer.encode_batch_fast(list(batch["text"]), add_special_tokens=False)
        # Straight into an Arrow list<int32> column: no per-document NumPy array or Python
        # list survives the batch, and Ray stores the column as is.
        ids = pa.array([e.ids for e in encoded], type=pa.list_(pa.int32()))
        return pa.table(
            {
                "key": pa.array(batch["key"].tolist(), type=pa.string()),
                "split": pa.array(batch["split"].tolist(), type=pa.string()),
                artifacts.TOKEN_COLUMN: ids,
                "n_tokens": pc.list_value_length(ids).cast(pa.int64()),
            }
        )


class Pack:
    """Documents (in order) -> fixed-length sequences: doc EOS doc EOS ..., tail dropped.

    The reference definition of packing, in one process; the stage packs shard by shard in
    Ray (`flywheel.data.shards`) and a unit test holds the two equal. The tail shorter than
    one sequence is dropped (counted as `tail_tokens`): padding it would teach the model
    padding. A long document simply spans several sequences.
    """

    def __init__(self, seq_len: int, eos_id: int):
        self.seq_len = seq_len
        self.eos_id = eos_id

    def stream(self, batch: pd.DataFrame) -> np.ndarray:
        eos = np.array([self.eos_id], dtype=np.int32)
        parts = [p for ids in batch["input_ids"] for p in (np.asarray(ids, dtype=np.int32), eos)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    def sequences(self, batch: pd.DataFrame) -> tuple[np.ndarray, int]:
        """(sequences as an (n, seq_len) int32 array, tail tokens dropped)."""
        flat = self.stream(batch)
        n = len(flat) // self.seq_len
        return flat[: n * self.seq_len].reshape(n, self.seq_len), len(flat) - n * self.seq_len
