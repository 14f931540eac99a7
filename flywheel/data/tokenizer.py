"""The tokenizer: a base one from the profile, or byte-level BPE trained on the train split.

Both end as a `PreTrainedTokenizerFast` saved with `save_pretrained`, with an EOS token
(packing separates documents with it) and a pad token (evaluation pads batches), so
`AutoTokenizer.from_pretrained(dataset/tokenizer)` is all a later stage needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from flywheel.config import TokenizerConfig
from flywheel.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

EOS = "<|endoftext|>"


def train_bpe(texts: Iterable[str], cfg: TokenizerConfig, length: int | None = None):
    """Byte-level BPE (GPT-2 style) with HF tokenizers; no unknown tokens, ever.

    Deterministic for the same texts: the trainer counts words (order does not matter)
    and breaks ties between equal-count merges by the pair itself.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return wrap(tok)


def sample_share(cfg: TokenizerConfig, train_docs: int) -> float:
    """The share of the train split the BPE trains on (`data.tokenizer.train_docs`)."""
    if cfg.train_docs is None or train_docs <= cfg.train_docs:
        return 1.0
    return cfg.train_docs / train_docs


def in_sample(keys: pd.Series, share: float) -> pd.Series:
    """Whether each document (by its content-hash `key`, hex) is in a `share` sample: the
    first 32 bits of the hash, uniform, below share x 2^32. Content decides, not order or
    batching, so the same corpus trains the same tokenizer."""
    import numpy as np
    import pandas as pd

    head = keys.str.slice(0, 8).map(lambda h: int(h, 16)).to_numpy(dtype=np.uint64)
    return pd.Series(head < np.uint64(share * 2**32), index=keys.index)


def wrap(tok):
    """A `tokenizers.Tokenizer` (or its JSON) trained by `train_bpe`, as the fast tokenizer
    the stage saves."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if isinstance(tok, str):
        tok = Tokenizer.from_str(tok)
    # GPT-2 convention: one special token serves as EOS, BOS and padding. Padding is
    # masked out by the attention mask; packed training sequences never contain padding.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=None
    )


def train_bpe_in_ray(texts_ds, cfg: TokenizerConfig, length: int):
    """`train_bpe` over a (materialized) Ray dataset's `text` column, inside one Ray task:
    the trainer counts words in one process by design, and that process is not the driver,
    so no text passes through it. Returns the fast tokenizer."""
    import ray

    @ray.remote(num_cpus=1)
    def train(ds, cfg: TokenizerConfig, length: int) -> str:
        batches = ds.iter_batches(batch_size=1024, batch_format="pandas")
        texts = (t for batch in batches for t in batch["text"])
        return train_bpe(texts, cfg, length=length).backend_tokenizer.to_str()

    return wrap(ray.get(train.remote(texts_ds, cfg, length)))


def load_base(name: str, field: str = "data.tokenizer.base"):
    """A tokenizer by local path or hub id; it must define EOS (pad defaults to EOS).

    A hub id is looked up with one bounded request first (`flywheel.data.hub`), so no
    network fails in seconds, in one line, instead of after ~25 s of retry warnings.
    """
    from transformers import AutoTokenizer

    from flywheel.data import hub

    local = Path(name).expanduser()
    where = local if local.exists() else name
    can = hub.access(name, files=("tokenizer_config.json", "tokenizer.json"))
    if can.problem:
        raise DataError(f"{field}: cannot load tokenizer '{name}': {can.problem}")
    try:
        tok = AutoTokenizer.from_pretrained(str(where), local_files_only=can.local_only)
    except Exception as exc:  # OSError, ValueError, network errors: all mean "cannot load"
        text = " ".join(str(exc).split())
        raise DataError(f"{field}: cannot load tokenizer '{name}': {text}") from None
    if not getattr(tok, "is_fast", False):
        raise DataError(f"{field}: '{name}' has no fast (Rust) tokenizer")
    if tok.eos_token_id is None:
        raise DataError(f"{field}: '{name}' defines no eos_token; packing needs one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def save(tok, out_dir: Path) -> dict:
    """Save and describe the tokenizer (the manifest's `tokenizer` entry)."""
    tok.save_pretrained(str(out_dir))
    return {
        "vocab_size": len(tok),
        "eos_token": tok.eos_token,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
