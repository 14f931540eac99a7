"""The training loop's SFT pieces without Ray: length-grouped micro-batches, the masked
validation loss on a real tiny GPT-2, and the plan of an SFT dataset."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from flywheel import artifacts
from flywheel.config import load_profile
from flywheel.sft.render import IGNORE_INDEX, Sample, padding_share
from flywheel.train.loop import _validation_loss, group_by_length, validation_batches


def test_length_groups_cover_every_sample_once_and_cut_padding():
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(70)]
    samples = [Sample(str(i), [1] * n, [1] * n) for i, n in enumerate(lengths)]
    groups, left = group_by_length(samples, 4, random.Random(1))
    assert all(len(g) == 4 for g in groups) and len(left) == 70 % 4
    seen = [s.id for g in groups for s in g] + [s.id for s in left]
    assert sorted(seen) == sorted(s.id for s in samples)
    grouped = padding_share([len(s.input_ids) for g in groups for s in g], 4)
    assert grouped < padding_share(lengths, 4) / 3  # random order pads far more
    # The groups come in random order (not shortest first).
    firsts = [len(g[0].input_ids) for g in groups]
    assert firsts != sorted(firsts)


def test_validation_batches_pad_and_mask():
    rows = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
        {"input_ids": [5, 9], "labels": [-100, 9]},
    ]
    (batch,) = validation_batches(rows, micro=2, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 9, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 9, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    (text,) = validation_batches([[1, 2, 3]], micro=2, pad_id=0)
    assert text["labels"].tolist() == [[1, 2, 3]] and "attention_mask" not in text


class _Engine:
    """What `_validation_loss` uses of a DeepSpeed engine, over a plain model."""

    def __init__(self, model):
        self.model, self.device = model, torch.device("cpu")

    def __call__(self, **inputs):
        return self.model(**inputs)

    def eval(self):
        self.model.eval()

    def train(self):
        self.model.train()


def test_validation_loss_is_the_response_loss_alone():
    """Would fail if prompt or padding tokens counted: the expected value is computed by
    hand over the response positions only, and differs from the all-token loss."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=50,
            n_positions=16,
            n_embd=16,
            n_layer=1,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    rows = [
        {"input_ids": [3, 4, 5, 6, 7, 8], "labels": [-100, -100, -100, -100, 7, 8]},
        {"input_ids": [9, 10, 11], "labels": [-100, 10, 11]},
        {"input_ids": [12, 13, 14, 15], "labels": [-100, -100, 14, 15]},
    ]
    got = _validation_loss(_Engine(model), rows, micro=2, pad_id=0)

    nll, n = 0.0, 0
    model.eval()  # _validation_loss hands the model back in train mode (dropout on)
    with torch.no_grad():
        for r in rows:
            logp = model(input_ids=torch.tensor([r["input_ids"]])).logits[0].log_softmax(-1)
            for t in range(1, len(r["labels"])):
                if r["labels"][t] != IGNORE_INDEX:
                    nll -= float(logp[t - 1, r["labels"][t]])
                    n += 1
    assert got == pytest.approx(nll / n, rel=1e-5)
    every = _validation_loss(
        _Engine(model), [{**r, "labels": r["input_ids"]} for r in rows], micro=2, pad_id=0
    )
    assert abs(every - got) > 1e-3


def test_plan_of_an_sft_dataset(state_dir, tmp_path):
    from flywheel.data.stage import prepare
    from flywheel.train.plan import make_plan

    overrides = ["data.format=instruction", "data.block_size=256", "model.context=256"]
    profile = load_profile(None, [*overrides, "data.tokenizer.vocab_size=600"])
    stats = prepare(profile, tmp_path / "ds")
    plan = make_plan(profile, tmp_path / "ds")
    d = plan.dataset
    assert d.is_sft and d.format == "instruction"
    assert d.train_blocks == stats.sequences["train"] and d.train_tokens == stats.tokens["train"]
    assert d.block_size == 256 and d.vocab_size == stats.vocab_size
    mean = stats.tokens["train"] / stats.sequences["train"]
    assert plan.tokens_per_step == round(plan.global_batch * mean)
    assert plan.tokens_per_step < plan.global_batch * 256

    from flywheel.tune.trial import validation_slice

    rows = validation_slice(tmp_path / "ds", n=4)
    assert len(rows) == 4 and set(rows[0]) == {artifacts.TOKEN_COLUMN, artifacts.LABEL_COLUMN}
    assert IGNORE_INDEX in rows[0]["labels"]


def test_an_sft_dataset_smaller_than_a_global_batch_is_refused(state_dir, tmp_path):
    from flywheel.errors import DataError
    from flywheel.sft.stage import prepare_records
    from flywheel.train.plan import make_plan

    src = tmp_path / "r.jsonl"
    src.write_text('{"prompt": "What is a test?", "response": "A check that can fail."}\n' * 3)
    base = ["data.format=instruction", "data.source.kind=files", f"data.source.path={src}"]
    profile = load_profile(
        None, [*base, "data.split.validation_share=0", "data.split.test_share=0"]
    )
    prepare_records(profile, tmp_path / "ds")
    with pytest.raises(DataError, match=r"3 training samples is fewer than one global batch of 16"):
        make_plan(profile, Path(tmp_path / "ds"))
