"""Evaluation: perplexity and next-token accuracy on held-out documents, with bootstrap
intervals and optional generation checks. See `evaluate`."""

from flywheel.evaluate.core import evaluate, read_test_documents, resolve_model
from flywheel.evaluate.report import EvalReport, GenerationCheck

__all__ = ["EvalReport", "GenerationCheck", "evaluate", "read_test_documents", "resolve_model"]
