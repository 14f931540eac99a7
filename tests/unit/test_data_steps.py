"""Each data step on an in-memory batch (no Ray): the block contract is DataFrame -> DataFrame."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from flywheel.config import DedupConfig, FilterConfig, SplitConfig
from flywheel.data import schema, sources, steps

LOREM = (
    "The quick brown fox jumps over the lazy dog while the cat watches from the warm "
    "window sill and the bird sings a song about the river that runs past the old mill "
    "where the miller grinds the wheat into flour for the bakers of the small town."
)


def docs(*texts: str, ids: list[str] | None = None) -> pd.DataFrame:
    ids = ids or [f"d{i}" for i in range(len(texts))]
    return schema.doc_frame([sources.doc_row(i, "src", t) for i, t in zip(ids, texts, strict=True)])


# --------------------------------------------------------------------- normalize


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Cafe\u0301", "Café"),  # NFD -> NFC
        ("a\r\nb\rc", "a\nb\nc"),
        ("line   \nnext\t\n", "line\nnext"),
        ("a\n\n\n\n\nb", "a\n\nb"),
        ("zero\u200bwidth\ufeff", "zerowidth"),
        ("words    spaced\u00a0out", "words spaced out"),
        ("def f():\n    return  1", "def f():\n    return 1"),  # indentation kept
        ("\tindented", "indented"),  # leading whitespace of the document is stripped
        ("x\n\tdeeper", "x\n    deeper"),
    ],
)
def test_normalize_text(raw, clean):
    assert steps.normalize_text(raw) == clean


# Pieces that exercise every rule: CR/CRLF, tabs, odd and Unicode spaces, invisible and
# combining characters, indents, trailing spaces, blank-line runs.
_PIECES = [
    "a",
    "b.",
    " ",
    "  ",
    "   ",
    "\n",
    "\n\n",
    "\n\n\n",
    " \n",
    "\n ",
    "\n  x",
    "\t",
    "\n\t",
    "\r",
    "\r\n",
    "\x0b",
    "\x1c",
    "\xa0",
    "\u3000",
    "\u200b",
    "e\u0301",
    "é",
    "_1",
]
_ASCII_PIECES = ["a", "b.", " ", "  ", "   ", "\n", "\n\n", "\n\n\n", " \n", "x y", "\t"]


@pytest.mark.parametrize("pieces", [_PIECES, _ASCII_PIECES])
def test_normalize_fast_path_equals_the_line_by_line_definition(pieces):
    """The str-method fast path for plain ASCII text returns exactly what the general
    line loop returns, on random texts built from the pieces every rule looks at."""
    rng = np.random.default_rng(0)
    fast = 0
    for _ in range(8000):
        text = "".join(rng.choice(pieces, size=rng.integers(0, 30)))
        assert steps.normalize_text(text) == steps.normalize_general(text), repr(text)
        fast += steps._plain_ascii(text) is not None
    assert fast > 200  # the fast path was taken, not only the general one


def test_alpha_share_ascii_path_equals_the_per_character_count():
    rng = np.random.default_rng(1)
    for _ in range(5000):
        text = "".join(
            rng.choice([*_ASCII_PIECES, "1", "_", "\x1f", "!"], size=rng.integers(0, 20))
        )
        visible = len(text) - sum(map(str.isspace, text))
        want = sum(map(str.isalpha, text)) / visible if visible else 0.0
        assert steps.alpha_share(text) == want, repr(text)


def test_normalize_leaves_judged_rows_alone():
    batch = docs("Cafe\u0301  x", "Cafe\u0301  y")
    schema.mark(batch, batch["id"] == "d1", schema.QUALITY, "too_short")
    out = steps.Normalize()(batch)
    assert out["text"].tolist() == ["Café x", "Cafe\u0301  y"]


# ----------------------------------------------------------------------- quality


def test_quality_filter_reasons():
    cfg = FilterConfig(
        min_chars=20, max_chars=400, min_alpha_share=0.5, max_repeated_line_share=0.3
    )
    batch = docs(
        LOREM[:200],
        "too short",
        LOREM * 3,
        "1234567890 " * 5 + "abc",
        "same line\n" * 5 + "another line\n",
    )
    out = steps.QualityFilter(cfg)(batch)
    assert out["reason"].tolist() == [
        "",
        "too_short",
        "too_long",
        "low_alpha_share",
        "repeated_lines",
    ]
    assert set(out.loc[out["reason"] != "", "dropped_by"]) == {schema.QUALITY}
    assert out.loc[1, "detail"] == "9 chars"
    assert out.loc[3, "detail"] == "alpha share 0.06"  # 3 letters of 53
    assert "repeated-line share 0.67" in out.loc[4, "detail"]


def test_quality_filter_does_not_overwrite_a_reject():
    batch = schema.doc_frame([sources.reject_row("r", "f.jsonl", schema.MALFORMED_JSON, "line 1")])
    out = steps.QualityFilter(FilterConfig())(batch)
    assert (out.loc[0, "dropped_by"], out.loc[0, "reason"]) == (schema.READ, schema.MALFORMED_JSON)


def test_alpha_and_repeated_share():
    assert steps.alpha_share("ab 12") == 0.5
    assert steps.alpha_share("   ") == 0.0
    assert steps.repeated_line_share("a\na\nb\n\n") == pytest.approx(1 / 3)


# ------------------------------------------------------------------------ dedup


def test_content_key_and_bucket():
    out = steps.ContentKey()(docs("same", "same", "other"))
    assert out.loc[0, "key"] == out.loc[1, "key"] != out.loc[2, "key"]
    assert len(out.loc[0, "key"]) == 32
    assert out["bucket"].between(0, steps.NUM_BUCKETS - 1).all()


def test_exact_first_and_mark_copies_drop_what_exact_dedup_drops():
    """The stage's two-part exact dedup (keys and ids grouped, copies broadcast) marks the
    same rows with the same detail as the one-batch ExactDedup, same-id copies included."""
    rng = np.random.default_rng(4)
    texts = [f"text {int(t)}" for t in rng.integers(0, 40, size=200)]
    ids = [f"id{int(i)}" for i in rng.integers(0, 150, size=200)]
    batch = steps.ContentKey()(docs(*texts, ids=ids))
    want = steps.ExactDedup()(batch.copy())
    first = steps.ExactFirst()(batch[["key", "id", "bucket"]])
    mark = steps.MarkCopies([])
    mark.first = dict(zip(first["key"], first["first"], strict=True))
    got = mark(batch.copy())
    assert (want["reason"] == "exact_duplicate").sum() > 50
    pd.testing.assert_frame_equal(got, want)


def test_exact_dedup_keeps_smallest_id():
    batch = steps.ContentKey()(docs("dup text", "unique", "dup text", ids=["z", "a", "b"]))
    out = steps.ExactDedup()(batch)
    assert out["reason"].tolist() == ["exact_duplicate", "", ""]
    assert out.loc[0, "detail"] == "copy of b"


def test_shingle_hashes():
    texts = ["a b c d e f", "A, b; c d e!", "One two three", "one two three", "!!!", "?"]
    keys = [hashlib.sha256(t.encode()).hexdigest()[:32] for t in texts]
    hashes, offsets = steps.shingle_hashes(texts, 5, keys)
    rows = [set(hashes[offsets[i] : offsets[i + 1]].tolist()) for i in range(len(texts))]
    assert [len(r) for r in rows] == [2, 1, 1, 1, 1, 1]
    assert rows[1] < rows[0]  # same words, other case and punctuation: the same 5-gram
    assert rows[2] == rows[3]  # fewer words than the size: one shingle of all of them
    assert rows[0].isdisjoint(rows[2])
    assert rows[4] != rows[5]  # no words: never the same shingle for different texts
    # Shifting the words changes the n-grams: order matters inside a shingle.
    shifted, _ = steps.shingle_hashes(["b c d e a"], 5, keys[:1])
    assert not set(shifted.tolist()) & rows[0]


def test_ascii_words_are_the_regex_words():
    """The NumPy split of ASCII texts gives the words, in order, of the regex split it
    replaces for them (document boundaries included: a text ending in a word character
    followed by one starting with one)."""
    rng = np.random.default_rng(5)
    alphabet = list("abcXYZ019_ -.,;!?\n\t'\"")
    for _ in range(300):
        texts = [
            "".join(rng.choice(alphabet, size=rng.integers(0, 40)))
            for _ in range(rng.integers(1, 12))
        ]
        arr = pa.array(texts, type=pa.string())
        want_doc, want = steps._regex_words(arr)
        got_doc, got = steps._ascii_words(arr)
        assert got_doc.tolist() == want_doc.tolist()
        assert got.to_pylist() == want.to_pylist()


def test_minhash_signatures_are_pinned():
    """Signatures of an ASCII and a non-ASCII text, as PIPELINE_VERSION 3 wrote them: a
    faster path that changed one bit would change every dataset's content under the same
    version (this digest is from the regex-only implementation it replaced)."""
    out = steps.MinHashSignature(DedupConfig())(
        steps.ContentKey()(docs(LOREM, "Ünïcode wörds, ÀND ascii_words 42"))
    )
    digest = hashlib.sha256(b"".join(out["minhash"])).hexdigest()
    assert digest == "4dcf46aa7794bc10f8c32db335a396bf075b73607266c9b7abc155ea43da4ce4"


def _sigs(*texts: str, cfg: DedupConfig | None = None) -> pd.DataFrame:
    cfg = cfg or DedupConfig()
    return steps.MinHashSignature(cfg)(steps.ContentKey()(docs(*texts)))


def test_minhash_estimates_jaccard():
    near = LOREM.replace("lazy", "sleepy")
    out = _sigs(
        LOREM, near, "A completely different sentence about databases and indexes and joins."
    )
    sig = [np.frombuffer(s, dtype="<u4") for s in out["minhash"]]
    assert all(len(s) == 128 for s in sig)
    assert (sig[0] == sig[1]).mean() > 0.7
    assert (sig[0] == sig[2]).mean() < 0.1
    # Same text, same signature: the block is deterministic across processes.
    assert out.loc[0, "minhash"] == _sigs(LOREM).loc[0, "minhash"]


def test_minhash_skips_judged_rows():
    batch = steps.ContentKey()(docs(LOREM, "x"))
    schema.mark(batch, batch["id"] == "d1", schema.QUALITY, "too_short")
    out = steps.MinHashSignature(DedupConfig())(batch)
    assert out.loc[1, "minhash"] == b""


def test_lsh_bands_rows():
    cfg = DedupConfig(num_perm=64, bands=16)
    out = steps.LshBands(cfg)(_sigs(LOREM, LOREM + " extra", cfg=cfg))
    assert len(out) == 2 * 16
    assert out["band"].dtype == np.int64
    assert out["bucket"].between(0, steps.NUM_BUCKETS - 1).all()


def test_band_candidates_all_pairs_and_star():
    small = pd.DataFrame({"band": [1, 1, 1, 2, 3], "key": ["c", "a", "b", "a", "d"], "bucket": 0})
    out = steps.BandCandidates()(small)
    assert sorted(map(tuple, out[["a", "b"]].values)) == [("a", "b"), ("a", "c"), ("b", "c")]
    big = pd.DataFrame({"band": [7] * 5, "key": list("edcba"), "bucket": 0})
    out = steps.BandCandidates(max_all_pairs=3)(big)
    assert sorted(map(tuple, out[["a", "b"]].values)) == [
        ("a", "b"),
        ("a", "c"),
        ("a", "d"),
        ("a", "e"),
    ]


def test_attach_and_verify_join_signatures():
    """The two groupby steps of the pair/signature join, run on one in-memory group."""
    near = LOREM.replace("lazy", "sleepy")
    far = "Completely unrelated words about compilers, registers and instruction scheduling."
    sigs = _sigs(LOREM, near, far)
    k0, k1, k2 = sigs["key"]
    sig_rows = pd.DataFrame(
        {"key": sigs["key"], "other": "", "minhash": sigs["minhash"], "peer": [b""] * 3}
    )
    pairs = pd.DataFrame(
        {"key": [k1, k2], "other": [k0, k0], "minhash": [b""] * 2, "peer": [b""] * 2}
    )
    with_b = steps.AttachSignature()(pd.concat([sig_rows, pairs], ignore_index=True))
    assert set(with_b["b"]) == {k1, k2}
    step2 = pd.DataFrame(
        {"key": with_b["a"], "other": with_b["b"], "minhash": [b""] * 2, "peer": with_b["peer"]}
    )
    edges = steps.VerifyPairs(0.7)(pd.concat([sig_rows, step2], ignore_index=True))
    assert list(zip(edges["a"], edges["b"], strict=True)) == [(k0, k1)]
    assert edges["jaccard"].iloc[0] > 0.7
    none = steps.VerifyPairs(0.7)(sig_rows)
    assert none.empty and list(none.columns) == ["a", "b", "jaccard"]


def test_duplicate_components_keep_smallest_key():
    edges = pd.DataFrame({"a": ["b", "c", "x"], "b": ["c", "d", "y"]})
    assert steps.duplicate_components(edges) == {"c": "b", "d": "b", "y": "x"}
    assert steps.duplicate_components(pd.DataFrame({"a": [], "b": []})) == {}


def random_edges(seed: int, nodes: int, edges: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    halves = rng.integers(0, 2**63, size=(nodes, 2))
    keys = np.array([f"{x:016x}{y:016x}" for x, y in halves])
    a, b = rng.integers(0, nodes, edges), rng.integers(0, nodes, edges)
    return pd.DataFrame({"a": keys[a[a != b]], "b": keys[b[a != b]]})


@pytest.mark.parametrize("seed", range(8))
def test_label_propagation_finds_the_union_find_components(seed):
    """The Ray path's rounds (SendLabels/MinLabel, run here in one process) end where the
    union-find does: every node labelled with its component's smallest key."""
    edges = random_edges(seed, nodes=300, edges=120 + 10 * seed)
    want = steps.duplicate_components(edges)
    assert len(set(want.values())) > 20 and len(want) > 2 * len(set(want.values()))
    assert steps.propagate_components(edges) == want
    chain = pd.DataFrame({"a": edges["a"][:40].tolist(), "b": edges["a"][1:41].tolist()})
    assert steps.propagate_components(chain) == steps.duplicate_components(chain)


