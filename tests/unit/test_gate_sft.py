"""Rule 9 of the gate: fine-tuning metrics named in `gate.metrics` (rouge_l, exact_match,
response_loss), each paired per held-out sample, for every pass/fail combination. Pure:
reports are built in memory. The bits-per-byte rule is held neutral (non-inferiority with a
wide margin) so each case tests the named metric alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_gate import docs, report

from flywheel.config import GatePolicy, load_profile, validate_profile
from flywheel.errors import ConfigError
from flywheel.evaluate.report import EvalReport, SftExample
from flywheel.gate import decide_promotion

N = 100
LN2 = math.log(2)


def champion_rouge(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.2, 0.8, N)


def shifted(values: np.ndarray, delta: float, noise: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (values + delta + rng.normal(0, noise, len(values))).clip(0, 1)


def sft_report(
    rouge: np.ndarray | None = None,
    exact: np.ndarray | None = None,
    d: dict[str, np.ndarray] | None = None,
    n: int = N,
    **kw,
) -> EvalReport:
    """An instruction-split report: per-sample scores, response loss and replies."""
    d = docs(n=n) if d is None else d
    rouge = champion_rouge()[:n] if rouge is None else rouge
    exact = (rouge > 0.7) if exact is None else exact
    examples = [
        SftExample(
            id=f"doc-{i:04d}",
            prompt=f"What does f{i} do?",
            reference=f"It does {i}.",
            output=f"It does {i} | maybe.",
            exact=bool(exact[i]),
            rouge_l=float(rouge[i]),
        )
        for i in range(n)
    ]
    base = report(d, **kw)
    return base.model_copy(
        update={
            "format": "instruction",
            "response_loss": base.mean_nll,
            "rouge_l": float(np.mean(rouge)),
            "exact_match": float(np.mean(exact)),
            "examples": examples,
        }
    )


def policy(**metrics: float) -> GatePolicy:
    return GatePolicy(
        mode="non_inferiority",
        margins={"bits_per_byte": 0.5},
        metrics={k: {"margin": m} for k, m in metrics.items()},
    )


CHAMPION = sft_report()


def only(decision, metric: str) -> str:
    return next(r for r in decision.reasons if r.startswith(metric))


def test_no_champion_the_named_metrics_do_not_block():
    d = decide_promotion(sft_report(), None, policy(rouge_l=0.0, response_loss=0.0))
    assert d.promote and d.metric_tests == []


def test_equal_models_pass():
    d = decide_promotion(sft_report(), CHAMPION, policy(rouge_l=0.0, exact_match=0.0))
    assert d.promote, d.reasons
    assert [t.metric for t in d.metric_tests] == ["rouge_l", "exact_match"]
    assert all(t.passed and t.diff == 0 for t in d.metric_tests)


def test_rouge_l_significantly_worse_beyond_the_margin_rejects():
    ch = sft_report(shifted(champion_rouge(), -0.10, 0.02))
    d = decide_promotion(ch, CHAMPION, policy(rouge_l=0.05))
    assert not d.promote
    t = d.metric_tests[0]
    assert not t.passed and t.ci[1] < t.threshold < 0
    assert t.threshold == pytest.approx(-0.05 * CHAMPION.rouge_l)
    assert "significantly worse" in only(d, "rouge_l") and d.reasons[0].startswith("rouge_l")
    assert d.deltas["rouge_l_abs"] == pytest.approx(ch.rouge_l - CHAMPION.rouge_l)


def test_rouge_l_significantly_worse_within_the_margin_passes_and_without_margin_rejects():
    ch = sft_report(shifted(champion_rouge(), -0.01, 0.005))
    within = decide_promotion(ch, CHAMPION, policy(rouge_l=0.05))
    assert within.promote, within.reasons
    assert within.metric_tests[0].ci[1] < 0  # a real drop, smaller than the margin
    assert not decide_promotion(ch, CHAMPION, policy(rouge_l=0.0)).promote


def test_rouge_l_lower_by_noise_passes():
    ch = sft_report(shifted(champion_rouge(), -0.01, 0.2))
    d = decide_promotion(ch, CHAMPION, policy(rouge_l=0.0))
    t = d.metric_tests[0]
    assert d.promote and t.ci[0] < 0 < t.ci[1]


def test_rouge_l_better_passes():
    ch = sft_report(shifted(champion_rouge(), +0.1, 0.02))
    d = decide_promotion(ch, CHAMPION, policy(rouge_l=0.0))
    assert d.promote and d.metric_tests[0].diff > 0


def test_exact_match_significantly_lower_rejects():
    rouge = champion_rouge()
    exact = rouge > 0.3  # the champion answers 5/6 exactly
    champion = sft_report(rouge, exact)
    ch = sft_report(rouge, rouge > 0.6)  # the challenger 1/3
    d = decide_promotion(ch, champion, policy(exact_match=0.1))
    assert not d.promote and "exact_match" in d.reasons[0]
    # The same drop is allowed by a margin larger than it.
    assert decide_promotion(ch, champion, policy(exact_match=0.9)).promote


def worse_loss(factor: float) -> dict[str, np.ndarray]:
    d = docs(n=N)
    rng = np.random.default_rng(3)
    return {**d, "bits": d["bits"] * factor * rng.uniform(0.99, 1.01, N)}


def test_response_loss_significantly_higher_beyond_the_margin_rejects():
    ch = sft_report(d=worse_loss(1.10))
    d = decide_promotion(ch, CHAMPION, policy(response_loss=0.05))
    t = d.metric_tests[0]
    assert not d.promote and t.metric == "response_loss" and t.better == "lower"
    assert t.ci[0] > t.threshold > 0
    # nats per response token, as in the reports
    assert t.challenger == pytest.approx(ch.response_loss) and t.champion == pytest.approx(
        CHAMPION.response_loss
    )
    assert decide_promotion(ch, CHAMPION, policy(response_loss=0.2)).promote


def test_response_loss_is_not_compared_across_tokenizers():
    ch = sft_report(d=worse_loss(1.10), tokenizer="tok-b")
    d = decide_promotion(ch, CHAMPION, policy(response_loss=0.0))
    assert d.promote and d.metric_tests == []
    assert any("response_loss not compared" in r for r in d.reasons)


def test_a_named_metric_missing_from_a_report_fails():
    text = report()  # a raw-text evaluation: no rouge_l
    d = decide_promotion(text, None, policy(rouge_l=0.0))
    assert not d.promote and "challenger's evaluation has none" in d.reasons[0]
    d = decide_promotion(sft_report(), report(), policy(rouge_l=0.0))
    assert not d.promote and "champion's evaluation has none" in d.reasons[0]


def test_fewer_than_two_paired_samples_fail():
    ch = sft_report()
    ch = ch.model_copy(update={"examples": [e.model_copy(update={"id": "x"}) for e in ch.examples]})
    ch.examples[0] = ch.examples[0].model_copy(update={"id": "doc-0000"})
    d = decide_promotion(ch, CHAMPION, policy(rouge_l=0.0))
    assert not d.promote and "only 1 sample(s)" in d.reasons[0]


def test_one_metric_failing_rejects_and_every_test_is_listed():
    ch = sft_report(shifted(champion_rouge(), -0.10, 0.02))  # rouge worse; loss equal
    d = decide_promotion(ch, CHAMPION, policy(response_loss=0.0, rouge_l=0.0))
    assert not d.promote
    assert {t.metric: t.passed for t in d.metric_tests} == {"response_loss": True, "rouge_l": False}


def test_non_finite_sft_metric_fails_rule_one():
    ch = sft_report().model_copy(update={"rouge_l": math.nan})
    d = decide_promotion(ch, CHAMPION, policy(rouge_l=0.0))
    assert not d.promote and "non-finite" in d.reasons[0] and "rouge_l" in d.reasons[0]


def test_the_decision_markdown_shows_the_metrics_and_the_examples():
    ch = sft_report(shifted(champion_rouge(), -0.10, 0.02))
    d = decide_promotion(ch, CHAMPION, policy(rouge_l=0.05))
    md = d.to_markdown(ch, CHAMPION)
    assert "| rouge_l (higher is better; greedy replies) |" in md
    # Every fine-tuning metric has its delta, named in gate.metrics or not.
    row = next(line for line in md.splitlines() if line.startswith("| exact_match ("))
    assert (
        row.endswith(f"| {d.deltas['exact_match_rel']:+.2%} |") and d.deltas["exact_match_rel"] < 0
    )
    assert "### Fine-tuning metrics (gate.metrics, paired per sample)" in md
    assert "| rouge_l (higher is better) | 100 |" in md and "| no |" in md
    assert "### Held-out prompts (100, greedy replies)" in md
    first = ch.examples[0]
    row = (
        f"| What does f0 do? | It does 0. | It does 0 \\| maybe. | {first.rouge_l:.3f} | "
        f"It does 0 \\| maybe. | {CHAMPION.examples[0].rouge_l:.3f} |"
    )
    assert row in md
    assert "50 more in the evaluation report" in md
    assert "fine-tuning metrics rouge_l 5.0%" in md
    assert Decision_round_trips(d)


def Decision_round_trips(d) -> bool:
    return type(d).from_json(d.to_json()) == d


def test_bad_metric_names_fail_at_profile_load_naming_the_field(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("gate:\n  metrics:\n    bleu: {margin: 0.1}\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: gate\.metrics\.bleu: unknown metric"):
        load_profile(path)
    with pytest.raises(ConfigError, match=r"gate\.metrics\.accuracy: .*gate\.margins"):
        validate_profile({"gate": {"metrics": {"accuracy": {"margin": 0.1}}}})
    with pytest.raises(ConfigError, match=r"gate\.metrics\.rouge_l\.margin"):
        validate_profile({"gate": {"metrics": {"rouge_l": {"margin": -0.1}}}})
    with pytest.raises(ConfigError, match=r"gate\.metrics\.rouge_l\.magrin: unknown field"):
        validate_profile({"gate": {"metrics": {"rouge_l": {"magrin": 0.1}}}})
    # Raw text has no responses: naming a fine-tuning metric there is a config error.
    with pytest.raises(ConfigError, match=r"gate\.metrics\.rouge_l: .*data\.format"):
        validate_profile({"gate": {"metrics": {"rouge_l": {"margin": 0.1}}}})
