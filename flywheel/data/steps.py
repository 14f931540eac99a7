"""The data blocks. One contract: `block(batch: pd.DataFrame) -> pd.DataFrame`.

Each block is small and runs under Ray Data `map_batches(batch_format="pandas")` (or
`groupby(...).map_groups` for the ones that need all rows of a key together); the stage
in `flywheel.data.stage` wires them. Blocks that judge documents mark rows (see
`schema.mark`) instead of deleting them, so every drop is counted with its reason.
State that is expensive to build (MinHash permutations, a tokenizer) lives in a callable
class, built once per Ray actor.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib

import numpy as np
import pandas as pd

from flywheel.config import DedupConfig, FilterConfig, SplitConfig
from flywheel.data import schema as S

# Groups for the keyed shuffles. Ray's map_groups calls Python once per group, so keying
# on the band hash itself (~100k distinct values) costs ~1 ms per group; keying on a
# coarse bucket of it and grouping with pandas inside the UDF is ~40x faster on 2 cores.
# The result does not depend on this number, only the parallelism does.
NUM_BUCKETS = 16

_SPACES = re.compile(r"[^\S\n]+")  # runs of whitespace other than newlines
_TRAILING = re.compile(r"[^\S\n]+\n")
_BLANKS = re.compile(r"\n{3,}")
_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
_WORD = re.compile(r"\w+")


def _bucket(keys: pd.Series) -> pd.Series:
    return keys.str.slice(0, 8).map(lambda h: int(h, 16) % NUM_BUCKETS).astype("int64")


# --------------------------------------------------------------------- normalize


def normalize_text(text: str) -> str:
    """NFC, unified newlines, no invisible characters, no trailing spaces, <=1 blank line.

    Leading indentation stays: the Python docs hold code examples whose meaning is
    their indentation. Runs of inner spaces collapse only when they follow a
    non-space (so `a    b` -> `a b`, but an indented line keeps its indent).
    """
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


class Normalize(S.Block):
    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        todo = S.pending(batch)
        batch.loc[todo, "text"] = batch.loc[todo, "text"].map(normalize_text)
        return batch


# ----------------------------------------------------------------------- quality


def alpha_share(text: str) -> float:
    # map() over str methods runs the per-character loop in C (3x a comprehension).
    visible = len(text) - sum(map(str.isspace, text))
    return sum(map(str.isalpha, text)) / visible if visible else 0.0


def repeated_line_share(text: str) -> float:
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    return (1 - len(set(lines)) / len(lines)) if lines else 0.0


class QualityFilter(S.Block):
    """Length bounds, alphabetic share, repeated-line share (thresholds in `data.filters`)."""

    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        cfg = self.cfg
        todo = S.pending(batch)
        text = batch["text"].where(todo, "")
        n = text.str.len()
        S.mark(
            batch, todo & (n < cfg.min_chars), S.QUALITY, "too_short", n.map(lambda v: f"{v} chars")
        )
        S.mark(
            batch, todo & (n > cfg.max_chars), S.QUALITY, "too_long", n.map(lambda v: f"{v} chars")
        )
        todo = S.pending(batch)
        alpha = text.where(todo, "").map(alpha_share)
        S.mark(
            batch,
            todo & (alpha < cfg.min_alpha_share),
            S.QUALITY,
            "low_alpha_share",
            alpha.map(lambda v: f"alpha share {v:.2f}"),
        )
        todo = S.pending(batch)
        rep = text.where(todo, "").map(repeated_line_share)
        S.mark(
            batch,
            todo & (rep > cfg.max_repeated_line_share),
            S.QUALITY,
            "repeated_lines",
            rep.map(lambda v: f"repeated-line share {v:.2f}"),
        )
        return batch


# ------------------------------------------------------------------------ dedup


class ContentKey(S.Block):
    """`key`: the hash of the normalized text (exact-duplicate identity, split hash input)."""

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch["key"] = batch["text"].map(
            lambda t: hashlib.sha256(t.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        )
        batch["bucket"] = _bucket(batch["key"])
        return batch


class ExactDedup(S.Block):
    """Per group of buckets: keep the smallest id of each `key`, mark the rest.

    Runs under `groupby("bucket").map_groups`, so every copy of a text is in one call.
    Smallest id (not first seen) keeps the choice independent of Ray's ordering.
    """

    row_wise = False

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        todo = batch[S.pending(batch)].sort_values(["key", "id"])
        first = todo.groupby("key")["id"].transform("first")
        dup = first != todo["id"]
        mask = pd.Series(False, index=batch.index)
        mask[dup[dup].index] = True
        detail = pd.Series("", index=batch.index)
        detail[dup[dup].index] = "copy of " + first[dup]
        S.mark(batch, mask, S.EXACT_DEDUP, "exact_duplicate", detail)
        return batch


def shingles(text: str, size: int) -> set[bytes]:
    words = _WORD.findall(text.lower())
    if len(words) < size:
        # Short texts are one shingle; an empty set would give every such text the
        # same (all-max) signature and make them look like duplicates of each other.
        return {" ".join(words).encode() or text.encode()}
    return {" ".join(words[i : i + size]).encode() for i in range(len(words) - size + 1)}


class MinHashSignature(S.Block):
    """`minhash`: datasketch MinHash (num_perm uint32 values) of word shingles, as bytes."""

    def __init__(self, cfg: DedupConfig, seed: int = 1):
        from datasketch import MinHash

        self.cfg = cfg
        self.seed = seed
        # Permutations are derived from the seed; build them once, not once per document.
        self.permutations = MinHash(num_perm=cfg.num_perm, seed=seed).permutations

    def signature(self, text: str) -> bytes:
        from datasketch import MinHash

        m = MinHash(
            num_perm=self.cfg.num_perm,
            seed=self.seed,
            permutations=self.permutations,
            scheme="affine32",
            # The base hash only has to spread shingles over 32 bits before the 128
            # permutations; zlib's C crc32 is 5x faster here than datasketch's default
            # (a Python wrapper around sha1), which made MinHash the stage's top cost.
            hashfunc=zlib.crc32,
        )
        m.update_batch(list(shingles(text, self.cfg.shingle_size)))
        return m.hashvalues.astype("<u4").tobytes()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        todo = S.pending(batch)
        batch["minhash"] = [
            self.signature(t) if k else b"" for t, k in zip(batch["text"], todo, strict=True)
        ]
        return batch


class LshBands(S.Block):
    """One row per (document, band): `band` = hash of the band's slice of the signature."""

    def __init__(self, cfg: DedupConfig):
        self.bands = cfg.bands
        self.rows = cfg.num_perm // cfg.bands

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        keys, bands = [], []
        width = self.rows * 4
        for key, sig in zip(batch["key"], batch["minhash"], strict=True):
            for b in range(self.bands):
                h = hashlib.blake2b(
                    sig[b * width : (b + 1) * width], digest_size=8, person=b.to_bytes(4, "little")
                )
                keys.append(key)
                bands.append(int.from_bytes(h.digest(), "little", signed=True))
        out = pd.DataFrame({"key": keys, "band": np.array(bands, dtype=np.int64)})
        out["bucket"] = (out["band"] % NUM_BUCKETS).astype("int64")
        return out


