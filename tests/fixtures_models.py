"""Tiny models and a tiny held-out split, built in code (seconds), for evaluation and
registry tests. Stand-in for the outputs of the data and training stages, in their
layouts (`flywheel.artifacts`), so these tests do not depend on those stages.

Real text: paragraphs of the pydoc topics shipped with the interpreter. A byte-level BPE
trained here with `tokenizers`; a 2-layer GPT-2 from a config; "trained" means a few
dozen AdamW steps on the training paragraphs, enough to beat a random init by far.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

from flywheel import artifacts

CONTEXT = 64
VOCAB = 512


def paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        out.extend(p.strip() for p in topics[key].split("\n\n") if len(p.strip()) >= 64)
    return out


def split_paragraphs() -> tuple[list[str], list[str]]:
    """(train, test): every 10th paragraph is held out."""
    paras = paragraphs()
    train = [p for i, p in enumerate(paras) if i % 10]
    test = [p for i, p in enumerate(paras) if not i % 10]
    return train, test


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=CONTEXT,
    )


def fresh_model(tokenizer, seed: int = 0, context: int = CONTEXT):
    """A random-init 2-layer GPT-2 (32 wide) over `tokenizer`, `context` positions."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=context,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(cfg)


def train_steps(
    model,
    tokenizer,
    texts: list[str],
    steps: int,
    seed: int = 0,
    lr: float = 1e-2,
    context: int = CONTEXT,
):
    """A few plain AdamW steps on packed blocks of `context` tokens, batch 16; returns the
    per-step losses."""
    import torch

    torch.manual_seed(seed)
    ids = [t for doc in tokenizer(texts)["input_ids"] for t in [*doc, tokenizer.eos_token_id]]
    n = len(ids) // context
    blocks = torch.tensor(ids[: n * context]).view(n, context)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        batch = blocks[torch.randint(0, n, (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def save_model(model, tokenizer, out: Path, info: dict | None = None) -> Path:
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / artifacts.TRAINING_INFO).write_text(json.dumps(info or {"fixture": __name__}))
    return out


def build_models(root: Path, steps: int = 60) -> tuple[Path, Path]:
    """(random-init model dir, model dir trained `steps` steps), same tokenizer."""
    train, _ = split_paragraphs()
    tok = train_tokenizer(train)
    random_dir = save_model(fresh_model(tok), tok, Path(root) / "random")
    trained = fresh_model(tok)
    losses = train_steps(trained, tok, train, steps)
    trained_dir = save_model(trained, tok, Path(root) / "trained", {"losses": losses})
    return random_dir, trained_dir


def build_eval_dataset(out: Path, max_docs: int | None = 200) -> Path:
    """A Dataset directory with what evaluation reads: manifest.json and text/test.parquet."""
    import pandas as pd

    out = Path(out)
    _, test = split_paragraphs()
    test = test[:max_docs] if max_docs else test
    (out / artifacts.TEXT_DIR).mkdir(parents=True, exist_ok=True)
    now = datetime(2024, 1, 1, tzinfo=UTC)
    frame = pd.DataFrame(
        {
            "id": [f"pydoc-{i:05d}" for i in range(len(test))],
            "source": ["pydoc_data.topics"] * len(test),
            "timestamp": [now] * len(test),
            "text": test,
        }
    )
    frame.to_parquet(out / artifacts.TEST_TEXT, index=False)
    digest = hashlib.sha256("\n".join(test).encode()).hexdigest()
    manifest = {
        "schema_version": artifacts.SCHEMA_VERSION,
        "content_hash": digest,
        "documents": {"test": len(test)},
        "fixture": "tests/fixtures_models.py",
    }
    (out / artifacts.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def promote_worker(profile: dict, version: str, actor: str, barrier, results) -> None:
    """Run in a spawned process: warm up, wait for the other racer, promote, report back."""
    from flywheel.config import Profile
    from flywheel.registry import Registry

    reg = Registry(Profile.model_validate(profile))
    reg.versions()  # imports and connections done before the race starts
    barrier.wait(timeout=120)
    try:
        entry = reg.promote(version, reason=f"race {actor}", actor=actor)
        results.put((actor, entry.to_tag()))
    except Exception as exc:  # reported to the parent, which fails the test with it
        results.put((actor, f"ERROR {type(exc).__name__}: {exc}"))
