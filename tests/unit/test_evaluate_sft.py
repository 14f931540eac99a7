"""Evaluation on an instruction split (flywheel.evaluate.sft): the masked response loss,
bits per byte over the responses' bytes, greedy replies scored against the references,
each model with its own tokenizer. Datasets are made with `prepare_sft` directly; models
are 2-layer GPT-2s built from a config (seconds)."""

from __future__ import annotations

import math

import pytest
from fixtures_data import pydoc_texts, train_tokenizer
from fixtures_models import fresh_model

from flywheel import artifacts
from flywheel.config import DataConfig, Profile
from flywheel.evaluate import evaluate
from flywheel.evaluate import sft as S
from flywheel.sft import demo
from flywheel.sft import metrics as M
from flywheel.sft.prepare import prepare_sft, read_samples
from flywheel.sft.render import IGNORE_INDEX

BLOCK = 192


def tiny_gpt2(tok, seed=0, context=BLOCK):
    return fresh_model(tok, seed, context).eval()


def records():
    # Every 4th demo record: real questions and answers, a few seconds to prepare.
    return demo.instruction_records()[::4]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(pydoc_texts(200), 512)


@pytest.fixture(scope="module")
def dataset(tok, tmp_path_factory):
    """An instruction Dataset: prepare_sft's splits, the tokenizer and a manifest."""
    out = tmp_path_factory.mktemp("sft-ds")
    cfg = DataConfig(
        format="instruction", block_size=BLOCK, split={"validation_share": 0.1, "test_share": 0.3}
    )
    stats = prepare_sft(records(), cfg, tok, out)
    tok.save_pretrained(out / artifacts.TOKENIZER_DIR)
    artifacts.DatasetManifest(
        schema_version=artifacts.SCHEMA_VERSION, content_hash="sft-test", format="instruction"
    ).write(out)
    assert stats.samples["test"] >= 8
    return out


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-model")
    tiny_gpt2(tok).save_pretrained(out)
    tok.save_pretrained(out)
    return out


PROFILE = Profile(eval={"max_docs": 12, "bootstrap_samples": 50, "max_new_tokens": 6})


@pytest.fixture(scope="module")
def report(model_dir, dataset):
    return evaluate(PROFILE, model_dir, dataset)


def test_decoded_samples_re_tokenize_to_the_training_ids_and_mask(tok, dataset):
    rows = S.read_sft_test(dataset, None)
    items = S.decode_samples(rows, tok)
    assert len(items) == len(rows) >= 8
    for (_, ids, labels), item in zip(rows, items, strict=True):
        got, response, _ = S._tokenize(tok, item, BLOCK)
        assert got == ids
        # The response tokens are exactly those training counted (labels not -100).
        assert response == [label != IGNORE_INDEX for label in labels]
        assert item.prompt.endswith("<|im_start|>assistant\n")
    # A sample cut by the context is charged only the response bytes its kept tokens cover.
    item, (_, ids, labels) = items[0], rows[0]
    first = next(k for k, label in enumerate(labels) if label != IGNORE_INDEX)
    assert S._tokenize(tok, item, first)[2] == 0
    cut_at = tok.decode(ids[: first + 3], skip_special_tokens=False)
    assert S._tokenize(tok, item, first + 3)[2] == len(cut_at[item.spans[0][0] :].encode())


def test_response_loss_and_bits_per_byte_count_response_tokens_only(tok, dataset, report):
    samples = read_samples(dataset / "test")[:12]
    # The training objective over the same samples (prompt tokens masked).
    model = tiny_gpt2(tok)
    assert report.format == "instruction" and report.n_docs == len(samples) == 12
    assert report.response_loss == pytest.approx(
        M.response_loss(model, samples, tok.pad_token_id), rel=1e-5
    )
    assert report.n_tokens == sum(s.response_tokens for s in samples) - len(
        [s for s in samples if s.labels[0] != IGNORE_INDEX]
    )
    items = S.decode_samples([(s.id, s.input_ids, s.labels) for s in samples], tok)
    response_bytes = sum(i.response_bytes for i in items)
    assert report.n_bytes == response_bytes
    # The bytes charged are the reply and the end of turn the model must produce (ChatML
    # here), not the prompt's.
    by_prompt = {r["prompt"]: r["response"] for r in records()}
    for item in items:
        reply = by_prompt[M.display_prompt(item.prompt, tok)]
        assert item.reference == f"{reply}<|im_end|>{tok.eos_token}\n"
    assert report.bits_per_byte == pytest.approx(
        report.response_loss * report.n_tokens / math.log(2) / response_bytes, rel=1e-6
    )
    assert report.docs is not None and report.docs.ids == [s.id for s in samples]


def test_replies_are_scored_against_the_held_out_responses(dataset, report):
    by_prompt = {r["prompt"]: r["response"] for r in records()}
    assert len(report.examples) == 12
    for e in report.examples:
        assert by_prompt[e.prompt] == e.reference  # the table's prompt and reference
        assert e.exact == M.exact_match(e.output, e.reference)
        assert e.rouge_l == pytest.approx(M.rouge_l(e.output, e.reference))
    assert report.exact_match == sum(e.exact for e in report.examples) / 12
    assert report.rouge_l == pytest.approx(sum(e.rouge_l for e in report.examples) / 12)
    metrics = report.metrics()
    assert {"response_loss", "exact_match", "rouge_l"} <= set(metrics)
    again = type(report).from_json(report.to_json())
    assert again == report


def test_a_model_with_another_tokenizer_is_charged_the_same_bytes(dataset, report, tmp_path):
    other = train_tokenizer(pydoc_texts(100), 300)
    out = tmp_path / "other"
    # A longer context: the smaller vocabulary cuts the same text into more tokens.
    tiny_gpt2(other, seed=1, context=4 * BLOCK).save_pretrained(out)
    other.save_pretrained(out)
    rep = evaluate(PROFILE, out, dataset)
    assert rep.n_bytes == report.n_bytes and rep.n_docs == report.n_docs
    assert rep.n_tokens != report.n_tokens  # cut by its own tokenizer
    assert [e.reference for e in rep.examples] == [e.reference for e in report.examples]
