"""Evaluation: bits per byte (primary), perplexity and next-token accuracy on held-out
documents, with bootstrap intervals, per-document scores for the paired gate, and
optional generation checks; on instruction/chat data, over the responses, with greedy
replies scored by exact match and ROUGE-L (`flywheel.evaluate.sft`). See `evaluate`."""

from flywheel.evaluate.core import evaluate, read_test_documents, read_test_split, resolve_model
from flywheel.evaluate.report import DocScores, EvalReport, GenerationCheck, SftExample

__all__ = [
    "DocScores",
    "EvalReport",
    "GenerationCheck",
    "SftExample",
    "evaluate",
    "read_test_documents",
    "read_test_split",
    "resolve_model",
]
