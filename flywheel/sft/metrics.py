"""Held-out scores for a fine-tuned model: masked response loss and generation metrics.

The response loss is the training objective on held-out samples (nats per response
token, prompt tokens masked exactly as in training). Generation metrics compare greedy
replies to the references: exact match (after whitespace normalisation) and ROUGE-L F1
(`rouge-score`, the reference implementation's port); `examples_markdown` is the
per-example table the evaluation report shows.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from flywheel.sft import records as R
from flywheel.sft.render import IGNORE_INDEX, Renderer, Sample, collate

_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def exact_match(output: str, reference: str) -> bool:
    return normalize(output) == normalize(reference)


@functools.cache
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L F1 on rouge-score's tokens (lower-cased alphanumeric words)."""
    return float(_scorer().score(reference, output)["rougeL"].fmeasure)


# ChatML's end-of-turn marker: text, not a token, for a tokenizer trained without it.
END_OF_TURN = "<|im_end|>"


def clean_reply(text: str, tokenizer: Any) -> str:
    """A reply as a person reads it: cut at the end of its turn, special tokens removed.

    Applied alike to the reference (decoded from the held-out sample, where the template's
    end-of-turn marker and EOS belong to the response span) and to the model's output.
    """
    text = text.split(END_OF_TURN, 1)[0]
    for special in getattr(tokenizer, "all_special_tokens", []):
        if special:
            text = text.replace(special, "")
    return text.strip()


def display_prompt(rendered: str, tokenizer: Any) -> str:
    """The last user turn of a rendered ChatML prompt (what the table shows); for another
    template, the rendered prompt without special tokens."""
    marker = "<|im_start|>user\n"
    if marker in rendered:
        return rendered.rsplit(marker, 1)[1].split(END_OF_TURN, 1)[0].strip()
    return clean_reply(rendered.replace(END_OF_TURN, " "), tokenizer)


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


class Scored(Protocol):
    """What `examples_markdown` shows: `Example` here, `SftExample` in an EvalReport."""

    @property
    def prompt(self) -> str: ...
    @property
    def reference(self) -> str: ...
    @property
    def output(self) -> str: ...
    @property
    def exact(self) -> bool: ...
    @property
    def rouge_l(self) -> float: ...


def _cell(text: str, limit: int) -> str:
    text = normalize(text).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def examples_markdown(examples: Sequence[Scored], limit: int = 160) -> str:
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


def greedy(
    model: Any,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int,
    *,
    context: int | None = None,
    device: str = "cpu",
    stop_at_eos: bool = True,
) -> list[int]:
    """The new token ids of the greedy continuation of `prompt` (no special tokens added).

    With `context` (the model's length) the prompt keeps its tail and the budget shrinks so
    prompt + reply fit. `stop_at_eos`: stop at the tokenizer's EOS (the end of a chat turn);
    False leaves the stop to the model's own generation config (raw-text continuations).
    """
    import torch

    ids = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
    budget = max_new_tokens
    if context is not None:
        ids = ids[-(context - 1) :] or [tokenizer.eos_token_id or 0]
        budget = max(1, min(max_new_tokens, context - len(ids)))
    inputs = torch.tensor([ids], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = {"eos_token_id": tokenizer.eos_token_id} if stop_at_eos else {}
    with torch.inference_mode():
        out = model.generate(
            input_ids=inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=budget,
            do_sample=False,
            pad_token_id=pad,
            **stop,
        )
    return list(out[0, len(ids) :].tolist())


def generate_reply(
    model: Any, renderer: Renderer, conv: R.Conversation, max_new_tokens: int = 64
) -> str:
    """Greedy reply to `conv` without its last (assistant) turn, cut at EOS."""
    text = renderer.text(conv.as_messages()[:-1], generation_prompt=True)
    tok = renderer.tokenizer
    model.eval()
    return clean_reply(
        tok.decode(greedy(model, tok, text, max_new_tokens), skip_special_tokens=True), tok
    )


def complete(
    model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, context: int, device: str
) -> str:
    """Greedy reply to an already rendered prompt (ending with the generation prompt),
    at most `max_new_tokens` and within the model's context, cut at the end of its turn."""
    new = greedy(model, tokenizer, prompt, max_new_tokens, context=context, device=device)
    return clean_reply(tokenizer.decode(new, skip_special_tokens=True), tokenizer)


def evaluate_generation(
    model: Any, renderer: Renderer, conversations: Sequence[R.Conversation], max_new_tokens: int
) -> tuple[GenerationScores, list[Example]]:
    examples = []
    for conv in conversations:
        prompt = "\n".join(t.content for t in conv.turns[:-1] if t.role == R.USER)
        reply = generate_reply(model, renderer, conv, max_new_tokens)
        examples.append(Example(prompt, conv.turns[-1].content, reply))
    return score(examples), examples
