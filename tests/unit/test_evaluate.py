"""Evaluation: the pure numbers, the windowing, input errors, and a random-init tiny model
(whose perplexity must sit near the vocabulary size: an untrained model is ~uniform)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from fixtures_models import VOCAB, build_eval_dataset, fresh_model, save_model, train_tokenizer

from flywheel import artifacts
from flywheel.config import Profile
from flywheel.errors import DataError, FlywheelError
from flywheel.evaluate import EvalReport, evaluate, read_test_documents, read_test_split
from flywheel.evaluate.core import _chunks
from flywheel.evaluate.metrics import (
    DocSums,
    bits_per_byte,
    bootstrap_ci,
    point_metrics,
    repetition,
)


def test_point_metrics_are_token_weighted():
    s = DocSums(
        np.array([10.0, 30.0]), np.array([1.0, 9.0]), np.array([10.0, 10.0]), np.array([40.0, 40.0])
    )
    ppl, acc, nll = point_metrics(s)
    assert nll == pytest.approx(2.0)
    assert ppl == pytest.approx(math.e**2)
    assert acc == pytest.approx(0.5)


def test_overflowing_perplexity_is_inf_not_an_error():
    one = np.array([1.0])
    ppl, _, _ = point_metrics(DocSums(np.array([1e6]), 0 * one, 10 * one, 40 * one))
    assert ppl == math.inf


def test_bootstrap_is_seeded_and_brackets_the_point():
    rng = np.random.default_rng(1)
    tokens = rng.integers(20, 200, size=100).astype(float)
    s = DocSums(
        tokens * rng.uniform(2, 4, 100),
        tokens * rng.uniform(0.1, 0.4, 100),
        tokens,
        tokens * rng.uniform(3, 4, 100),
    )
    ppl, acc, _ = point_metrics(s)
    bpb = bits_per_byte(s)
    a = bootstrap_ci(s, 200, 0.95, seed=0)
    assert a == bootstrap_ci(s, 200, 0.95, seed=0)
    assert a != bootstrap_ci(s, 200, 0.95, seed=1)
    (plo, phi), (alo, ahi), (blo, bhi) = a["perplexity"], a["accuracy"], a["bits_per_byte"]
    assert plo < ppl < phi and alo < acc < ahi and blo < bpb < bhi
    # A narrower confidence gives a narrower interval.
    nlo, nhi = bootstrap_ci(s, 200, 0.5, seed=0)["perplexity"]
    assert plo < nlo < nhi < phi


def test_bootstrap_off_or_single_document_gives_no_interval():
    s = DocSums(np.array([5.0]), np.array([1.0]), np.array([4.0]), np.array([9.0]))
    assert bootstrap_ci(s, 100, 0.95, 0) == {}
    assert bootstrap_ci(DocSums.empty(3), 0, 0.95, 0) == {}


def test_repetition():
    assert repetition([1, 2, 3, 4, 5, 6]) == 0.0
    assert repetition([7] * 20) == pytest.approx(1 - 1 / 18)
    assert repetition([1, 2]) == 0.0


def test_windows_predict_every_token_exactly_once():
    ids = [list(range(10)), list(range(3)), [5]]
    chunks = _chunks(ids, prefix=[99], context=4, max_tokens=None)
    per_doc: dict[int, list[int]] = {}
    for d, seq in chunks:
        assert len(seq) <= 5
        per_doc.setdefault(d, []).extend(seq[1:])  # the targets of this window
    assert per_doc == {0: list(range(10)), 1: [0, 1, 2], 2: [5]}
    capped = _chunks(ids, prefix=[99], context=4, max_tokens=6)
    assert sum(len(s) - 1 for d, s in capped if d == 0) == 6


def test_missing_or_empty_test_split_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"manifest\.json"):
        read_test_documents(tmp_path, None)
    ds = build_eval_dataset(tmp_path / "ds", max_docs=5)
    (ds / artifacts.TEST_TEXT).unlink()
    with pytest.raises(DataError, match="held-out documents not found"):
        read_test_documents(ds, None)
    pd.DataFrame({"id": ["a"], "text": ["   "]}).to_parquet(ds / artifacts.TEST_TEXT)
    with pytest.raises(DataError, match="no non-empty"):
        read_test_documents(ds, None)
    pd.DataFrame({"id": ["a"], "body": ["x"]}).to_parquet(ds / artifacts.TEST_TEXT)
    with pytest.raises(DataError, match="column 'text'"):
        read_test_documents(ds, None)


def test_document_ids_come_from_the_split_and_stay_unique(tmp_path):
    ds = build_eval_dataset(tmp_path / "ds", max_docs=5)
    ids, texts, _ = read_test_split(ds, None)
    assert ids == [f"pydoc-{i:05d}" for i in range(5)] and len(texts) == 5
    # A repeated id, and a blank document skipped: ids stay unique and aligned with texts.
    frame = pd.DataFrame({"id": ["a", "b", "a", "c"], "text": ["one", " ", "two", "three"]})
    frame.to_parquet(ds / artifacts.TEST_TEXT)
    ids, texts, _ = read_test_split(ds, None)
    assert ids == ["a", "#2", "c"] and texts == ["one", "two", "three"]
    assert read_test_split(ds, 2)[0] == ["a", "#2"]
    # No id column: the row position stands in.
    pd.DataFrame({"text": ["x", "y"]}).to_parquet(ds / artifacts.TEST_TEXT)
    assert read_test_split(ds, None)[0] == ["#0", "#1"]


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    from fixtures_models import split_paragraphs

    root = tmp_path_factory.mktemp("models")
    tok = train_tokenizer(split_paragraphs()[0])
    return save_model(fresh_model(tok), tok, root / "random")


def test_random_init_model_scores_near_vocabulary_size(random_model, tmp_path):
    ds = build_eval_dataset(tmp_path / "ds", max_docs=40)
    profile = Profile(eval={"max_docs": 30, "bootstrap_samples": 100, "prompts": ["The for loop"]})
    rep = evaluate(profile, random_model, ds)
    assert rep.n_docs == 30 and rep.n_tokens > 1000
    assert math.isfinite(rep.perplexity)
    # ~uniform over the vocabulary: perplexity near VOCAB, accuracy near 1/VOCAB.
    assert 0.7 * VOCAB < rep.perplexity < 1.5 * VOCAB
    assert rep.accuracy < 0.02
    lo, hi = rep.perplexity_ci
    assert lo <= rep.perplexity <= hi
    assert rep.accuracy_ci[0] <= rep.accuracy <= rep.accuracy_ci[1]
    assert rep.data_hash == json.loads((ds / "manifest.json").read_text())["content_hash"]
    (g,) = rep.generation
    assert g.new_tokens > 0 and g.seconds_per_token > 0
    # The report crosses KFP steps as JSON.
    back = EvalReport.load(rep.save(tmp_path / "report.json"))
    assert back == rep
    m = rep.metrics("challenger")
    assert m["challenger_perplexity"] == rep.perplexity
    assert "challenger_perplexity_ci_low" in m and "challenger_generation_pass_rate" in m
    # Bits per byte is the same loss per byte: nats per token / ln 2 * tokens / bytes.
    assert m["challenger_bits_per_byte"] == rep.bits_per_byte
    per_token_bits = rep.mean_nll / math.log(2)
    assert rep.bits_per_byte == pytest.approx(per_token_bits * rep.n_tokens / rep.n_bytes)
    assert rep.bits_per_byte_ci[0] <= rep.bits_per_byte <= rep.bits_per_byte_ci[1]
    # Per-document scores, keyed by the split's ids, for the paired gate; small.
    d = rep.docs
    assert d.ids == [f"pydoc-{i:05d}" for i in range(30)]
    assert sum(d.bytes) == rep.n_bytes and sum(d.tokens) == rep.n_tokens
    assert sum(d.bits) == pytest.approx(rep.mean_nll * rep.n_tokens / math.log(2))
    assert len(rep.to_json()) < 12_000
    assert rep.tokenizer and len(rep.tokenizer) == 16


def test_not_a_model_directory(tmp_path):
    ds = build_eval_dataset(tmp_path / "ds", max_docs=3)
    with pytest.raises(FlywheelError, match="not a model directory"):
        evaluate(Profile(), tmp_path / "nope", ds)


def test_cli_evaluate_writes_the_report_and_gates_against_another_model(
    random_model, tmp_path, capsys, monkeypatch
):
    from flywheel.cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    ds = build_eval_dataset(tmp_path / "ds", max_docs=6)
    out = tmp_path / "report.json"
    knobs = ["eval.max_docs=6", "eval.bootstrap_samples=20"]
    main(["evaluate", str(random_model), "--data", str(ds), "--out", str(out), *knobs])
    assert EvalReport.load(out).n_docs == 6
    main(["evaluate", str(random_model), "--data", str(ds), "--against", str(random_model), *knobs])
    text = capsys.readouterr().out
    assert "bits_per_byte" in text and "perplexity" in text and "Gate decision" in text
    # A model against itself is not significantly better: superiority keeps the champion.
    assert "REJECT" in text and "not significantly better" in text