def test_apply_drops():
    batch = steps.ContentKey()(docs("one", "two"))
    out = steps.ApplyDrops({batch.loc[1, "key"]: "k0"})(batch)
    assert out["reason"].tolist() == ["", "near_duplicate"]
    assert out.loc[1, "dropped_by"] == schema.NEAR_DEDUP
    assert out.loc[1, "detail"] == "near-duplicate of k0"


# ------------------------------------------------------------------------- split


def test_split_is_deterministic_and_salted():
    batch = steps.ContentKey()(docs(*[f"document number {i}" for i in range(2000)]))
    cfg = SplitConfig(validation_share=0.1, test_share=0.2)
    out = steps.AssignSplit(cfg)(batch.copy())
    shares = out["split"].value_counts(normalize=True)
    assert shares["test"] == pytest.approx(0.2, abs=0.03)
    assert shares["validation"] == pytest.approx(0.1, abs=0.03)
    assert out["split"].tolist() == steps.AssignSplit(cfg)(batch.copy())["split"].tolist()
    salted = steps.AssignSplit(SplitConfig(validation_share=0.1, test_share=0.2, salt="other"))(
        batch.copy()
    )
    assert salted["split"].tolist() != out["split"].tolist()


# ---------------------------------------------------------------------- tokenize


@pytest.fixture(scope="module")
def tok():
    from flywheel.config import TokenizerConfig
    from flywheel.data.tokenizer import train_bpe

    return train_bpe([LOREM] * 20, TokenizerConfig(vocab_size=300, min_frequency=2))


