"""The evaluation report: what one model scored on one held-out split.

Passed between pipeline steps as a JSON file, so it must round-trip exactly, NaN and
infinity included: a model that diverged must arrive at the gate as NaN, not as null
(which would fail validation) and not as a number (which could pass).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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


class DocScores(BaseModel):
    """Per-document scores, keyed by document id: what the gate pairs two models on.

    Columns, one entry per scored document (a few numbers each, so 1,000 documents stay
    a few tens of kilobytes of JSON).
    """

    model_config = ConfigDict(ser_json_inf_nan="constants", extra="forbid")

    ids: list[str] = Field(description="document ids from the held-out split (unique)")
    bits: list[float] = Field(description="summed next-token loss over the document, in bits")
    bytes: list[int] = Field(description="UTF-8 bytes of the text those predictions cover")
    tokens: list[int] = Field(description="predicted tokens")
    correct: list[int] = Field(description="correct top-1 next-token predictions")

    @model_validator(mode="after")
    def _aligned(self) -> DocScores:
        n = len(self.ids)
        if any(len(c) != n for c in (self.bits, self.bytes, self.tokens, self.correct)):
            raise ValueError("per-document columns must have one entry per id")
        if len(set(self.ids)) != n:
            raise ValueError("document ids must be unique")
        return self


class SftExample(BaseModel):
    """One held-out prompt of an instruction/chat split: the reference reply, the model's
    greedy reply and their scores. Keyed by the sample id, so the gate pairs two models'
    replies to the same prompts."""

    model_config = ConfigDict(ser_json_inf_nan="constants", extra="forbid")

    id: str
    prompt: str = Field(description="the last user turn (the full rendered prompt was sent)")
    reference: str = Field(description="the held-out assistant reply")
    output: str = Field(description="the model's greedy reply, cut at its end of turn")
    exact: bool = Field(description="equal to the reference after whitespace normalisation")
    rouge_l: float = Field(description="ROUGE-L F1 against the reference (rouge-score)")


class EvalReport(JsonFile):
    model_config = ConfigDict(ser_json_inf_nan="constants", extra="forbid")

    model: str = Field(description="the reference evaluated: a path or a models:/ URI")
    model_dir: str = Field(description="the local directory actually loaded")
    dataset: str = Field(description="the Dataset directory")
    data_hash: str | None = Field(None, description="content_hash of the dataset manifest")
    bits_per_byte: float = Field(
        description="primary metric: summed next-token loss in bits / UTF-8 bytes scored "
        "(tokenizer-independent; lower is better)"
    )
    bits_per_byte_ci: tuple[float, float] | None = None
    perplexity: float = Field(description="per token of this model's own tokenizer")
    perplexity_ci: tuple[float, float] | None = None
    accuracy: float = Field(description="next-token top-1 accuracy (per own-tokenizer token)")
    accuracy_ci: tuple[float, float] | None = None
    mean_nll: float = Field(description="nats per predicted token")
    confidence: float
    bootstrap_samples: int
    n_docs: int
    n_tokens: int = Field(description="predicted tokens")
    n_bytes: int = Field(description="UTF-8 bytes scored (of the predicted tokens' text)")
    tokenizer: str | None = Field(
        None, description="fingerprint of the tokenizer's vocabulary (equal: same tokens)"
    )
    seconds: float = Field(description="wall time of the evaluation")
    generation: list[GenerationCheck] = Field(default_factory=list)
    docs: DocScores | None = Field(
        None, description="per-document scores the gate pairs on; None: cannot be paired"
    )
    # Instruction/chat splits (flywheel.evaluate.sft). There the per-document scores above
    # are per held-out sample and cover its response tokens only: bits_per_byte is the
    # response loss in bits over the responses' UTF-8 bytes, perplexity and accuracy are
    # over response tokens.
    format: Literal["text", "instruction", "chat"] = Field(
        "text", description="the dataset's format (its manifest's)"
    )
    response_loss: float | None = Field(
        None,
        description="instruction/chat: masked loss, nats per response token of this model's "
        "tokenizer (the training objective on held-out samples)",
    )
    exact_match: float | None = Field(
        None, description="instruction/chat: share of greedy replies equal to the reference"
    )
    rouge_l: float | None = Field(
        None, description="instruction/chat: mean ROUGE-L F1 of greedy replies"
    )
    examples: list[SftExample] = Field(
        default_factory=list, description="instruction/chat: one entry per held-out prompt"
    )

    # ------------------------------------------------------------------ views

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat numbers for MLflow/KFP Metrics; `prefix` is joined with '_' (e.g. 'champion')."""
        if prefix and not prefix.endswith(("_", ".", "/")):
            prefix += "_"
        out: dict[str, float] = {
            "bits_per_byte": self.bits_per_byte,
            "perplexity": self.perplexity,
            "accuracy": self.accuracy,
            "mean_nll": self.mean_nll,
            "n_docs": float(self.n_docs),
            "n_tokens": float(self.n_tokens),
            "n_bytes": float(self.n_bytes),
        }
        if self.bits_per_byte_ci:
            out["bits_per_byte_ci_low"], out["bits_per_byte_ci_high"] = self.bits_per_byte_ci
        if self.perplexity_ci:
            out["perplexity_ci_low"], out["perplexity_ci_high"] = self.perplexity_ci
        if self.accuracy_ci:
            out["accuracy_ci_low"], out["accuracy_ci_high"] = self.accuracy_ci
        for name in ("response_loss", "exact_match", "rouge_l"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
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
