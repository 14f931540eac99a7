"""The promotion gate: a pure decision over two fresh evaluations and a policy.

`decide_promotion` reads numbers and returns a `Decision`; it touches no store, and its
paired bootstrap is seeded from the policy, so every case (no champion, challenger
significantly better, better by noise, worse, NaN/inf, absolute bound violated) is a
unit test. A rejected candidate is a normal outcome (`promote=False`), never an
exception: the pipeline run succeeds and the decision is what a person reads in the UI.

Rules, in order (all are checked, so the reasons list every failure at once):

1. every challenger metric is finite;
2. absolute bounds: bits per byte <= ``max_bits_per_byte``, perplexity <=
   ``max_perplexity``, accuracy >= ``min_accuracy``;
3. with ``require_generation_checks``, generation checks ran and every one passed;
4. no champion: promote if 1-3 hold;
5. every champion metric is finite, both were evaluated on the same data, and both carry
   per-document scores for the same documents;
6. bits per byte, paired by document (challenger - champion, a paired bootstrap interval
   at ``confidence``): ``superiority`` promotes only when the whole interval lies below
   ``-min_relative_improvement`` of the champion's bits per byte (significantly better);
   ``non_inferiority`` rejects only when the whole interval lies above ``+margin``
   (significantly worse than the margin);
7. next-token accuracy, only when both models share a tokenizer (per-token accuracy over
   different vocabularies measures different tasks): rejected when it is lower by more
   than the accuracy margin AND McNemar's exact test over documents says the drop is
   significant at ``confidence``.

8. with a regression set, no forgetting (see `decide_promotion`);
9. fine-tuning metrics named in ``gate.metrics`` (response_loss, rouge_l, exact_match):
   each is compared per held-out sample, paired by id, with a paired bootstrap interval of
   the difference in its mean; rejected when the whole interval lies on the worse side
   beyond the metric's margin (a share of the champion's value). A named metric missing
   from a report fails; response_loss (per token of each model's tokenizer) is compared
   only between models sharing a tokenizer, as accuracy is.

Perplexity is per token of each model's own tokenizer, so it is shown and bounded but
never compared between models: a model could "win" on it by cutting text differently.
Bits per byte counts the same bytes for both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from flywheel import artifacts
from flywheel.artifacts import JsonFile
from flywheel.config import SFT_GATE_METRICS, GatePolicy, Profile
from flywheel.evaluate.metrics import LN2
from flywheel.evaluate.paired import PairedDifference, accuracy_pairs, paired_bootstrap
from flywheel.evaluate.report import EvalReport


class PairedTest(BaseModel):
    """The paired comparison the decision rests on (None fields: not computed)."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    n_docs: int = Field(description="documents scored by both models (paired by id)")
    challenger_bits_per_byte: float
    champion_bits_per_byte: float
    diff: float = Field(description="challenger - champion, bits per byte (negative: better)")
    diff_rel: float = Field(description="diff as a share of the champion's bits per byte")
    ci: tuple[float, float] = Field(description="paired bootstrap interval of diff")
    confidence: float
    samples: int
    threshold: float = Field(description="the bound the interval is held against (bits/byte)")
    accuracy_compared: bool = Field(description="False: different tokenizers")
    challenger_better_docs: int | None = None
    champion_better_docs: int | None = None
    mcnemar_p: float | None = Field(None, description="McNemar's exact test, two-sided")

    @classmethod
    def of(
        cls,
        diff: PairedDifference,
        policy: GatePolicy,
        threshold: float,
        accuracy_compared: bool,
    ) -> PairedTest:
        return cls(
            n_docs=diff.n_docs,
            challenger_bits_per_byte=diff.challenger,
            champion_bits_per_byte=diff.champion,
            diff=diff.diff,
            diff_rel=diff.rel,
            ci=(diff.low, diff.high),
            confidence=policy.confidence,
            samples=policy.bootstrap_samples,
            threshold=threshold,
            accuracy_compared=accuracy_compared,
        )


