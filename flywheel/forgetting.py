"""No forgetting behind the gate: replay into a retrain, a regression set at the gate.

A drift-triggered retrain trains on the production window, and the gate compares the two
models on that window's held-out split, where a challenger that has forgotten the
champion's domain still wins. Two guards, both found through the champion's lineage (the
samples `flywheel.tracking.log_dataset_samples` keeps with its training run):

- **replay** (`drift.replay_share`): the retrain's corpus is the new data plus a seeded
  sample of the champion's training documents (its drift reference), so that share of
  what it learns from is the old domain;
- **regression set**: the champion's own held-out sample, pinned with the champion (the
  same documents every time it is challenged). Both models are scored on it and the gate
  rejects a challenger significantly worse there by more than `gate.regression_margin`
  (`flywheel.gate`, rule 8).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from flywheel import artifacts
from flywheel.config import Profile, validate_profile

if TYPE_CHECKING:
    from flywheel.evaluate.report import EvalReport

log = logging.getLogger(__name__)

REPLAY_FILE = "replay-champion.jsonl"


def replay_count(n_new: int, share: float) -> int:
    """Replay documents that make `share` of a corpus with `n_new` new ones (pure)."""
    if share <= 0 or n_new <= 0:
        return 0
    # round first: 0.9 / 0.1 is 9.000000000000002 in floating point
    return math.ceil(round(n_new * share / (1 - share), 9))


def _lineage_sample(profile: Profile, artifact: str, dest: Path) -> Path | None:
    """A sample the champion's training run logged (None: no champion, or not logged)."""
    import mlflow

    from flywheel.registry import Registry
    from flywheel.tracking import tracking_uri

    champ = Registry(profile).champion()
    run_id = champ.tags.get("training_run_id") if champ else None
    if not run_id:
        return None
    client = mlflow.MlflowClient(tracking_uri(profile))
    if artifact not in {f.path for f in client.list_artifacts(run_id, "data")}:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, artifact, str(dest)))


def with_replay(profile: Profile, dest: Path) -> Profile:
    """The profile with its (local, `files`) source replaced by a directory holding the
    new data and `drift.replay_share` of replayed champion documents; unchanged when the
    share is 0, the source is not local files, or there is no champion sample."""
    from flywheel.drift import WINDOW_SUFFIXES
    from flywheel.monitor import REFERENCE_ARTIFACT, read_texts

    share, src = profile.drift.replay_share, profile.data.source
    if share <= 0 or src.kind != "files" or not src.path or not Path(src.path).exists():
        return profile
    sample = _lineage_sample(profile, REFERENCE_ARTIFACT, dest / "champion")
    if sample is None:
        return profile
    new_dir = dest / "new"
    source = Path(src.path)
    if source.is_dir():
        shutil.copytree(source, new_dir)
    else:
        new_dir.mkdir(parents=True)
        shutil.copy2(source, new_dir / source.name)
    n_new = sum(
        _records(f) for f in new_dir.rglob("*") if f.is_file() and f.suffix in WINDOW_SUFFIXES
    )
    old = read_texts(sample)
    n = min(replay_count(n_new, share), len(old))
    import numpy as np

    picked = np.random.default_rng(profile.drift.seed).choice(len(old), size=n, replace=False)
    with (new_dir / REPLAY_FILE).open("w", encoding="utf-8") as fh:
        for i in sorted(picked):
            record = {src.text_field: old[i]}
            if src.id_field:
                record[src.id_field] = f"replay-{i}"
            fh.write(json.dumps(record) + "\n")
    log.info("replay: %d champion documents added to %d new ones (%s)", n, n_new, new_dir)
    data = profile.model_dump()
    data["data"]["source"]["path"] = str(new_dir)
    return validate_profile(data, "profile with the replay sample")


def _records(file: Path) -> int:
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(file).metadata.num_rows
    with file.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


def regression_set(profile: Profile, dest: Path) -> Path | None:
    """The champion's held-out sample as a dataset directory evaluation reads
    (text/test.parquet and a manifest whose hash names the documents); None without one."""
    from flywheel.monitor import HELDOUT_ARTIFACT

    sample = _lineage_sample(profile, HELDOUT_ARTIFACT, dest / "download")
    if sample is None:
        return None
    out = dest / "regression"
    (out / artifacts.TEXT_DIR).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sample, out / artifacts.TEST_TEXT)
    digest = hashlib.sha256(sample.read_bytes()).hexdigest()
    artifacts.DatasetManifest(
        schema_version=artifacts.SCHEMA_VERSION, content_hash=f"regression-{digest}"
    ).write(out)
    return out


@contextlib.contextmanager
def replayed(profile: Profile, new_data: bool) -> Iterator[Profile]:
    """`with_replay` in a temporary directory, for a retrain on new data (`data_location`);
    the profile unchanged otherwise (a retrain on the profile's own corpus replays nothing)."""
    if not new_data or profile.drift.replay_share <= 0:
        yield profile
        return
    with tempfile.TemporaryDirectory(prefix="flywheel-replay-") as tmp:
        yield with_replay(profile, Path(tmp))


def regression_reports(
    profile: Profile, challenger_dir: Path
) -> tuple[EvalReport, EvalReport] | None:
    """(challenger, champion) scored on the champion's regression set; None without a
    champion or a held-out sample logged with its training run (an older champion)."""
    from flywheel.evaluate import evaluate
    from flywheel.registry import Registry

    champion = Registry(profile).champion_uri()
    if champion is None:
        return None
    with tempfile.TemporaryDirectory(prefix="flywheel-regression-") as tmp:
        reg = regression_set(profile, Path(tmp))
        if reg is None:
            return None
        return evaluate(profile, challenger_dir, reg), evaluate(profile, champion, reg)
