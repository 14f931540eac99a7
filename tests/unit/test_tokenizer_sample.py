"""`data.tokenizer.train_docs`: the BPE trains on a content-hash sample of the train split."""

from __future__ import annotations

import hashlib

import pandas as pd
import pytest

from flywheel.config import TokenizerConfig, load_profile
from flywheel.data import tokenizer
from flywheel.errors import ConfigError


def _keys(n: int, prefix: str = "doc") -> pd.Series:
    return pd.Series([hashlib.sha256(f"{prefix}{i}".encode()).hexdigest()[:32] for i in range(n)])


def test_share_is_one_unless_the_train_split_is_larger_than_the_cap():
    # The default samples 50k documents; None trains on all of them.
    assert tokenizer.sample_share(TokenizerConfig(), 50_000) == 1.0
    assert tokenizer.sample_share(TokenizerConfig(), 200_000) == 0.25
    assert tokenizer.sample_share(TokenizerConfig(train_docs=None), 10**6) == 1.0
    none = load_profile(None, ["data.tokenizer.train_docs=null"]).data.tokenizer
    assert tokenizer.sample_share(none, 10**6) == 1.0
    assert tokenizer.sample_share(TokenizerConfig(train_docs=5000), 4000) == 1.0
    assert tokenizer.sample_share(TokenizerConfig(train_docs=5000), 20000) == 0.25


def test_the_sample_is_about_the_share_and_decided_by_content_alone():
    keys = _keys(20000)
    chosen = tokenizer.in_sample(keys, 0.25)
    assert 0.23 < chosen.mean() < 0.27
    # Order and batching do not matter: each document's answer depends on its key only.
    shuffled = keys.sample(frac=1.0, random_state=7)
    again = tokenizer.in_sample(shuffled, 0.25)
    assert again.reindex(keys.index).equals(chosen)
    halves = pd.concat(
        [tokenizer.in_sample(keys[:7000], 0.25), tokenizer.in_sample(keys[7000:], 0.25)]
    )
    assert halves.equals(chosen)
    # A smaller share picks a subset of a larger one's documents.
    assert not (tokenizer.in_sample(keys, 0.1) & ~chosen).any()


def test_train_docs_must_be_positive():
    with pytest.raises(ConfigError, match=r"data\.tokenizer\.train_docs"):
        load_profile(None, ["data.tokenizer.train_docs=0"])