class MetricTest(BaseModel):
    """Rule 9: one fine-tuning metric of `gate.metrics`, paired per held-out sample."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    metric: str
    better: Literal["lower", "higher"]
    n: int = Field(description="held-out samples scored by both models (paired by id)")
    challenger: float
    champion: float
    diff: float = Field(description="challenger - champion")
    ci: tuple[float, float] = Field(description="paired bootstrap interval of diff")
    margin: float
    threshold: float = Field(description="diff beyond this, wholly, is significantly worse")
    passed: bool


class Decision(JsonFile):
    model_config = ConfigDict(ser_json_inf_nan="constants")

    promote: bool
    verdict: Literal["promote", "reject"]
    reasons: list[str] = Field(description="why, one sentence per rule checked; failures first")
    deltas: dict[str, float] = Field(
        default_factory=dict,
        description="challenger vs champion: *_rel = (challenger - champion) / champion, *_abs; "
        "bits_per_byte_ci_low/high: the paired interval of the difference",
    )
    paired: PairedTest | None = None
    regression: PairedTest | None = Field(
        None,
        description="the paired test on the pinned regression set (the champion's domain); "
        "None: no regression set was evaluated",
    )
    metric_tests: list[MetricTest] = Field(
        default_factory=list, description="rule 9: the gate.metrics guards compared"
    )
    has_champion: bool
    policy: GatePolicy

    # ------------------------------------------------------------- rendering

    def to_markdown(self, challenger: EvalReport, champion: EvalReport | None) -> str:
        """Metrics, the paired difference with its interval and test, verdict and reasons,
        for the KFP UI and the model card."""
        icon = "PROMOTE" if self.promote else "REJECT"
        lines = [f"## Gate decision: **{icon}**", ""]
        conf = f"{challenger.confidence:.0%}"
        lines += [
            f"| metric | challenger | {conf} CI | champion | {conf} CI | delta |",
            "|---|---:|---|---:|---|---:|",
        ]
        rows: tuple[tuple[str, str], ...] = (
            ("bits_per_byte", "lower is better; decides"),
            ("perplexity", "lower is better; per own token"),
            ("accuracy", "higher is better; per own token"),
        )
        if challenger.format != "text":
            rows = (
                ("bits_per_byte", "lower is better; over response bytes; decides"),
                ("response_loss", "lower is better; nats per own response token"),
                ("perplexity", "lower is better; per own response token"),
                ("accuracy", "higher is better; per own response token"),
                ("rouge_l", "higher is better; greedy replies"),
                ("exact_match", "higher is better; greedy replies"),
            )
        for name, note in rows:
            ch = getattr(challenger, name)
            ch_ci = getattr(challenger, f"{name}_ci", None)
            cp = getattr(champion, name) if champion else None
            cp_ci = getattr(champion, f"{name}_ci", None) if champion else None
            rel = self.deltas.get(f"{name}_rel")
            lines.append(
                f"| {name} ({note}) | {_num(ch)} | {_ci(ch_ci)} | "
                f"{_num(cp) if champion else 'none'} | {_ci(cp_ci)} | "
                f"{_pct(rel) if rel is not None else ''} |"
            )
        size = f"{challenger.n_bytes:,} bytes / {challenger.n_tokens:,} tokens / {challenger.n_docs} docs"
        if champion:
            size += f" (champion: {champion.n_bytes:,} bytes / {champion.n_tokens:,} tokens)"
        lines += ["", f"Evaluated on {size}; data `{challenger.data_hash or 'unknown'}`.", ""]
        if self.paired:
            lines += ["### Paired comparison (same documents)", "", *self._paired_lines(), ""]
        if self.regression:
            r = self.regression
            lines += [
                "### Regression set (the champion's domain)",
                "",
                "| n docs | challenger | champion | difference | "
                f"{r.confidence:.0%} paired interval | rejected above |",
                "|---:|---:|---:|---:|---|---:|",
                f"| {r.n_docs} | {r.challenger_bits_per_byte:.4f} | {r.champion_bits_per_byte:.4f} "
                f"| {r.diff:+.4f} ({_pct(r.diff_rel)}) | [{r.ci[0]:+.4f}, {r.ci[1]:+.4f}] | "
                f"{r.threshold:+.4f} |",
                "",
            ]
        if self.metric_tests:
            lines += ["### Fine-tuning metrics (gate.metrics, paired per sample)", ""]
            lines += [
                "| metric | n | challenger | champion | difference | "
                f"{self.policy.confidence:.0%} paired interval | worse beyond | ok |",
                "|---|---:|---:|---:|---:|---|---:|---|",
            ]
            for m in self.metric_tests:
                lines.append(
                    f"| {m.metric} ({m.better} is better) | {m.n} | {m.challenger:.4f} | "
                    f"{m.champion:.4f} | {m.diff:+.4f} | [{m.ci[0]:+.4f}, {m.ci[1]:+.4f}] | "
                    f"{m.threshold:+.4f} | {'yes' if m.passed else 'no'} |"
                )
            lines.append("")
        lines += ["### Reasons", ""] + [f"- {r}" for r in self.reasons]
        if challenger.examples:
            lines += ["", *_examples_lines(challenger, champion)]
        if challenger.generation:
            lines += ["", "### Generation checks (challenger)", ""]
            lines += ["| prompt | output | s/token | repetition | ok |", "|---|---|---:|---:|---|"]
            for g in challenger.generation:
                out = g.output.replace("|", "\\|").replace("\n", " ")[:80]
                lines.append(
                    f"| {g.prompt[:40]} | {out} | {g.seconds_per_token:.4f} | "
                    f"{g.repetition:.2f} | {'yes' if g.passed else 'no'} |"
                )
        p = self.policy
        lines += [
            "",
            f"Policy: mode {p.mode} at {p.confidence:.0%} confidence "
            f"({p.bootstrap_samples} paired resamples), max bits per byte "
            f"{p.max_bits_per_byte:g}, max perplexity {p.max_perplexity:g}, min accuracy "
            f"{p.min_accuracy:g}, min relative improvement {p.min_relative_improvement:.1%}, "
            f"margins {_margins(p)}"
            + (
                ", fine-tuning metrics "
                + ", ".join(f"{k} {r.margin:.1%}" for k, r in p.metrics.items())
                if p.metrics
                else ""
            )
            + ".",
        ]
        return "\n".join(lines) + "\n"

    def _paired_lines(self) -> list[str]:
        t = self.paired
        assert t is not None
        conf = f"{t.confidence:.0%}"
        lines = [
            "| test | n docs | challenger | champion | difference | "
            f"{conf} paired interval | held against |",
            "|---|---:|---:|---:|---:|---|---:|",
            f"| bits per byte, paired bootstrap ({t.samples} resamples) | {t.n_docs} | "
            f"{t.challenger_bits_per_byte:.4f} | {t.champion_bits_per_byte:.4f} | "
            f"{t.diff:+.4f} ({_pct(t.diff_rel)}) | [{t.ci[0]:+.4f}, {t.ci[1]:+.4f}] | "
            f"{t.threshold:+.4f} |",
        ]
        if t.accuracy_compared:
            lines.append(
                f"| next-token accuracy, McNemar exact over documents | {t.n_docs} | "
                f"better on {t.challenger_better_docs} | better on {t.champion_better_docs} | "
                f"| p = {_num(t.mcnemar_p)} | |"
            )
        else:
            lines += [
                "",
                "Next-token accuracy is not compared: the models have different tokenizers.",
            ]
        return lines


def margin(policy: GatePolicy, metric: str) -> float:
    return policy.margins.get(metric, policy.non_inferiority_margin)


def decide_promotion(
    challenger: EvalReport,
    champion: EvalReport | None,
    policy: GatePolicy,
    regression: tuple[EvalReport, EvalReport] | None = None,
) -> Decision:
    """Promote or reject `challenger` against `champion` (None: no model in production).

    `regression`: (challenger, champion) evaluated on the pinned regression set, documents
    of the champion's own domain. A retrain on a drifted window is gated on that window's
    held-out split, where a model that forgot the old domain still wins; the regression
    set catches it (rule 8: rejected when significantly worse there by more than
    `gate.regression_margin`)."""
    fails: list[str] = []
    passes: list[str] = []
    deltas: dict[str, float] = {}

    bad = challenger.non_finite()
    if bad:
        fails.append(f"challenger has non-finite metrics: {', '.join(bad)}")
    else:
        _bounds(challenger, policy, passes, fails)
    if policy.require_generation_checks:
        failed = [g.prompt for g in challenger.generation if not g.passed]
        if not challenger.generation:
            fails.append("generation checks are required but none ran (eval.prompts is empty)")
        elif failed:
            fails.append(f"generation checks failed for {len(failed)} prompt(s): {failed[:3]}")
        else:
            passes.append(f"all {len(challenger.generation)} generation checks passed")

    paired = None
    if champion is None:
        passes.append("no champion in production: the absolute bounds decide")
    else:
        paired = _compare(challenger, champion, policy, passes, fails, deltas)
    reg = None
    if regression is not None and champion is not None:
        reg = _regression(*regression, policy, passes, fails, deltas)
    tests = _sft_metrics(challenger, champion, policy, passes, fails, deltas)

    promote = not fails
    return Decision(
        promote=promote,
        verdict="promote" if promote else "reject",
        reasons=fails + passes,
        deltas=deltas,
        paired=paired,
        regression=reg,
        metric_tests=tests,
        has_champion=champion is not None,
        policy=policy,
    )


def _bounds(ch: EvalReport, policy: GatePolicy, passes: list[str], fails: list[str]) -> None:
    for name, value, bound in (
        ("bits per byte", ch.bits_per_byte, policy.max_bits_per_byte),
        ("perplexity", ch.perplexity, policy.max_perplexity),
    ):
        ok = value <= bound
        (passes if ok else fails).append(
            f"challenger {name} {_num(value)} {'<=' if ok else '>'} maximum {bound:g}"
        )
    ok = ch.accuracy >= policy.min_accuracy
    (passes if ok else fails).append(
        f"challenger accuracy {ch.accuracy:.4f} {'>=' if ok else '<'} "
        f"minimum {policy.min_accuracy:g}"
    )


def _compare(
    ch: EvalReport,
    cp: EvalReport,
    policy: GatePolicy,
    passes: list[str],
    fails: list[str],
    deltas: dict[str, float],
) -> PairedTest | None:
    bad = cp.non_finite()
    if bad:
        # A broken champion cannot be out-scored meaningfully; a person decides (models promote).
        fails.append(f"champion has non-finite metrics ({', '.join(bad)}): cannot compare")
        return None
    if ch.data_hash and cp.data_hash and ch.data_hash != cp.data_hash:
        fails.append(
            f"challenger and champion were evaluated on different data "
            f"({ch.data_hash[:12]} vs {cp.data_hash[:12]})"
        )
        return None
    for name in ("bits_per_byte", "perplexity", "accuracy", *SFT_GATE_METRICS):
        a, b = getattr(ch, name), getattr(cp, name)
        if a is None or b is None:
            continue  # a fine-tuning metric of a raw-text report
        deltas[f"{name}_abs"] = a - b
        deltas[f"{name}_rel"] = (a - b) / b if b else (0.0 if a == b else math.inf)
    if ch.non_finite():
        return None  # the challenger already failed rule 1; the deltas are still shown

    paired = _paired_docs(ch, cp, fails)
    if paired is None:
        return None
    i, j = paired
    assert ch.docs is not None and cp.docs is not None
    a, b = ch.docs, cp.docs
    diff = _bootstrap(ch, cp, i, j, policy)
    deltas["bits_per_byte_paired_abs"] = diff.diff
    deltas["bits_per_byte_ci_low"], deltas["bits_per_byte_ci_high"] = diff.low, diff.high
    conf = f"{policy.confidence:.0%}"
    shown = (
        f"paired difference {diff.diff:+.4f} bits/byte ({_pct(diff.rel)}), {conf} interval "
        f"[{diff.low:+.4f}, {diff.high:+.4f}] over {diff.n_docs} documents"
    )
    if not (math.isfinite(diff.low) and math.isfinite(diff.high)):
        threshold = math.nan
        fails.append(f"{shown}: the interval is not finite, so nothing is significant")
    elif policy.mode == "superiority":
        # `or 0.0`: no -0.0 in the record when no improvement is required.
        threshold = -policy.min_relative_improvement * diff.champion or 0.0
        ok = diff.high < threshold
        need = (
            f"below -{policy.min_relative_improvement:.1%} of the champion's ({threshold:+.4f})"
            if policy.min_relative_improvement
            else "below 0"
        )
        (passes if ok else fails).append(
            f"bits per byte: {shown}; superiority requires the whole interval {need}: "
            + ("significantly better" if ok else "not significantly better, the champion stays")
        )
    else:
        m = margin(policy, "bits_per_byte")
        threshold = m * diff.champion
        ok = not diff.low > threshold
        (passes if ok else fails).append(
            f"bits per byte: {shown}; non-inferiority rejects only an interval wholly above "
            f"+{m:.1%} of the champion's ({threshold:+.4f}): "
            + ("not significantly worse" if ok else "significantly worse")
        )
    if len(i) < max(len(a.ids), len(b.ids)):
        passes.append(
            f"note: paired on {len(i)} documents of {len(a.ids)} (challenger) and "
            f"{len(b.ids)} (champion)"
        )

    same_tokens = (
        ch.tokenizer is not None
        and ch.tokenizer == cp.tokenizer
        and np.array_equal(np.array(a.tokens)[i], np.array(b.tokens)[j])
    )
    test = PairedTest.of(diff, policy, threshold, accuracy_compared=same_tokens)
    if not same_tokens:
        passes.append(
            "next-token accuracy not compared: the models have different tokenizers "
            "(per-token accuracy over different vocabularies is not comparable)"
        )
        return test
    pairs = accuracy_pairs(np.array(a.correct)[i], np.array(b.correct)[j])
    deltas["accuracy_mcnemar_p"] = pairs.p_value
    m = margin(policy, "accuracy")
    drop = -deltas["accuracy_rel"] if cp.accuracy else 0.0
    significant = (
        pairs.champion_better > pairs.challenger_better and pairs.p_value < 1 - policy.confidence
    )
    ok = not (drop > m and significant)
    word = "lower" if drop > 0 else "higher"
    (passes if ok else fails).append(
        f"accuracy {_share(drop)} {word} than the champion's ({ch.accuracy:.4f} vs "
        f"{cp.accuracy:.4f}); McNemar over documents: challenger better on "
        f"{pairs.challenger_better}, champion on {pairs.champion_better}, p = "
        f"{_num(pairs.p_value)}; rejected only if significantly lower by more than {m:.1%}"
    )
    return test.model_copy(
        update={
            "challenger_better_docs": pairs.challenger_better,
            "champion_better_docs": pairs.champion_better,
            "mcnemar_p": pairs.p_value,
        }
    )


def _paired_docs(
    ch: EvalReport, cp: EvalReport, fails: list[str], where: str = ""
) -> tuple[np.ndarray, np.ndarray] | None:
    """`_common_docs`, or None with the reason in `fails` when there is nothing to pair (a
    report without per-document scores, fewer than two documents in common)."""
    if ch.docs is None or cp.docs is None:
        who = "challenger" if ch.docs is None else "champion"
        fails.append(f"{where}the {who}'s report has no per-document scores: cannot compare paired")
        return None
    i, j = _common_docs(ch, cp)
    if len(i) < 2:
        fails.append(
            f"{where}only {len(i)} document(s) scored by both models: cannot compare paired"
        )
        return None
    return i, j


def _common_docs(ch: EvalReport, cp: EvalReport) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the documents both reports scored, paired by id (challenger, champion)."""
    assert ch.docs is not None and cp.docs is not None
    ch_at = {d: i for i, d in enumerate(ch.docs.ids)}
    common = [(ch_at[d], j) for j, d in enumerate(cp.docs.ids) if d in ch_at]
    return np.array([c[0] for c in common], dtype=int), np.array([c[1] for c in common], dtype=int)


