"""Conversations to token ids and labels, with the loss on responses only.

A conversation is rendered with the tokenizer's own chat template (`apply_chat_template`)
or, when the tokenizer has none, the ChatML template below (`data.chat_template`). Labels
copy the input ids on assistant turns and are -100 elsewhere, so prompt, user and system
tokens add nothing to the loss (`data.train_on_inputs` puts them back).

Where the responses are is found on the rendered *text*, not on separately tokenized
pieces: the template renders the conversation up to each assistant turn (with the
generation prompt) and through it, the difference of the two is that turn's character
span, and the full text is tokenized once with offsets. Tokenizing pieces separately and
concatenating would give ids that differ from what the model sees at generation time
wherever BPE merges across a boundary.

No packing for SFT: one sample per row, right-padded to the longest in its micro-batch.
Packing several samples into one row keeps them apart only with a block-diagonal mask or
position ids that restart per sample, which transformers honours only with the varlen
flash-attention kernels (CUDA); with SDPA or eager attention on CPU packed samples would
attend to each other. The cost is the padding, measured by `padding_share` and recorded in
the manifest: on the demo instruction set (`flywheel.sft.demo`, 234 records, the data stage's
BPE, block_size 256: 188 train samples, mean 51 tokens, longest 197) 39% of the positions
computed at micro-batch 8 in file order are padding (47% in random order, 27% at
micro-batch 4); fully sorted by length it would be 5%. Padded positions are computed and
thrown away, so the training loop groups samples of similar length into micro-batches
within a shuffled window (`flywheel.train.loop`), which keeps most of that saving while
the batches stay random. With flash-attention's varlen kernels on a GPU, packing with
restarting position ids would remove the rest.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from flywheel.config import DataConfig
from flywheel.errors import ConfigError
from flywheel.sft import records as R

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # the label torch's cross-entropy (and transformers' LM loss) skips

# ChatML (OpenAI/Qwen), plus the tokenizer's EOS after each assistant turn: a tokenizer
# without a template (the BPE trained here) has no <|im_end|> token to stop on, and
# generation stops on EOS, so the model learns to emit it where a reply ends.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML}


def resolve_template(
    tokenizer: Any, choice: Literal["auto", "tokenizer", "chatml"]
) -> tuple[str, str]:
    """(jinja template, its name) for `data.chat_template`."""
    own = getattr(tokenizer, "chat_template", None)
    if choice == "tokenizer" or (choice == "auto" and own):
        if not own:
            raise ConfigError(
                "data.chat_template is 'tokenizer' but the tokenizer has no chat template; "
                "write chatml (or auto: the tokenizer's own when it has one, else chatml)"
            )
        if not isinstance(own, str):  # a dict of named templates: the default one renders chat
            own = own.get("default")
            if not own:
                raise ConfigError("data.chat_template: the tokenizer has no 'default' template")
        return own, "tokenizer"
    name = "chatml" if choice == "auto" else choice
    return TEMPLATES[name], name


@dataclass(frozen=True)
class Sample:
    id: str
    input_ids: list[int]
    labels: list[int]

    @property
    def response_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


class Renderer:
    """Renders conversations with one tokenizer and template (built once per worker)."""

    def __init__(
        self,
        tokenizer: Any,
        max_len: int,
        template: Literal["auto", "tokenizer", "chatml"] = "auto",
        train_on_inputs: bool = False,
    ) -> None:
        if not getattr(tokenizer, "is_fast", False):
            # The response spans are mapped to tokens through character offsets.
            raise ConfigError("data.tokenizer: SFT needs a fast tokenizer (offset mapping)")
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.template, self.template_name = resolve_template(tokenizer, template)
        self.train_on_inputs = train_on_inputs

    def text(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        out = self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )
        return str(out)

    def response_spans(self, conv: R.Conversation) -> tuple[str, list[tuple[int, int]]]:
        """The full text and the character span of each assistant turn in it."""
        messages = conv.as_messages()
        full = self.text(messages)
        spans = []
        for k, turn in enumerate(conv.turns):
            if turn.role != R.ASSISTANT:
                continue
            before = self.text(messages[:k], generation_prompt=True)
            through = self.text(messages[: k + 1])
            if not (through.startswith(before) and full.startswith(through)):
                raise R.BadRecord(
                    R.TEMPLATE_REJECTED,
                    f"the {self.template_name} template renders turn {k} differently as the "
                    "conversation grows, so its response cannot be located",
                )
            spans.append((len(before), len(through)))
        return full, spans

    def __call__(self, conv: R.Conversation) -> Sample | R.Reject:
        from jinja2.exceptions import TemplateError

        try:
            full, spans = self.response_spans(conv)
        except TemplateError as exc:
            return R.Reject(conv.id, R.TEMPLATE_REJECTED, f"{self.template_name}: {exc}")
        except R.BadRecord as bad:
            return R.Reject(conv.id, bad.reason, bad.detail)
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = enc["input_ids"]
        if len(ids) > self.max_len:
            # Rejected, not truncated: a cut sample loses the end of its response (or all).
            return R.Reject(
                conv.id,
                R.LONGER_THAN_CONTEXT,
                f"{len(ids)} tokens > {self.max_len} (data.block_size)",
            )
        # A token is a response token when it starts inside an assistant span.
        in_response = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
        if not any(in_response):
            return R.Reject(conv.id, R.NO_RESPONSE_TOKENS, "no token falls in an assistant turn")
        labels = (
            list(ids)
            if self.train_on_inputs
            else [t if r else IGNORE_INDEX for t, r in zip(ids, in_response, strict=True)]
        )
        return Sample(conv.id, ids, labels)


def render_all(
    conversations: Iterable[R.Conversation], renderer: Renderer
) -> tuple[list[Sample], list[R.Reject]]:
    samples: list[Sample] = []
    rejects: list[R.Reject] = []
    for conv in conversations:
        out = renderer(conv)
        (samples if isinstance(out, Sample) else rejects).append(out)  # type: ignore[arg-type]
    return samples, rejects


def records_to_samples(
    records: Iterable[Any], cfg: DataConfig, tokenizer: Any, ids: Iterable[str] | None = None
) -> tuple[list[Sample], list[R.Reject]]:
    """Parse, check and render records of `cfg.format` (instruction or chat)."""
    if cfg.format == "text":
        raise ConfigError("data.format is 'text': records_to_samples reads instruction or chat")
    convs, rejects = R.parse_records(records, cfg.format, cfg.columns, ids)
    renderer = Renderer(tokenizer, cfg.block_size, cfg.chat_template, cfg.train_on_inputs)
    samples, late = render_all(convs, renderer)
    return samples, rejects + late


def collate(samples: Sequence[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample: pads get attention 0 and label -100."""
    import torch

    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def padding_share(lengths: Sequence[int], micro_batch_size: int) -> float:
    """Share of the computed positions that are padding, batching `lengths` in order.

    The cost of not packing: every micro-batch runs at its longest sample's length.
    """
    total = computed = 0
    for i in range(0, len(lengths), micro_batch_size):
        batch = lengths[i : i + micro_batch_size]
        total += sum(batch)
        computed += max(batch) * len(batch)
    return 1 - total / computed if computed else 0.0