def test_tokenize_block(tok):
    import pickle

    block = steps.Tokenize(tok.backend_tokenizer.to_str())
    batch = pd.DataFrame({"key": ["k0", "k1"], "split": ["train", "test"], "text": [LOREM, "fox"]})
    table = pickle.loads(pickle.dumps(block))(batch)  # Ray ships the step pickled
    assert table.column_names == ["key", "split", "input_ids", "n_tokens"]
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())  # arrays, not lists
    out = table.to_pandas()
    assert tok.decode(out["input_ids"].iloc[0].tolist()) == LOREM
    assert out["n_tokens"].tolist() == [len(i) for i in out["input_ids"]]
    assert tok.eos_token_id not in out["input_ids"].iloc[0]


def test_pack_exact_sequences_with_eos():
    batch = pd.DataFrame({"input_ids": [np.array([1, 2, 3], np.int32), np.array([4, 5], np.int32)]})
    seqs, tail = steps.Pack(seq_len=3, eos_id=0).sequences(batch)
    assert seqs.tolist() == [[1, 2, 3], [0, 4, 5]]
    assert tail == 1  # the final EOS does not fill a sequence
    empty, tail = steps.Pack(4, 0).sequences(pd.DataFrame({"input_ids": []}))
    assert empty.shape == (0, 4) and tail == 0