def _bootstrap(
    ch: EvalReport, cp: EvalReport, i: np.ndarray, j: np.ndarray, policy: GatePolicy
) -> PairedDifference:
    """The policy's paired bootstrap of bits per byte over the documents at i and j."""
    assert ch.docs is not None and cp.docs is not None
    a, b = ch.docs, cp.docs
    return paired_bootstrap(
        np.array(a.bits)[i],
        np.array(a.bytes)[i],
        np.array(b.bits)[j],
        np.array(b.bytes)[j],
        policy.bootstrap_samples,
        policy.confidence,
        policy.seed,
    )


def _regression(
    ch: EvalReport,
    cp: EvalReport,
    policy: GatePolicy,
    passes: list[str],
    fails: list[str],
    deltas: dict[str, float],
) -> PairedTest | None:
    """Rule 8: no forgetting. The paired bits-per-byte difference on the regression set,
    rejected when its whole interval lies above +regression_margin of the champion's."""
    where = "regression set (the champion's domain)"
    paired = _paired_docs(ch, cp, fails, f"{where}: ")
    if paired is None:
        return None
    i, j = paired
    diff = _bootstrap(ch, cp, i, j, policy)
    deltas["regression_bits_per_byte_rel"] = diff.rel
    deltas["regression_ci_low"], deltas["regression_ci_high"] = diff.low, diff.high
    m = policy.regression_margin
    threshold = m * diff.champion
    shown = (
        f"{where}: paired difference {diff.diff:+.4f} bits/byte ({_pct(diff.rel)}), "
        f"{policy.confidence:.0%} interval [{diff.low:+.4f}, {diff.high:+.4f}] over "
        f"{diff.n_docs} documents; rejected when the whole interval lies above +{m:.1%} of "
        f"the champion's ({threshold:+.4f})"
    )
    if not math.isfinite(diff.low):
        fails.append(f"{shown}: the interval is not finite")
    elif diff.low > threshold:
        fails.append(f"{shown}: significantly worse, the challenger forgot the champion's domain")
    else:
        passes.append(f"{shown}: no forgetting beyond the margin")
    return PairedTest.of(diff, policy, threshold, accuracy_compared=False)


