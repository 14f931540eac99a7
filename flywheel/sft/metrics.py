"""Held-out scores for a fine-tuned model: masked response loss and generation metrics.

The response loss is the training objective on held-out samples (nats per response
token, prompt tokens masked exactly as in training). Generation metrics compare greedy
replies to the references: exact match (after whitespace normalisation) and ROUGE-L F1
(`rouge-score`, the reference implementation's port); `examples_markdown` is the
per-example table the evaluation report shows.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flywheel.sft import records as R
from flywheel.sft.render import IGNORE_INDEX, Renderer, Sample, collate

_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def exact_match(output: str, reference: str) -> bool:
    return normalize(output) == normalize(reference)


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L F1 on rouge-score's tokens (lower-cased alphanumeric words)."""
    from rouge_score import rouge_scorer

    return float(rouge_scorer.RougeScorer(["rougeL"]).score(reference, output)["rougeL"].fmeasure)


@dataclass(frozen=True)
class Example:
    prompt: str
    reference: str
    output: str

    @property
    def exact(self) -> bool:
        return exact_match(self.output, self.reference)

    @property
    def rouge_l(self) -> float:
        return rouge_l(self.output, self.reference)


@dataclass(frozen=True)
class GenerationScores:
    exact_match: float
    rouge_l: float
    n: int


def score(examples: Sequence[Example]) -> GenerationScores:
    n = len(examples)
    if not n:
        return GenerationScores(0.0, 0.0, 0)
    return GenerationScores(
        exact_match=sum(e.exact for e in examples) / n,
        rouge_l=sum(e.rouge_l for e in examples) / n,
        n=n,
    )


def _cell(text: str, limit: int) -> str:
    text = normalize(text).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def examples_markdown(examples: Sequence[Example], limit: int = 160) -> str:
    """A Markdown table: prompt / reference / output / exact / ROUGE-L, one row each."""
    lines = ["| prompt | reference | output | exact | ROUGE-L |", "|---|---|---|---|---|"]
    for e in examples:
        lines.append(
            f"| {_cell(e.prompt, limit)} | {_cell(e.reference, limit)} | "
            f"{_cell(e.output, limit)} | {'yes' if e.exact else 'no'} | {e.rouge_l:.3f} |"
        )
    return "\n".join(lines)


def response_loss(model: Any, samples: Sequence[Sample], pad_id: int, micro: int = 8) -> float:
    """Mean loss per response token over `samples` (each batch weighted by its tokens)."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(samples), micro):
            batch = collate(samples[i : i + micro], pad_id)
            # transformers' loss averages over the batch's labelled (shifted) positions.
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(model(**batch).loss) * n
            count += n
    return total / count if count else float("nan")


def generate_reply(
    model: Any, renderer: Renderer, conv: R.Conversation, max_new_tokens: int = 64
) -> str:
    """Greedy reply to `conv` without its last (assistant) turn, cut at EOS."""
    import torch

    prompt_turns = conv.as_messages()[:-1]
    text = renderer.text(prompt_turns, generation_prompt=True)
    tok = renderer.tokenizer
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    reply = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    # ChatML's end-of-turn marker is text for a tokenizer without it as a token.
    return reply.split("<|im_end|>", 1)[0].strip()


def evaluate_generation(
    model: Any, renderer: Renderer, conversations: Sequence[R.Conversation], max_new_tokens: int
) -> tuple[GenerationScores, list[Example]]:
    examples = []
    for conv in conversations:
        prompt = "\n".join(t.content for t in conv.turns[:-1] if t.role == R.USER)
        reply = generate_reply(model, renderer, conv, max_new_tokens)
        examples.append(Example(prompt, conv.turns[-1].content, reply))
    return score(examples), examples