class _Expand(schema.Step):
    """A reader-like step: each input row (`n`) becomes n documents."""

    row_wise = False

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return docs(*[f"text {n} {i}" for n in batch["n"] for i in range(n)])


class _Sizes(schema.Step):
    """Records the size of every batch it is given."""

    def __init__(self):
        self.seen: list[int] = []

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        self.seen.append(len(batch))
        return batch


def test_chain_runs_the_steps_on_slices_of_the_first_steps_rows():
    sizes = _Sizes()
    chain = schema.Chain(_Expand(), steps.ContentKey(), sizes, batch_size=4)
    out = chain(pd.DataFrame({"n": [3, 7]}))
    assert sizes.seen == [4, 4, 2]
    assert out["text"].tolist() == [f"text 3 {i}" for i in range(3)] + [
        f"text 7 {i}" for i in range(7)
    ]
    assert out["key"].str.len().eq(32).all() and list(out.index) == list(range(10))


def test_chain_names_the_step_that_fails():
    class Boom(schema.Step):
        def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
            if (batch["text"] == "text 2 1").any():
                raise ValueError("no")
            return batch

    with pytest.raises(schema.StepFailure, match=r"data step Boom failed on row 'd1'"):
        schema.Chain(_Expand(), Boom(), batch_size=2)(pd.DataFrame({"n": [2]}))


def test_chain_gives_an_empty_read_the_steps_columns():
    """A file with no documents still makes a block with every step's columns (Ray unifies
    the blocks' schemas; a block without `key` or `minhash` would break later selects)."""
    cleaning = [steps.Normalize(), steps.QualityFilter(FilterConfig()), steps.ContentKey()]
    chain = schema.Chain(_Expand(), *cleaning, steps.MinHashSignature(DedupConfig()), batch_size=4)
    out = chain(pd.DataFrame({"n": [0]}))
    assert out.empty and {"key", "bucket", "minhash"} <= set(out.columns)
