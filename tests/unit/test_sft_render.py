"""Rendering with a chat template and the loss mask: only response tokens carry labels."""

from __future__ import annotations

import pytest
import torch
from fixtures_data import pydoc_texts, train_tokenizer
from fixtures_models import fresh_model

from flywheel.config import DataConfig
from flywheel.errors import ConfigError
from flywheel.sft import records as R
from flywheel.sft.render import (
    IGNORE_INDEX,
    Renderer,
    Sample,
    collate,
    padding_share,
    records_to_samples,
)

# A template in a different shape from ChatML, standing in for a tokenizer's own.
OWN = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(pydoc_texts(200), 512)  # local byte-level BPE, no template


@pytest.fixture
def own_tok(tok):
    own = train_tokenizer(pydoc_texts(200), 512)
    own.chat_template = OWN
    return own


def conv(*turns, id_="c"):
    return R.Conversation(id_, tuple(R.Turn(r, c) for r, c in turns))


def labelled_text(tok, sample: Sample) -> str:
    return tok.decode([t for t in sample.labels if t != IGNORE_INDEX])


def test_prompt_positions_are_masked_and_response_labels_equal_its_ids(tok):
    sample = Renderer(tok, 256)(
        conv(("system", "Be brief."), ("user", "What does len do?"), ("assistant", "Counts items."))
    )
    assert isinstance(sample, Sample)
    text = tok.decode(sample.input_ids)
    # The response starts right after the generation prompt; everything before it is prompt.
    start = len(tok(text[: text.index("Counts")], add_special_tokens=False)["input_ids"])
    assert start > 0
    assert all(label == IGNORE_INDEX for label in sample.labels[:start])
    assert sample.labels[start:] == sample.input_ids[start:]
    # The stop marker and EOS are learned too: the model must learn where a reply ends.
    assert labelled_text(tok, sample) == "Counts items.<|im_end|><|endoftext|>\n"


def test_multi_turn_every_assistant_turn_learned_no_user_turn(tok):
    sample = Renderer(tok, 256)(
        conv(
            ("user", "First question"),
            ("assistant", "Alpha"),
            ("user", "Second one"),
            ("assistant", "Beta"),
        )
    )
    learned = labelled_text(tok, sample)
    assert "Alpha" in learned and "Beta" in learned
    assert "question" not in learned and "Second" not in learned and "user" not in learned


def test_train_on_inputs_labels_every_token(tok):
    sample = Renderer(tok, 256, train_on_inputs=True)(conv(("user", "Q?"), ("assistant", "A.")))
    assert sample.labels == sample.input_ids


def test_tokenizers_own_template_wins_under_auto(own_tok):
    renderer = Renderer(own_tok, 256, "auto")
    assert renderer.template_name == "tokenizer"
    sample = renderer(conv(("user", "Hi"), ("assistant", "Hello")))
    assert own_tok.decode(sample.input_ids) == "[user] Hi\n[assistant] Hello\n"
    assert labelled_text(own_tok, sample) == "Hello\n"


def test_named_template_overrides_the_tokenizers(own_tok):
    sample = Renderer(own_tok, 256, "chatml")(conv(("user", "Hi"), ("assistant", "Hello")))
    assert own_tok.decode(sample.input_ids).startswith("<|im_start|>user\nHi")


def test_tokenizer_template_required_but_absent_is_config_error(tok):
    with pytest.raises(ConfigError, match=r"data\.chat_template"):
        Renderer(tok, 256, "tokenizer")


def test_turn_order_the_template_rejects(own_tok):
    own_tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        + OWN
    )
    out = Renderer(own_tok, 256)(conv(("system", "S"), ("user", "Q"), ("assistant", "A")))
    assert isinstance(out, R.Reject)
    assert (out.reason, out.detail) == (R.TEMPLATE_REJECTED, "tokenizer: no system role")


def test_template_that_rewrites_earlier_turns_is_rejected(own_tok):
    # Renders the turn count first, so a prefix of the conversation is not a prefix of the text.
    own_tok.chat_template = "{{ messages|length }}" + OWN
    out = Renderer(own_tok, 256)(conv(("user", "Q"), ("assistant", "A")))
    assert isinstance(out, R.Reject) and out.reason == R.TEMPLATE_REJECTED


def test_longer_than_context_is_rejected_not_truncated(tok):
    c = conv(("user", "word " * 40), ("assistant", "fine"))
    out = Renderer(tok, 16)(c)
    assert isinstance(out, R.Reject) and out.reason == R.LONGER_THAN_CONTEXT
    assert "> 16 (data.block_size)" in out.detail
    assert isinstance(Renderer(tok, 256)(c), Sample)


def test_records_to_samples_counts_parse_and_render_rejects(tok):
    cfg = DataConfig(format="instruction", block_size=64)
    rows = [
        {"prompt": "Add 1 and 2.", "response": "3"},
        {"prompt": "Q"},
        {"prompt": "Say a lot. " * 20, "response": "ok"},
    ]
    samples, rejects = records_to_samples(rows, cfg, tok)
    assert [s.id for s in samples] == ["0"]
    assert sorted((r.id, r.reason) for r in rejects) == [
        ("1", R.MISSING_FIELD),
        ("2", R.LONGER_THAN_CONTEXT),
    ]
    with pytest.raises(ConfigError, match=r"data\.format"):
        records_to_samples(rows, DataConfig(), tok)


def test_padding_share():
    assert padding_share([4, 4, 4, 4], 2) == 0
    assert padding_share([2, 4, 4, 4], 2) == pytest.approx(2 / 16)
    assert padding_share([1, 3], 1) == 0


@pytest.fixture(scope="module")
def tiny_gpt2(tok):
    return fresh_model(tok, context=128).eval()


def test_samples_in_one_batch_cannot_see_each_other(tok, tiny_gpt2):
    """No packing: a sample's logits are the same alone and beside a longer, padded one."""
    r = Renderer(tok, 128)
    short = r(conv(("user", "Hi"), ("assistant", "Yes")))
    long = r(
        conv(
            ("user", "A much longer question about the with statement"),
            ("assistant", "It manages a context."),
        )
    )
    n = len(short.input_ids)
    with torch.no_grad():
        alone = tiny_gpt2(
            **{k: v for k, v in collate([short], tok.pad_token_id).items() if k != "labels"}
        ).logits
        batch = collate([long, short], tok.pad_token_id)
        assert batch["attention_mask"][1].sum() == n < batch["input_ids"].shape[1]
        beside = tiny_gpt2(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    torch.testing.assert_close(beside[1, :n], alone[0], rtol=1e-5, atol=1e-5)
    assert (batch["labels"][1, n:] == IGNORE_INDEX).all()


def test_model_loss_counts_response_tokens_only(tok, tiny_gpt2):
    sample = Renderer(tok, 128)(
        conv(("user", "What is a tuple?"), ("assistant", "An immutable sequence."))
    )
    batch = collate([sample], tok.pad_token_id)
    with torch.no_grad():
        out = tiny_gpt2(**batch)
    logits, ids = out.logits[0, :-1], batch["input_ids"][0, 1:]
    per_token = torch.nn.functional.cross_entropy(logits, ids, reduction="none")
    response = torch.tensor(sample.labels[1:]) != IGNORE_INDEX
    assert 0 < response.sum() < len(ids)
    torch.testing.assert_close(out.loss, per_token[response].mean())
    assert not torch.isclose(out.loss, per_token.mean())
