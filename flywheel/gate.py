"""The promotion gate: a pure decision over two fresh evaluations and a policy.

`decide_promotion` reads numbers and returns a `Decision`; it touches no store, so every
case (no champion, challenger better, champion better, inside the non-inferiority
margin, NaN/inf, absolute bound violated) is a unit test. A rejected candidate is a
normal outcome (`promote=False`), never an exception: the pipeline run succeeds and the
decision is what a person reads in the UI.

Rules, in order (all are checked, so the reasons list every failure at once):

1. every challenger metric is finite;
2. absolute bounds: perplexity <= ``max_perplexity``, accuracy >= ``min_accuracy``;
3. with ``require_generation_checks``, every generation check passed;
4. no champion: promote if 1-3 hold;
5. every champion metric is finite, and both were evaluated on the same data;
6. perplexity: with ``min_relative_improvement`` > 0 the challenger must be that share
   lower (superiority); otherwise at most the perplexity margin higher (non-inferiority);
7. accuracy: at most the accuracy margin (a share of the champion's) lower.

Margins are relative ("a share worse than the champion") for every metric, from
``margins[metric]`` or else ``non_inferiority_margin``.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import ConfigDict, Field

from flywheel.artifacts import JsonFile
from flywheel.config import GatePolicy
from flywheel.evaluate.report import EvalReport


class Decision(JsonFile):
    model_config = ConfigDict(ser_json_inf_nan="constants")

    promote: bool
    verdict: Literal["promote", "reject"]
    reasons: list[str] = Field(description="why, one sentence per rule checked; failures first")
    deltas: dict[str, float] = Field(
        default_factory=dict,
        description="challenger vs champion: *_rel = (challenger - champion) / champion, *_abs",
    )
    has_champion: bool
    policy: GatePolicy

    # ------------------------------------------------------------- rendering

    def to_markdown(self, challenger: EvalReport, champion: EvalReport | None) -> str:
        """Metrics, deltas, intervals, verdict and reasons, for the KFP UI and the model card."""
        icon = "PROMOTE" if self.promote else "REJECT"
        lines = [f"## Gate decision: **{icon}**", ""]
        conf = f"{challenger.confidence:.0%}"
        lines += [
            f"| metric | challenger | {conf} CI | champion | {conf} CI | delta |",
            "|---|---:|---|---:|---|---:|",
        ]
        for name, better in (("perplexity", "lower"), ("accuracy", "higher")):
            ch = getattr(challenger, name)
            ch_ci = getattr(challenger, f"{name}_ci")
            cp = getattr(champion, name) if champion else None
            cp_ci = getattr(champion, f"{name}_ci") if champion else None
            rel = self.deltas.get(f"{name}_rel")
            lines.append(
                f"| {name} ({better} is better) | {_num(ch)} | {_ci(ch_ci)} | "
                f"{_num(cp) if champion else 'none'} | {_ci(cp_ci)} | "
                f"{_pct(rel) if rel is not None else ''} |"
            )
        tok = f"{challenger.n_tokens:,} tokens / {challenger.n_docs} docs"
        if champion:
            tok += f" (champion: {champion.n_tokens:,} tokens / {champion.n_docs} docs)"
        lines += ["", f"Evaluated on {tok}; data `{challenger.data_hash or 'unknown'}`.", ""]
        lines += ["### Reasons", ""] + [f"- {r}" for r in self.reasons]
        if challenger.generation:
            lines += ["", "### Generation checks (challenger)", ""]
            lines += ["| prompt | output | s/token | repetition | ok |", "|---|---|---:|---:|---|"]
            for g in challenger.generation:
                out = g.output.replace("|", "\\|").replace("\n", " ")[:80]
                lines.append(
                    f"| {g.prompt[:40]} | {out} | {g.seconds_per_token:.4f} | "
                    f"{g.repetition:.2f} | {'yes' if g.passed else 'no'} |"
                )
        lines += [
            "",
            f"Policy: max perplexity {self.policy.max_perplexity:g}, min accuracy "
            f"{self.policy.min_accuracy:g}, min relative improvement "
            f"{self.policy.min_relative_improvement:.1%}, margins {_margins(self.policy)}.",
        ]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ json


def margin(policy: GatePolicy, metric: str) -> float:
    return policy.margins.get(metric, policy.non_inferiority_margin)


def decide_promotion(
    challenger: EvalReport, champion: EvalReport | None, policy: GatePolicy
) -> Decision:
    """Promote or reject `challenger` against `champion` (None: no model in production)."""
    fails: list[str] = []
    passes: list[str] = []
    deltas: dict[str, float] = {}

    bad = challenger.non_finite()
    if bad:
        fails.append(f"challenger has non-finite metrics: {', '.join(bad)}")
    else:
        (passes if challenger.perplexity <= policy.max_perplexity else fails).append(
            f"challenger perplexity {_num(challenger.perplexity)} "
            f"{'<=' if challenger.perplexity <= policy.max_perplexity else '>'} "
            f"maximum {policy.max_perplexity:g}"
        )
        ok = challenger.accuracy >= policy.min_accuracy
        (passes if ok else fails).append(
            f"challenger accuracy {challenger.accuracy:.4f} {'>=' if ok else '<'} "
            f"minimum {policy.min_accuracy:g}"
        )
    if policy.require_generation_checks and challenger.generation:
        failed = [g.prompt for g in challenger.generation if not g.passed]
        if failed:
            fails.append(f"generation checks failed for {len(failed)} prompt(s): {failed[:3]}")
        else:
            passes.append(f"all {len(challenger.generation)} generation checks passed")

    if champion is None:
        passes.append("no champion in production: the absolute bounds decide")
    else:
        _compare(challenger, champion, policy, passes, fails, deltas)

    promote = not fails
    return Decision(
        promote=promote,
        verdict="promote" if promote else "reject",
        reasons=fails + passes,
        deltas=deltas,
        has_champion=champion is not None,
        policy=policy,
    )


def _compare(
    ch: EvalReport,
    cp: EvalReport,
    policy: GatePolicy,
    passes: list[str],
    fails: list[str],
    deltas: dict[str, float],
) -> None:
    bad = cp.non_finite()
    if bad:
        # A broken champion cannot be out-scored meaningfully; a person decides (models promote).
        fails.append(f"champion has non-finite metrics ({', '.join(bad)}): cannot compare")
        return
    if ch.data_hash and cp.data_hash and ch.data_hash != cp.data_hash:
        fails.append(
            f"challenger and champion were evaluated on different data "
            f"({ch.data_hash[:12]} vs {cp.data_hash[:12]})"
        )
        return
    for name in ("perplexity", "accuracy"):
        a, b = getattr(ch, name), getattr(cp, name)
        deltas[f"{name}_abs"] = a - b
        deltas[f"{name}_rel"] = (a - b) / b if b else (0.0 if a == b else math.inf)
    if ch.non_finite():
        return  # the challenger already failed rule 1; the deltas are still shown

    rel = deltas["perplexity_rel"]
    if policy.min_relative_improvement > 0:
        ok = -rel >= policy.min_relative_improvement
        word = "lower" if rel < 0 else "higher"
        (passes if ok else fails).append(
            f"perplexity {_share(rel)} {word} than the champion's "
            f"({_num(ch.perplexity)} vs {_num(cp.perplexity)}); "
            f"required: at least {policy.min_relative_improvement:.1%} lower"
        )
    else:
        m = margin(policy, "perplexity")
        ok = rel <= m
        word = "lower" if rel < 0 else "higher"
        (passes if ok else fails).append(
            f"perplexity {_share(rel)} {word} than the champion's "
            f"({_num(ch.perplexity)} vs {_num(cp.perplexity)}); "
            f"allowed: at most {m:.1%} higher"
        )

    m = margin(policy, "accuracy")
    drop = -deltas["accuracy_rel"] if cp.accuracy else 0.0
    ok = drop <= m
    word = "lower" if drop > 0 else "higher"
    (passes if ok else fails).append(
        f"accuracy {_share(drop)} {word} than the champion's "
        f"({ch.accuracy:.4f} vs {cp.accuracy:.4f}); allowed: at most {m:.1%} lower"
    )

    if ch.perplexity_ci and cp.perplexity_ci:
        overlap = (
            ch.perplexity_ci[0] <= cp.perplexity_ci[1]
            and cp.perplexity_ci[0] <= (ch.perplexity_ci[1])
        )
        if overlap:
            passes.append(
                "note: the perplexity intervals overlap, so the difference is within "
                "bootstrap noise over documents"
            )


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
    return ", ".join(f"{m} {margin(policy, m):.1%}" for m in ("perplexity", "accuracy"))
