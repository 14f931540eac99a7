"""The evaluation report: what one model scored on one held-out split.

Passed between pipeline steps as a JSON file, so it must round-trip exactly, NaN and
infinity included: a model that diverged must arrive at the gate as NaN, not as null
(which would fail validation) and not as a number (which could pass).
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from flywheel.artifacts import JsonFile


class GenerationCheck(BaseModel):
    """Greedy continuation of one fixed prompt."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    prompt: str
    output: str = Field(description="the generated continuation (prompt excluded)")
    new_tokens: int
    seconds_per_token: float
    repetition: float = Field(description="share of repeated 3-grams among generated tokens")
    non_empty: bool
    degenerate: bool

    @property
    def passed(self) -> bool:
        return self.non_empty and not self.degenerate


class EvalReport(JsonFile):
    model_config = ConfigDict(ser_json_inf_nan="constants", extra="forbid")

    model: str = Field(description="the reference evaluated: a path or a models:/ URI")
    model_dir: str = Field(description="the local directory actually loaded")
    dataset: str = Field(description="the Dataset directory")
    data_hash: str | None = Field(None, description="content_hash of the dataset manifest")
    perplexity: float
    perplexity_ci: tuple[float, float] | None = None
    accuracy: float = Field(description="next-token top-1 accuracy")
    accuracy_ci: tuple[float, float] | None = None
    mean_nll: float = Field(description="nats per predicted token")
    confidence: float
    bootstrap_samples: int
    n_docs: int
    n_tokens: int = Field(description="predicted tokens")
    seconds: float = Field(description="wall time of the evaluation")
    generation: list[GenerationCheck] = Field(default_factory=list)

    # ------------------------------------------------------------------ views

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat numbers for MLflow/KFP Metrics; `prefix` is joined with '_' (e.g. 'champion')."""
        if prefix and not prefix.endswith(("_", ".", "/")):
            prefix += "_"
        out: dict[str, float] = {
            "perplexity": self.perplexity,
            "accuracy": self.accuracy,
            "mean_nll": self.mean_nll,
            "n_docs": float(self.n_docs),
            "n_tokens": float(self.n_tokens),
        }
        if self.perplexity_ci:
            out["perplexity_ci_low"], out["perplexity_ci_high"] = self.perplexity_ci
        if self.accuracy_ci:
            out["accuracy_ci_low"], out["accuracy_ci_high"] = self.accuracy_ci
        if self.generation:
            out["generation_pass_rate"] = sum(g.passed for g in self.generation) / len(
                self.generation
            )
            out["seconds_per_token"] = sum(g.seconds_per_token for g in self.generation) / len(
                self.generation
            )
        return {f"{prefix}{k}": float(v) for k, v in out.items()}

    def non_finite(self) -> list[str]:
        """Names of metrics that are NaN or infinite (the gate never passes those)."""
        return [k for k, v in self.metrics().items() if not math.isfinite(v)]

    # ------------------------------------------------------------------- json