class BandCandidates(S.Block):
    """Per group: candidate pairs (a < b) of documents that share a band.

    All pairs inside a band of up to `max_all_pairs` members; a larger band (boilerplate
    shared by many documents) pairs each member with the band's smallest key only, so
    the work stays linear. Union-find later joins what the star misses transitively.
    """

    row_wise = False

    def __init__(self, max_all_pairs: int = 16):
        self.max_all_pairs = max_all_pairs

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
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


class AttachSignature(S.Block):
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


class VerifyPairs(S.Block):
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
    depend on the order pairs arrive in.
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


class ApplyDrops(S.Block):
    """Mark documents whose key is in `drops` ({key: kept key}) as near-duplicates."""

    def __init__(self, drops: dict[str, str], kept_ids: dict[str, str] | None = None):
        self.drops = drops
        self.kept_ids = kept_ids or {}

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        if not self.drops:
            return batch
        kept = batch["key"].map(self.drops)
        mask = kept.notna()
        detail = kept.where(mask, "").map(lambda k: f"near-duplicate of {self.kept_ids.get(k, k)}")
        S.mark(batch, mask, S.NEAR_DEDUP, "near_duplicate", detail)
        return batch


# ------------------------------------------------------------------------- split


def split_point(key: str, salt: str) -> float:
    """A uniform number in [0, 1) from the document's content hash and the salt."""
    h = hashlib.sha256(f"{salt}\x1f{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


class AssignSplit(S.Block):
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


class Tokenize(S.Block):
    """`input_ids` (int32) and `n_tokens` for each text, with the injected tokenizer.

    Holds the tokenizer as its serialized JSON (small, picklable) and builds the Rust
    tokenizer on first use in each worker process. Ray runs it as tasks: an actor pool
    would load it once per actor, but starting actors costs seconds on a 2-core machine
    and the build costs milliseconds. `add_special_tokens=False`: packing adds the EOS.
    """

    def __init__(self, tokenizer_json: str):
        self.tokenizer_json = tokenizer_json
        self._tokenizer = None

    def __getstate__(self) -> dict:
        return {"tokenizer_json": self.tokenizer_json, "_tokenizer": None}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_str(self.tokenizer_json)
        return self._tokenizer

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        encoded = self.tokenizer.encode_batch(list(batch["text"]), add_special_tokens=False)
        ids = [np.asarray(e.ids, dtype=np.int32) for e in encoded]
        out = batch[["key", "split"]].copy()
        out["input_ids"] = ids
        out["n_tokens"] = np.array([len(i) for i in ids], dtype=np.int64)
        return out


class Pack(S.Block):
    """Documents (sorted) -> fixed-length blocks: doc EOS doc EOS ..., tail dropped.

    The tail shorter than one block is dropped (it is counted as `tail_tokens`): padding
    it would teach the model padding. A long document simply spans several blocks.
    """

    def __init__(self, block_size: int, eos_id: int):
        self.block_size = block_size
        self.eos_id = eos_id

    def stream(self, batch: pd.DataFrame) -> np.ndarray:
        eos = np.array([self.eos_id], dtype=np.int32)
        parts = [p for ids in batch["input_ids"] for p in (np.asarray(ids, dtype=np.int32), eos)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    def blocks(self, batch: pd.DataFrame) -> tuple[np.ndarray, int]:
        """(blocks as an (n, block_size) int32 array, tail tokens dropped)."""
        flat = self.stream(batch)
        n = len(flat) // self.block_size
        return flat[: n * self.block_size].reshape(n, self.block_size), len(
            flat
        ) - n * self.block_size

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        blocks, _ = self.blocks(batch)
        return pd.DataFrame({"input_ids": list(blocks)})
