"""The served model: an MLflow pyfunc over a save_pretrained causal LM, logged "from code".

MLflow copies this file into every logged version and runs it when the version is loaded
(`mlflow models serve`, `mlflow.pyfunc.load_model`), so it imports nothing from flywheel:
a version serves wherever mlflow, torch and transformers are installed.

Why not MLflow's transformers flavour: its pyfunc forwards only the params the signature
declares (it declared none, so `max_new_tokens` was dropped), and under it `temperature`
means nothing unless the caller also knows to send `do_sample`. Here the three params the
signature declares are the whole contract: ``max_new_tokens`` bounds the reply,
``temperature`` 0 is greedy (the default: the same prompt gives the same reply) and above 0
samples, ``top_p`` is nucleus sampling.

Input: a ``prompt`` column (text models), or a ``messages`` column of chat turns
(``[{"role": ..., "content": ...}]``, SFT models), rendered with the tokenizer's chat
template (registration stores the template the model was trained with). Output, one row
per input: ``text`` (the generated continuation only) and ``generated_tokens``.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

# The artifact key of the save_pretrained directory (weights + tokenizer).
HF_ARTIFACT = "hf"
# Defaults of the signature's params: greedy, the whole distribution, and a reply length
# that fits a small context (registration lowers it for a tiny model).
DEFAULT_PARAMS: dict[str, Any] = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0}


def _expand(value: Any) -> list[Any]:
    """Prompts (str) and conversations (a list of turns) in one input cell or list.

    The same request reaches `predict` in several shapes (a DataFrame from
    ``dataframe_records``, a dict of lists from ``inputs``, a cell holding a list after
    schema enforcement), so each is unwrapped to its prompts and conversations.
    """
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        if "role" in value:  # a bare turn: a one-turn conversation
            return [[value]]
        return _expand(value.get("messages", value.get("prompt")))
    items = list(value)
    if items and all(isinstance(t, dict) and "role" in t for t in items):
        return [items]  # one conversation
    return [row for item in items for row in _expand(item)]


def _rows(model_input: Any) -> list[Any]:
    """Prompts (str) or conversations (list of turns), one per input row."""
    if hasattr(model_input, "to_dict"):  # a DataFrame (after signature enforcement)
        for column in ("messages", "prompt"):
            if column in model_input.columns:
                return _expand(model_input[column])
        return _expand(model_input.iloc[:, 0])
    return _expand(model_input)


def _turns(conversation: Any) -> list[dict[str, str]]:
    # Signature enforcement may hand over numpy arrays of dicts.
    return [{"role": str(t["role"]), "content": str(t["content"])} for t in list(conversation)]


class CausalLM(PythonModel):
    def load_context(self, context: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = context.artifacts[HF_ARTIFACT]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        cfg = self.model.config
        self.context = int(
            getattr(cfg, "n_positions", None)
            or getattr(cfg, "max_position_embeddings", None)
            or 1024
        )

    def _prompt_ids(self, row: Any) -> list[int]:
        if isinstance(row, str):
            return list(self.tokenizer(row)["input_ids"])
        text = self.tokenizer.apply_chat_template(
            _turns(row), tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def predict(
        self, context: Any, model_input: Any, params: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        import torch

        p = {**DEFAULT_PARAMS, **(params or {})}
        max_new = max(1, int(p["max_new_tokens"]))
        temperature, top_p = float(p["temperature"]), float(p["top_p"])
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out = []
        for row in _rows(model_input):
            ids = self._prompt_ids(row)
            # Positions are finite: keep the prompt's end and room for at least one token.
            new = min(max_new, max(1, self.context - 1))
            ids = ids[-(self.context - new) :] or [pad]
            sampling = (
                {"do_sample": True, "temperature": temperature, "top_p": top_p}
                if temperature > 0
                else {"do_sample": False}
            )
            with torch.no_grad():
                generated = self.model.generate(
                    torch.tensor([ids]),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    max_new_tokens=new,
                    pad_token_id=pad,
                    **sampling,
                )
            reply = generated[0, len(ids) :].tolist()
            out.append(
                {
                    "text": tok.decode(reply, skip_special_tokens=True),
                    "generated_tokens": len(reply),
                }
            )
        return out


mlflow.models.set_model(CausalLM())