def _sft_metrics(
    ch: EvalReport,
    cp: EvalReport | None,
    policy: GatePolicy,
    passes: list[str],
    fails: list[str],
    deltas: dict[str, float],
) -> list[MetricTest]:
    """Rule 9: the fine-tuning metrics `gate.metrics` names, each paired per sample."""
    tests: list[MetricTest] = []
    for name, rule in policy.metrics.items():
        better = SFT_GATE_METRICS[name]
        if getattr(ch, name) is None:
            fails.append(
                f"gate.metrics names {name} but the challenger's evaluation has none "
                f"(evaluated on a {ch.format} dataset)"
            )
            continue
        if cp is None:
            continue  # no champion: rules 1-3 decide
        if getattr(cp, name) is None:
            fails.append(f"{name}: the champion's evaluation has none, cannot compare")
            continue
        if not (math.isfinite(getattr(ch, name)) and math.isfinite(getattr(cp, name))):
            continue  # rule 1 (or 5) already failed on it
        if name == "response_loss":
            pairs = _loss_pairs(ch, cp)
            if pairs is None:
                passes.append(
                    "response_loss not compared: the models have different tokenizers (it is "
                    "per token of each model's own; bits per byte over the responses is compared)"
                )
                continue
        else:
            pairs = _example_pairs(ch, cp, name)
        num_a, den_a, num_b, den_b = pairs
        if len(num_a) < 2:
            fails.append(f"{name}: only {len(num_a)} sample(s) scored by both models")
            continue
        diff = paired_bootstrap(
            num_a,
            den_a,
            num_b,
            den_b,
            policy.bootstrap_samples,
            policy.confidence,
            policy.seed,
        )
        scale = LN2 if name == "response_loss" else 1.0  # bits per token -> nats
        a, b = diff.challenger * scale, diff.champion * scale
        d, lo, hi = diff.diff * scale, diff.low * scale, diff.high * scale
        sign = 1.0 if better == "lower" else -1.0
        threshold = sign * rule.margin * abs(b) or 0.0
        worse = lo > threshold if better == "lower" else hi < threshold
        ok = math.isfinite(lo) and math.isfinite(hi) and not worse
        deltas[f"{name}_abs"] = d
        deltas[f"{name}_rel"] = d / b if b else (0.0 if d == 0 else math.inf)
        deltas[f"{name}_ci_low"], deltas[f"{name}_ci_high"] = lo, hi
        side = "above" if better == "lower" else "below"
        (passes if ok else fails).append(
            f"{name} ({better} is better): {a:.4f} vs the champion's {b:.4f}, paired "
            f"difference {d:+.4f}, {policy.confidence:.0%} interval [{lo:+.4f}, {hi:+.4f}] "
            f"over {diff.n_docs} samples; rejected when wholly {side} {threshold:+.4f} "
            f"(margin {rule.margin:.1%} of the champion's): "
            + ("not significantly worse" if ok else "significantly worse")
        )
        tests.append(
            MetricTest(
                metric=name,
                better=better,
                n=diff.n_docs,
                challenger=a,
                champion=b,
                diff=d,
                ci=(lo, hi),
                margin=rule.margin,
                threshold=threshold,
                passed=ok,
            )
        )
    return tests


