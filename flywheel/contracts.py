"""Names that two or more modules must agree on, in one place.

A stage writes a ledger entry that the summary, `flywheel run` and the monitor read back;
a training run logs samples that the monitor downloads by path; the pipelines configure
tasks by the names the profile's `kfp.resources` keys use. Each such name is a constant
here, so a rename is one edit and a typo is an import error, not a silently empty read.
Layouts of artifacts on disk are in `flywheel.artifacts`; registry tag keys that only
the registry reads are in `flywheel.registry.lineage`. No imports: any module may use it.
"""

from __future__ import annotations

# ------------------------------------------------------------------ stages and tasks
# Each is a ledger entry (flywheel.ledger) and the KFP task of the same name (config.TASKS,
# pipelines/*.py), except where noted.
PLAN = "plan"
PREPARE_DATA = "prepare-data"
TUNE = "tune"
SKIP_TUNE = "skip-tune"  # a task only: it records nothing
TRAIN = "train"
EVALUATE = "evaluate"  # the challenger's task; its ledger entry is EVALUATE_CHALLENGER
EVALUATE_CHALLENGER = "evaluate-challenger"  # a ledger entry only
EVALUATE_CHAMPION = "evaluate-champion"
GATE = "gate"
PROMOTE = "promote"
SUMMARY = "summary"
DRIFT_CHECK = "drift-check"
NO_RETRAIN = "no-retrain"

# ------------------------------------------------------------------ registry aliases
CHAMPION = "champion"
CHALLENGER = "challenger"

# ------------------------------------------------------------------ the training run
# The version tag naming the MLflow run that trained it (also the train stage's ledger tag).
TRAINING_RUN_ID = "training_run_id"
# Tags on the training run (the pipeline's train step sets them).
TAG_TRIGGER_REASON = "flywheel.trigger_reason"
TAG_DATA_HASH = "flywheel.data_hash"
TAG_WARM_START = "flywheel.warm_start"
# The dataset's text samples logged with the run (tracking.log_dataset_samples keeps the
# file names of artifacts.REFERENCE_TEXT / TEST_TEXT), downloaded by the monitor.
SAMPLES_DIR = "data"
REFERENCE_SAMPLE = f"{SAMPLES_DIR}/reference.parquet"
HELDOUT_SAMPLE = f"{SAMPLES_DIR}/test.parquet"

# ------------------------------------------------------------------ ledger metrics
STAGE_SECONDS = "stage_seconds"
# The gate's entry: both reports' metrics under these prefixes, the paired differences
# under DELTA_PREFIX.
CHALLENGER_PREFIX = "challenger_"
CHAMPION_PREFIX = "champion_"
DELTA_PREFIX = "delta_"
CHALLENGER_BITS_PER_BYTE = "challenger_bits_per_byte"
CHAMPION_BITS_PER_BYTE = "champion_bits_per_byte"
CHALLENGER_PERPLEXITY = "challenger_perplexity"
CHAMPION_PERPLEXITY = "champion_perplexity"
# The gate entry's tags the summary reads: the verdict and the registered version.
VERDICT = "verdict"
VERSION = "version"
# Whether the gate chose to promote ("True"/"False"), read by flywheel.outcome.
GATE_PROMOTE = "promote"
# The plan entry's tag saying whether this run tunes ("True"/"False").
PLAN_TUNE_ENABLED = "tune_enabled"
# The summary entry's tags (and the run summary's facts): the run's outcome, derived from its
# ledger (flywheel.outcome: succeeded, gated, failed, unknown), the state KFP handed the exit
# handler verbatim, and the task the ledger shows failed (absent when none did).
SUMMARY_OUTCOME = "outcome"
SUMMARY_REPORTED_STATE = "reported_state"
SUMMARY_FAILED_TASK = "failed_task"
