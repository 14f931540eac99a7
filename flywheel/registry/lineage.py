"""What a registered version carries: the tag names two sides must agree on, and the
lineage tags of a candidate. Pure: no MLflow."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from flywheel import contracts

if TYPE_CHECKING:
    from flywheel.evaluate.report import EvalReport
    from flywheel.gate import Decision

CHAMPION = contracts.CHAMPION
CHALLENGER = contracts.CHALLENGER
LATEST = "latest"
MODEL_ARTIFACT = "model"
CARD_ARTIFACT = "model_card.md"
# Lineage tag keys on each version, as the pipeline writes them (`lineage_tags` builds
# them); plain keys so any MLflow client reads `training_run_id` without knowing flywheel.
TAG_DATA_HASH = "data_manifest_hash"
TAG_TRAINING_RUN = contracts.TRAINING_RUN_ID
TAG_PIPELINE_RUN = "pipeline_run_id"
TAG_TRIGGER = "trigger_reason"
TAG_VERDICT = contracts.VERDICT
TAG_REASONS = "verdict_reasons"
METRIC_PREFIX = contracts.CHALLENGER_PREFIX  # EvalReport.metrics(...) at registration
DELTA_PREFIX = contracts.DELTA_PREFIX
# Tags flywheel itself maintains.
TAG_FLAVOR = "flywheel.flavor"
TAG_REGISTERED_BY = "flywheel.registered_by"
REGISTERED_BY_FLYWHEEL = "flywheel"
# The pair that identifies one candidate: a retried gate step carries the same two.
CANDIDATE_KEYS = (TAG_PIPELINE_RUN, TAG_TRAINING_RUN)
# SQL-backed stores cap registered-model tags and descriptions at 5,000 characters.
MAX_TEXT = 4900


def clip(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 20] + "\n... (truncated)"


def lineage_tags(
    *,
    data_hash: str | None = None,
    training_run_id: str | None = None,
    pipeline_run_id: str | None = None,
    trigger_reason: str | None = None,
    report: EvalReport | None = None,
    decision: Decision | None = None,
) -> dict[str, str]:
    """The lineage tags of a candidate version, for `Registry.register_candidate`."""
    tags = {
        TAG_DATA_HASH: data_hash or (report.data_hash if report else None),
        TAG_TRAINING_RUN: training_run_id,
        TAG_PIPELINE_RUN: pipeline_run_id,
        TAG_TRIGGER: trigger_reason,
    }
    out = {k: str(v) for k, v in tags.items() if v}
    if report is not None:
        out.update({k: f"{v:.6g}" for k, v in report.metrics(METRIC_PREFIX).items()})
    if decision is not None:
        out[TAG_VERDICT] = decision.verdict
        out[TAG_REASONS] = clip(json.dumps(decision.reasons))
        out.update({f"{DELTA_PREFIX}{k}": f"{v:.6g}" for k, v in decision.deltas.items()})
    return out


def candidate_identity(tags: dict[str, str]) -> dict[str, str] | None:
    """The tags that make a registration the same candidate again, or None when the caller
    gave no identity (then every registration is a new candidate)."""
    if not all(tags.get(k) for k in CANDIDATE_KEYS):
        return None
    return {k: str(tags[k]) for k in CANDIDATE_KEYS}