Pairs = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _loss_pairs(ch: EvalReport, cp: EvalReport) -> Pairs | None:
    """(bits, tokens) per sample of both models, paired by id; None when the two cut the
    samples into different tokens (per-token losses then measure different things)."""
    if ch.docs is None or cp.docs is None:
        return np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0)
    i, j = _common_docs(ch, cp)
    a_tok, b_tok = np.array(ch.docs.tokens)[i], np.array(cp.docs.tokens)[j]
    if ch.tokenizer is None or ch.tokenizer != cp.tokenizer or not np.array_equal(a_tok, b_tok):
        return None
    return np.array(ch.docs.bits)[i], a_tok, np.array(cp.docs.bits)[j], b_tok


def _example_pairs(ch: EvalReport, cp: EvalReport, name: str) -> Pairs:
    """Per-example values of `name` (rouge_l, or exact as 0/1) of both models, paired by id;
    the denominators are ones, so the bootstrap compares means."""
    at = {e.id: e for e in cp.examples}
    common = [(e, at[e.id]) for e in ch.examples if e.id in at]
    field = "exact" if name == "exact_match" else name
    a = np.array([float(getattr(x, field)) for x, _ in common])
    b = np.array([float(getattr(y, field)) for _, y in common])
    return a, np.ones(len(a)), b, np.ones(len(b))


