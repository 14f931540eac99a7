"""SFT scores: exact match, ROUGE-L, the per-example table, masked response loss, replies."""

from __future__ import annotations

import pytest
import torch
from fixtures_data import pydoc_texts, train_tokenizer
from fixtures_models import fresh_model

from flywheel.sft import metrics as M
from flywheel.sft import records as R
from flywheel.sft.render import IGNORE_INDEX, Renderer


def test_exact_match_ignores_whitespace_only():
    assert M.exact_match("  Returns  the\nlength. ", "Returns the length.")
    assert not M.exact_match("returns the length.", "Returns the length.")


def test_rouge_l_values():
    assert M.rouge_l("the cat sat", "the cat sat") == 1.0
    assert M.rouge_l("dog", "the cat sat") == 0.0
    # LCS "the cat on the mat" = 5 of 5 output words and 5 of 6 reference words.
    assert M.rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(
        2 * (5 / 6) / (1 + 5 / 6)
    )


def test_score_and_table():
    examples = [M.Example("Q1 | x", "a b", "a b"), M.Example("Q2", "a b c d", "a b")]
    s = M.score(examples)
    assert s.n == 2 and s.exact_match == 0.5
    assert s.rouge_l == pytest.approx((1.0 + 2 * 1.0 * 0.5 / 1.5) / 2)
    table = M.examples_markdown(examples)
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| Q1 \\| x | a b | a b | yes | 1.000 |")
    assert M.score([]).n == 0


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(pydoc_texts(200), 512)


def conv(q, a, id_="c"):
    return R.Conversation(id_, (R.Turn("user", q), R.Turn("assistant", a)))


@pytest.fixture
def gpt2(tok):
    return fresh_model(tok, context=128)


def test_response_loss_is_the_mean_over_response_tokens_of_all_samples(tok, gpt2):
    r = Renderer(tok, 128)
    samples = [
        r(conv("What is a list?", "A mutable sequence.")),
        r(conv("Hi", "Hello there, how are you today?")),
    ]
    got = M.response_loss(gpt2, samples, tok.pad_token_id, micro=2)
    per_token = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.input_ids])
            logits = gpt2(input_ids=ids).logits[0, :-1]
            labels = torch.tensor(s.labels[1:])
            keep = labels != IGNORE_INDEX
            per_token.append(
                torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="none")
            )
    assert got == pytest.approx(float(torch.cat(per_token).mean()), rel=1e-5)


def test_reply_is_bounded_and_an_overfit_model_answers_exactly(tok, gpt2):
    r = Renderer(tok, 128)
    c = conv("What does len do?", "Counts items.")
    reply = M.generate_reply(gpt2, r, c, max_new_tokens=5)
    assert (
        len(tok(reply, add_special_tokens=False)["input_ids"]) <= 5 + 1
    )  # decode/encode may differ by one

    from flywheel.sft.render import collate

    batch = collate([r(c)], tok.pad_token_id)
    opt = torch.optim.AdamW(gpt2.parameters(), lr=1e-2)
    gpt2.train()
    for _ in range(60):
        loss = gpt2(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    scores, examples = M.evaluate_generation(gpt2, r, [c], max_new_tokens=20)
    assert examples[0].output == "Counts items.", examples[0]
    assert scores.exact_match == 1.0 and scores.rouge_l == 1.0
