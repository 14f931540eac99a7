"""Bits per byte: comparable across tokenizers, counted over the bytes actually scored.

The cross-tokenizer test needs a text whose true information content is known, so that
"comparable" has an anchor: documents of words drawn uniformly and independently from a
16-word lexicon carry exactly log2(16) = 4 bits per word, whatever tokenizer reads them.
Two byte-level BPEs trained here on that text (vocabulary 300: words in ~4 pieces;
vocabulary 2000: whole words) give per-token perplexities ~8x apart, while two tiny
GPT-2s trained on the same text both land within ~11% of the entropy in bits per byte.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_models import save_model, train_steps, train_tokenizer

from flywheel import artifacts
from flywheel.config import EvalConfig, Profile
from flywheel.evaluate import evaluate
from flywheel.evaluate.core import score_documents, scored_bytes
from flywheel.evaluate.metrics import DocSums, bits_per_byte

CONTEXT = 32
N_WORDS = 16


def lexicon(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < N_WORDS:
        words.add(
            "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
        )
    return sorted(words)


def corpus(words: list[str], n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(40)) for _ in range(n_docs)]


def entropy_bits_per_byte(texts: list[str]) -> float:
    """What the ideal model pays: log2(16) bits per word, over the bytes of the text."""
    words = sum(len(t.split()) for t in texts)
    return words * math.log2(N_WORDS) / sum(len(t.encode()) for t in texts)


def tiny_lm(tokenizer, texts: list[str], steps: int):
    """One-layer GPT-2, AdamW on packed blocks of CONTEXT tokens, batch 16."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=1,
            n_embd=32,
            n_head=2,
            n_positions=CONTEXT,
            vocab_size=len(tokenizer),
            bos_token_id=eos,
            eos_token_id=eos,
        )
    )
    train_steps(model, tokenizer, texts, steps, seed=0, lr=1e-2, context=CONTEXT)
    return model


def write_dataset(out: Path, texts: list[str]) -> Path:
    (out / artifacts.TEXT_DIR).mkdir(parents=True, exist_ok=True)
    ids = [f"w-{i:03d}" for i in range(len(texts))]
    pd.DataFrame({"id": ids, "text": texts}).to_parquet(out / artifacts.TEST_TEXT, index=False)
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    (out / artifacts.MANIFEST).write_text(
        json.dumps({"schema_version": artifacts.SCHEMA_VERSION, "content_hash": digest})
    )
    return out


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    """Both models scored by `evaluate` on the same held-out documents."""
    import torch

    torch.set_num_threads(1)  # steadier on a shared box; the models are tiny
    root = tmp_path_factory.mktemp("bpb")
    words = lexicon()
    train, test = corpus(words, 200, seed=1), corpus(words, 30, seed=2)
    ds = write_dataset(root / "ds", test)
    profile = Profile(eval={"bootstrap_samples": 50})
    reports = {}
    # The small vocabulary must learn to spell 16 words piece by piece, so it gets more
    # steps; both are trained to their plateau (pinned from runs: 500 and 150 steps).
    for vocab, steps in ((300, 500), (2000, 150)):
        tok = train_tokenizer(train, vocab)
        model = tiny_lm(tok, train, steps)
        reports[vocab] = evaluate(profile, save_model(model, tok, root / f"v{vocab}"), ds)
    return reports, entropy_bits_per_byte(test), test


def test_same_text_two_tokenizers_comparable_bits_per_byte_not_perplexity(two_tokenizers):
    reports, entropy, test = two_tokenizers
    small, large = reports[300], reports[2000]
    # The same bytes are scored under both tokenizers (no document is truncated) ...
    assert small.n_bytes == large.n_bytes == sum(len(t.encode()) for t in test)
    # ... cut into very different tokens: ~1.4 vs ~7 bytes per token.
    assert small.n_tokens > 3.5 * large.n_tokens
    assert small.tokenizer != large.tokenizer
    # Per-token perplexity differs ~8x (pinned from runs: 2.34 vs 18.9) ...
    assert large.perplexity > 5 * small.perplexity
    # ... while bits per byte agree within ~6% (runs: 0.637 and 0.612, 1.10x and 1.06x the
    # entropy 0.578), both just above what the ideal model pays. Neither can beat the
    # entropy by more than the sampling noise of 30 documents. (Per-token numbers rescaled
    # wrongly, by tokens instead of bytes, would put the two ~5x apart.)
    for rep in (small, large):
        assert 0.97 * entropy < rep.bits_per_byte < 1.2 * entropy, (rep.bits_per_byte, entropy)
    assert abs(small.bits_per_byte / large.bits_per_byte - 1) < 0.12
    # The report's headline is the byte-weighted total of its per-document scores.
    d = small.docs
    assert small.bits_per_byte == pytest.approx(sum(d.bits) / sum(d.bytes))
    assert small.bits_per_byte_ci[0] <= small.bits_per_byte <= small.bits_per_byte_ci[1]


