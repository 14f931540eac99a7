"""The model registry: a thin adapter over MLflow's, with aliases (never the deprecated stages).

- Every evaluated candidate is a version of ``registry.model_name``, logged as flywheel's
  pyfunc (`serving_model`: ``mlflow models serve -m models:/<name>@champion`` serves it and
  honours max_new_tokens/temperature/top_p), born with its lineage tags and what it was
  trained as (method, base, parameter counts, LoRA config; a LoRA run's adapter is an
  artifact of the same run), then given the alias ``challenger``.
- ``model.base: models:/<name>@<alias>`` is resolved by `resolve_model_source`.
- Alias ``champion`` is production. Every move of it (promotion, manual promotion,
  rollback) is planned by one pure function (`history.plan_move`) and executed by
  `Registry._move` under the alias lock: the target's promotion tags, then the history
  entry, then the alias.

The parts, each one job:

- `lineage`   tag names and the lineage tags of a candidate (pure)
- `history`   the append-only history and the alias-move protocol (pure)
- `lock`      the lock that serialises alias moves, kept in the registry itself
- `packaging` the pyfunc in, a save_pretrained directory (or an adapter) out, the cache
- `serving_model` the pyfunc itself, logged from code (imports nothing from flywheel)
- `adapter`   the MLflow client: bounded retries (tenacity), errors as RegistryError
- `core`      `Registry`, composing the above

The model card is rendered next to the gate's Markdown (`flywheel.gate.model_card`).
"""

from flywheel.gate import model_card
from flywheel.registry.adapter import ModelVersionInfo, NotFoundError
from flywheel.registry.core import (
    Registry,
    parse_model_uri,
    resolve_model_source,
    resolve_model_uri,
)
from flywheel.registry.history import (
    HISTORY_PREFIX,
    HistoryEntry,
    MovePlan,
    default_actor,
    plan_move,
    read_history,
    rollback_target,
)
from flywheel.registry.lineage import (
    CARD_ARTIFACT,
    CHALLENGER,
    CHAMPION,
    LATEST,
    MODEL_ARTIFACT,
    TAG_DATA_HASH,
    TAG_FLAVOR,
    TAG_PIPELINE_RUN,
    TAG_REGISTERED_BY,
    TAG_TRAINING_RUN,
    TAG_TRIGGER,
    TAG_VERDICT,
    lineage_tags,
)
from flywheel.registry.lock import LOCK_SUFFIX

__all__ = [
    "CARD_ARTIFACT",
    "CHALLENGER",
    "CHAMPION",
    "HISTORY_PREFIX",
    "LATEST",
    "LOCK_SUFFIX",
    "MODEL_ARTIFACT",
    "TAG_DATA_HASH",
    "TAG_FLAVOR",
    "TAG_PIPELINE_RUN",
    "TAG_REGISTERED_BY",
    "TAG_TRAINING_RUN",
    "TAG_TRIGGER",
    "TAG_VERDICT",
    "HistoryEntry",
    "ModelVersionInfo",
    "MovePlan",
    "NotFoundError",
    "Registry",
    "default_actor",
    "lineage_tags",
    "model_card",
    "parse_model_uri",
    "plan_move",
    "read_history",
    "resolve_model_source",
    "resolve_model_uri",
    "rollback_target",
]
