"""Metrics artifacts stay JSON that KFP's Go launcher (protojson) can read, even for a
diverged model (the gate reads the evaluation report, which keeps the real value, and
rejects it: tests/unit/test_gate.py)."""

from __future__ import annotations

import json
import math

from kfp.dsl import Metrics

from flywheel.kfp.metrics import kfp_safe, log_metrics


def test_non_finite_values_become_strings_and_finite_ones_stay_numbers():
    out = kfp_safe({"loss": float("nan"), "ppl": float("inf"), "neg": -math.inf, "acc": 0.25})
    assert out == {"loss": "nan", "ppl": "inf", "neg": "-inf", "acc": 0.25}


def test_a_diverged_models_metrics_artifact_is_strict_json():
    artifact = Metrics(name="metrics", uri="/tmp/m", metadata={})
    log_metrics(artifact, {"perplexity": float("nan"), "accuracy": 0.1, "steps": 3})
    # allow_nan=False is the strictness of protojson: bare NaN/Infinity would raise here.
    text = json.dumps(artifact.metadata, allow_nan=False)
    assert json.loads(text) == {"perplexity": "nan", "accuracy": 0.1, "steps": 3.0}
