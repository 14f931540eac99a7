"""Flywheel: pipeline-as-code for the LLM lifecycle on Kubeflow Pipelines.

The library is importable without KFP: only `flywheel.kfp` imports it.
"""

__version__ = "0.1.0"