def _examples_lines(ch: EvalReport, cp: EvalReport | None, limit: int = 50) -> list[str]:
    """The per-example table: prompt / reference / the challenger's reply (and the
    champion's, paired by id), with ROUGE-L."""
    at = {e.id: e for e in cp.examples} if cp else {}
    head = "| prompt | reference | challenger | ROUGE-L |"
    rule = "|---|---|---|---:|"
    if at:
        head += " champion | ROUGE-L |"
        rule += "---|---:|"
    lines = [f"### Held-out prompts ({len(ch.examples)}, greedy replies)", "", head, rule]
    for e in ch.examples[:limit]:
        row = f"| {_cell(e.prompt)} | {_cell(e.reference)} | {_cell(e.output)} | {e.rouge_l:.3f} |"
        if at:
            other = at.get(e.id)
            row += f" {_cell(other.output)} | {other.rouge_l:.3f} |" if other else " | |"
        lines.append(row)
    if len(ch.examples) > limit:
        lines += ["", f"{len(ch.examples) - limit} more in the evaluation report (JSON)."]
    return lines


def _cell(text: str, limit: int = 120) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _num(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def _pct(x: float) -> str:
    return f"{x:+.2%}" if math.isfinite(x) else str(x)


def _share(x: float) -> str:
    return f"{abs(x):.2%}" if math.isfinite(x) else str(x)


def _ci(ci: tuple[float, float] | None) -> str:
    return f"[{_num(ci[0])}, {_num(ci[1])}]" if ci else ""


def _margins(policy: GatePolicy) -> str:
    return ", ".join(f"{m} {margin(policy, m):.1%}" for m in ("bits_per_byte", "accuracy"))


def model_card(
    profile: Profile,
    model_dir: Path,
    manifest: dict[str, Any],
    report: EvalReport,
    decision: Decision | None = None,
    champion: EvalReport | None = None,
    *,
    base: str | None = None,
) -> str:
    """The Markdown card attached to a registered version: base model, data manifest,
    training config, metrics and this gate's decision (`Decision.to_markdown`). `base`
    overrides what the training summary says."""
    info: dict[str, Any] = {}
    path = Path(model_dir) / artifacts.TRAINING_INFO
    if path.is_file():
        try:
            info = json.loads(path.read_text())
        except ValueError:
            info = {}
    model_cfg = info.get("model") or profile.model.model_dump(mode="json")
    if base is None:
        base = model_cfg.get("base") or (
            f"fresh {model_cfg.get('arch', '?')} ({model_cfg.get('n_layer', '?')} layers, "
            f"{model_cfg.get('n_embd', '?')} wide, context {model_cfg.get('context', '?')})"
        )
        if model_cfg.get("warm_start"):
            base += "; warm-started from the champion when one existed"
    data = {k: v for k, v in manifest.items() if not isinstance(v, dict | list)}
    lines = [
        f"# {profile.registry.model_name}",
        "",
        f"- **Base model:** {base}",
        f"- **Data manifest:** `{manifest.get('content_hash', 'unknown')}`",
        "",
        "## Data",
        "",
        "```json",
        json.dumps(data, indent=2, default=str),
        "```",
        "",
        "## Training",
        "",
        "```json",
        json.dumps(
            {"train": info.get("train"), "summary": info.get("summary")}, indent=2, default=str
        )[:2000],
        "```",
        "",
        "## Metrics (held-out documents)",
        "",
        "| metric | value |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.6g} |" for k, v in report.metrics().items()]
    if decision is not None:
        lines += ["", decision.to_markdown(report, champion)]
    return "\n".join(lines) + "\n"