def test_bits_per_byte_is_nats_per_token_rescaled():
    # 2 documents, 10 + 30 nats over 8 + 12 predicted tokens spelling 20 + 60 bytes.
    s = DocSums(np.array([10.0, 30.0]), np.zeros(2), np.array([8.0, 12.0]), np.array([20.0, 60.0]))
    assert bits_per_byte(s) == pytest.approx(40 / math.log(2) / 80)
    assert math.isnan(bits_per_byte(DocSums.empty(2)))


# ------------------------------------------------------------------ bytes scored


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus(lexicon(), 50, seed=3), 300)


def _encode(tok, texts):
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def test_truncated_documents_count_only_the_bytes_of_the_scored_prefix(tokenizer):
    texts = corpus(lexicon(), 4, seed=5)
    ids, offsets = _encode(tokenizer, texts)
    full = scored_bytes(tokenizer, texts, ids, offsets, has_prefix=True, max_tokens=None)
    assert full.tolist() == [len(t.encode()) for t in texts]
    cut = scored_bytes(tokenizer, texts, ids, offsets, has_prefix=True, max_tokens=10)
    # Exactly the bytes the first 10 tokens spell (ASCII text: offsets are exact).
    assert cut.tolist() == [len(tokenizer.decode(doc[:10]).encode()) for doc in ids]
    assert all(c < f / 5 for c, f in zip(cut, full, strict=True))
    # Without offsets (a slow tokenizer), the kept ids are decoded: the same count.
    assert scored_bytes(tokenizer, texts, ids, None, True, 10).tolist() == cut.tolist()
    # Without a beginning-of-text prefix the first token is context, not a prediction.
    no_prefix = scored_bytes(tokenizer, texts, ids, offsets, has_prefix=False, max_tokens=10)
    first = [len(tokenizer.decode(doc[:1]).encode()) for doc in ids]
    assert no_prefix.tolist() == [c - f for c, f in zip(cut, first, strict=True)]


def test_a_cut_inside_a_multibyte_character_counts_it_at_most_once_over(tokenizer):
    # Byte-level BPE splits an unseen 4-byte character into byte tokens; a cut between
    # them charges the whole character (at most 3 bytes more than the tokens spell).
    text = "abc \U0001f600\U0001f600 def"
    ids, offsets = _encode(tokenizer, [text])
    toks = ids[0]
    raw = [
        len(b"".join(_token_bytes(tokenizer, i) for i in toks[:k])) for k in range(len(toks) + 1)
    ]
    assert raw[-1] == len(text.encode())
    straddled = 0
    for k in range(1, len(toks)):
        got = scored_bytes(tokenizer, [text], ids, offsets, True, k)[0]
        assert raw[k] <= got <= raw[k] + 3, (k, got, raw[k])
        straddled += got != raw[k]
    assert straddled > 0  # the text does cut inside a character somewhere


def _token_bytes(tok, token_id: int) -> bytes:
    """The raw bytes of one byte-level BPE token (GPT-2's byte-to-unicode table inverted)."""
    # GPT-2's table: printable bytes map to themselves, the rest to chr(256 + n) in order.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return bytes(table[c] for c in tok.convert_ids_to_tokens(token_id))


def test_score_documents_reports_the_bytes_it_scored(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    texts = corpus(lexicon(), 3, seed=6)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=CONTEXT, vocab_size=len(tokenizer))
    ).eval()
    whole = score_documents(model, tokenizer, texts, EvalConfig(max_tokens_per_doc=None), "cpu")
    assert whole.bytes.tolist() == [len(t.encode()) for t in texts]
    cut = score_documents(model, tokenizer, texts, EvalConfig(max_tokens_per_doc=12), "cpu")
    assert cut.tokens.tolist() == [12, 12, 12]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert cut.bytes.tolist() == [len(tokenizer.decode(d[:12]).encode()) for d in ids]
