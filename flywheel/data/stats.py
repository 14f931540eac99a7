"""What `prepare` returns: the counts a person checks and KFP shows as Metrics."""

from __future__ import annotations

from pydantic import BaseModel, Field

from flywheel.artifacts import SPLITS


class DataStats(BaseModel):
    content_hash: str = Field(description="sha256 of the inputs and the data config")
    out_dir: str
    docs_read: int = Field(description="rows read from the source, rejects included")
    docs_kept: int = Field(description="documents in the dataset (all splits)")
    rejected: dict[str, int] = Field(default_factory=dict, description="bad input: reason -> rows")
    rejected_by_source: dict[str, int] = Field(default_factory=dict)
    dropped: dict[str, int] = Field(default_factory=dict, description="step -> documents dropped")
    dropped_by_reason: dict[str, int] = Field(
        default_factory=dict, description="'step:reason' -> documents"
    )
    docs: dict[str, int] = Field(default_factory=dict, description="split -> documents")
    tokens: dict[str, int] = Field(default_factory=dict, description="split -> tokens in sequences")
    sequences: dict[str, int] = Field(
        default_factory=dict, description="split -> packed training sequences (block_size tokens)"
    )
    tail_tokens: dict[str, int] = Field(
        default_factory=dict, description="split -> tokens past the last full sequence"
    )
    block_size: int
    vocab_size: int
    tokenizer_trained: bool
    seconds: float = 0.0
    timings: dict[str, float] = Field(default_factory=dict, description="step -> seconds")

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def metrics(self) -> dict[str, float]:
        """Flat numbers, named for a KFP Metrics artifact / MLflow."""
        out: dict[str, float] = {
            "docs_read": float(self.docs_read),
            "docs_kept": float(self.docs_kept),
            "docs_rejected": float(self.rejected_total),
            "vocab_size": float(self.vocab_size),
            "block_size": float(self.block_size),
            "seconds": round(self.seconds, 3),
        }
        for name, n in sorted(self.dropped.items()):
            out[f"dropped_{name}"] = float(n)
        for reason, n in sorted(self.rejected.items()):
            out[f"rejected_{reason}"] = float(n)
        for split in SPLITS:
            out[f"docs_{split}"] = float(self.docs.get(split, 0))
            out[f"tokens_{split}"] = float(self.tokens.get(split, 0))
            out[f"sequences_{split}"] = float(self.sequences.get(split, 0))
        return out

    def rows(self) -> list[tuple[str, object]]:
        """(what, value) rows for the CLI's counts table, in pipeline order."""
        rows: list[tuple[str, object]] = [("documents read", self.docs_read)]
        for reason, n in sorted(self.rejected.items()):
            rows.append((f"  rejected: {reason}", n))
        for key, n in self.dropped_by_reason.items():
            name, reason = key.split(":", 1)
            rows.append((f"  dropped by {name}: {reason}", n))
        rows.append(("documents kept", self.docs_kept))
        for split in SPLITS:
            rows.append(
                (
                    f"  {split}: docs / tokens / sequences",
                    f"{self.docs.get(split, 0):,} / {self.tokens.get(split, 0):,} / {self.sequences.get(split, 0):,}",
                )
            )
        kind = "trained byte-level BPE" if self.tokenizer_trained else "base"
        rows += [
            ("tokenizer", f"{kind}, vocab {self.vocab_size:,}"),
            ("block size", self.block_size),
            ("content hash", self.content_hash[:12]),
            ("seconds", f"{self.seconds:.1f}"),
            ("written to", self.out_dir),
        ]
        return rows
