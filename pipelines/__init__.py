"""The pipelines, built from a profile at compile time: `retrain` and `monitor`."""
