"""Evaluate a causal LM on the held-out samples of an instruction or chat Dataset.

The test split holds token ids and labels (-100 on prompt tokens), made with the data
stage's tokenizer and template (`flywheel.sft.prepare`). Each model is scored with its OWN
tokenizer, as on raw text: the samples are decoded back to the rendered conversation
(with the dataset's tokenizer) and the character spans of their responses, and each
model's tokenizer cuts that same text again; a token is a response token when it starts
inside a response span, the rule training used. With the dataset's tokenizer the ids come
back as they were (byte-level BPE decodes losslessly and re-encodes to the same ids).

Per sample: the summed loss over response tokens, the response tokens, the correct top-1
predictions and the UTF-8 bytes of the response spans (the reply plus the template's
end-of-turn marker the model must produce to stop). So bits per byte has the definition
it has for raw text (summed loss in bits / UTF-8 bytes scored) and stays comparable across
tokenizers; the response loss (nats per response token) is the training objective.

Generation: a greedy reply (at most `eval.max_new_tokens`) to each held-out prompt, the
conversation up to its last assistant turn; exact match and ROUGE-L against that turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flywheel import artifacts
from flywheel.config import EvalConfig
from flywheel.errors import DataError
from flywheel.evaluate.metrics import DocSums
from flywheel.evaluate.report import SftExample
from flywheel.sft import metrics as M
from flywheel.sft.render import IGNORE_INDEX


@dataclass(frozen=True)
class HeldOut:
    """One held-out sample as text: the rendered conversation and its response spans."""

    id: str
    text: str
    spans: tuple[tuple[int, int], ...]  # character spans of the response (assistant) tokens

    @property
    def prompt(self) -> str:
        """The conversation up to its last response: what a model is asked to continue."""
        return self.text[: self.spans[-1][0]]

    @property
    def reference(self) -> str:
        return self.text[self.spans[-1][0] : self.spans[-1][1]]

    @property
    def response_bytes(self) -> int:
        return sum(len(self.text[a:b].encode("utf-8")) for a, b in self.spans)


def read_sft_test(
    dataset_dir: Path, max_docs: int | None
) -> list[tuple[str, list[int], list[int]]]:
    """(id, input_ids, labels) of the held-out samples, in file order, at most `max_docs`."""
    import pyarrow.parquet as pq

    from flywheel.sft.prepare import ID_COLUMN, LABEL_COLUMN

    files = artifacts.split_files(dataset_dir, "test")
    if not files:
        raise DataError(f"{Path(dataset_dir) / 'test'}: held-out samples not found")
    out: list[tuple[str, list[int], list[int]]] = []
    seen: set[str] = set()
    for path in files:
        try:
            table = pq.read_table(path, columns=[ID_COLUMN, artifacts.TOKEN_COLUMN, LABEL_COLUMN])
        except Exception as exc:  # pyarrow raises several types for a missing column or bad file
            raise DataError(f"{path}: not an SFT split (id, input_ids, labels): {exc}") from None
        cols = table.to_pydict()
        for row in zip(
            cols[ID_COLUMN], cols[artifacts.TOKEN_COLUMN], cols[LABEL_COLUMN], strict=True
        ):
            # Ids key the gate's pairing: a repeated one is replaced by the row's position.
            key = str(row[0]) if row[0] is not None and str(row[0]) not in seen else f"#{len(out)}"
            seen.add(key)
            out.append((key, list(row[1]), list(row[2])))
            if max_docs and len(out) >= max_docs:
                return out
    if not out:
        raise DataError(f"{Path(dataset_dir) / 'test'}: no held-out samples to evaluate")
    return out


def decode_samples(
    rows: Sequence[tuple[str, list[int], list[int]]], tokenizer: Any
) -> list[HeldOut]:
    """Back to text: each run of prompt or response tokens is decoded on its own, so the
    response spans are exact. (A run boundary lies at a template marker, ASCII, so no
    character is split across two runs.) A sample with no response token is left out."""
    out = []
    for sample_id, ids, labels in rows:
        text, spans = "", []
        start = 0
        for end in range(1, len(ids) + 1):
            if end < len(ids) and (labels[end] == IGNORE_INDEX) == (labels[start] == IGNORE_INDEX):
                continue
            piece = tokenizer.decode(
                ids[start:end], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            if labels[start] != IGNORE_INDEX:
                spans.append((len(text), len(text) + len(piece)))
            text += piece
            start = end
        if spans and spans[0][0] > 0:
            out.append(HeldOut(sample_id, text, tuple(spans)))
    return out


def _tokenize(tokenizer: Any, item: HeldOut, context: int) -> tuple[list[int], list[bool], int]:
    """(ids, is-response per token, response bytes covered) under `tokenizer`, cut to the
    context: a cut sample is charged only for the response bytes its kept tokens cover."""
    enc = tokenizer(item.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids: list[int] = enc["input_ids"]
    offsets = enc["offset_mapping"]
    response = [any(a <= s < b for a, b in item.spans) for s, _ in offsets]
    if len(ids) <= context:
        return ids, response, item.response_bytes
    cut = offsets[context - 1][1]
    covered = sum(len(item.text[a : min(b, cut)].encode("utf-8")) for a, b in item.spans if a < cut)
    return ids[:context], response[:context], covered


def score_samples(
    model: Any, tokenizer: Any, items: Sequence[HeldOut], cfg: EvalConfig, device: str, context: int
) -> DocSums:
    """Summed NLL, correct top-1 predictions and predicted tokens over each sample's
    response tokens, and the response bytes scored."""
    import torch
    import torch.nn.functional as F

    if not getattr(tokenizer, "is_fast", False):
        raise DataError("evaluating an SFT split needs a fast tokenizer (offset mapping)")
    rows = [_tokenize(tokenizer, item, context) for item in items]
    sums = DocSums.empty(len(items))
    sums.bytes[:] = [r[2] for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Longest first, so each batch pads to nearly its own length.
    order = sorted(range(len(rows)), key=lambda k: -len(rows[k][0]))
    with torch.inference_mode():
        for b in range(0, len(order), cfg.batch_size):
            batch = order[b : b + cfg.batch_size]
            width = max(len(rows[k][0]) for k in batch)
            inputs = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, k in enumerate(batch):
                ids, response, _ = rows[k]
                inputs[row, : len(ids)] = torch.tensor(ids)
                labels[row, : len(ids)] = torch.tensor(
                    [t if r else IGNORE_INDEX for t, r in zip(ids, response, strict=True)]
                )
                mask[row, : len(ids)] = 1
            inputs, labels, mask = inputs.to(device), labels.to(device), mask.to(device)
            logits = model(input_ids=inputs, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            nll = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)),
                target.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="none",
            ).view(len(batch), width - 1)
            valid = target != IGNORE_INDEX
            correct = (logits.argmax(-1) == target) & valid
            idx = np.array(batch)
            sums.nll[idx] += nll.sum(1).double().cpu().numpy()
            sums.correct[idx] += correct.sum(1).cpu().numpy()
            sums.tokens[idx] += valid.sum(1).cpu().numpy()
    return sums


def generate_examples(
    model: Any,
    tokenizer: Any,
    items: Sequence[HeldOut],
    cfg: EvalConfig,
    device: str,
    context: int,
    reference_tokenizer: Any,
) -> list[SftExample]:
    """Greedy replies to the held-out prompts, scored against their references."""
    out = []
    for item in items:
        output = M.complete(model, tokenizer, item.prompt, cfg.max_new_tokens, context, device)
        reference = M.clean_reply(item.reference, reference_tokenizer)
        out.append(
            SftExample(
                id=item.id,
                prompt=M.display_prompt(item.prompt, reference_tokenizer),
                reference=reference,
                output=output,
                exact=M.exact_match(output, reference),
                rouge_l=M.rouge_l(output, reference),
            )
        )
    return out


def dataset_tokenizer(dataset_dir: Path, model_tokenizer: Any) -> Any:
    """The tokenizer the samples were made with: the dataset's own copy when it has one,
    else the model's (a dataset made from `model.base` uses that model's tokenizer)."""
    from transformers import AutoTokenizer

    manifest = artifacts.DatasetManifest.read(dataset_dir)
    path = Path(dataset_dir) / (manifest.tokenizer.path or artifacts.TOKENIZER_DIR)
    if path.is_dir():
        return AutoTokenizer.from_pretrained(path)
    return model_tokenizer
