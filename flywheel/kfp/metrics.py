"""Stage metrics onto KFP `Metrics` artifacts, safe for KFP's launcher.

Python's `json` writes a diverged loss as a bare `NaN`/`Infinity` token. KFP's Go launcher
reads the executor output with protojson, which rejects those tokens, so the *step* would
fail instead of the gate rejecting the model. A non-finite value is therefore written as
its string ("nan", "inf", "-inf"): still visible in the UI, never parsed as a number. The
gate is unaffected: it reads the evaluation report artifact, which keeps the real value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def kfp_safe(values: Mapping[str, Any]) -> dict[str, float | str]:
    """Finite numbers as floats, everything non-finite as its string (pure)."""
    out: dict[str, float | str] = {}
    for key, value in values.items():
        number = float(value)
        out[key] = number if math.isfinite(number) else str(number)
    return out


def log_metrics(artifact: Any, values: Mapping[str, Any]) -> None:
    """Log `values` on a KFP Metrics artifact (`Output[Metrics]`), see the module docstring."""
    for key, value in kfp_safe(values).items():
        if isinstance(value, float):
            artifact.log_metric(key, value)
        else:
            artifact.metadata[key] = value
