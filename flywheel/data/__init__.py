"""The data stage: sources, data steps on Ray Data, and `prepare` (see `flywheel.data.stage`)."""

from flywheel.data.stage import prepare
from flywheel.data.stats import DataStats

__all__ = ["DataStats", "prepare"]
