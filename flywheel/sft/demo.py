"""A real instruction set from text on this machine, for the local SFT demo.

Two kinds of records, both answered by the Python documentation the interpreter ships:
"Explain the "with" statement." by the first paragraph of its pydoc topic, and
"What does `json.dumps` do?" by the first paragraph of the function's docstring. No
network, deterministic for a Python version, a few hundred records in well under a second.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path

# Standard-library modules whose public functions have prose docstrings.
MODULES = (
    "json",
    "os.path",
    "textwrap",
    "shutil",
    "string",
    "itertools",
    "functools",
    "random",
    "statistics",
    "base64",
    "difflib",
    "fnmatch",
    "glob",
    "heapq",
    "bisect",
    "copy",
    "html",
    "keyword",
    "operator",
    "re",
)
_UNDERLINE = re.compile(r"^[*=\-]{3,}$")
_MIN_CHARS = 24


def _first_paragraph(text: str) -> str | None:
    """The first prose paragraph, lines joined; None when it is a signature or too short."""
    for para in text.strip().split("\n\n"):
        lines = [ln.strip() for ln in para.splitlines() if ln.strip()]
        if not lines or _UNDERLINE.match(lines[-1]) or para.startswith("   "):
            continue  # a title (underlined) or an indented grammar/code block
        joined = " ".join(lines)
        return joined if len(joined) >= _MIN_CHARS else None
    return None


def topic_records() -> list[dict[str, str]]:
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        title = topics[key].strip().splitlines()[0].strip()
        answer = _first_paragraph(topics[key])
        if answer:
            out.append({"prompt": f"Explain {title[0].lower()}{title[1:]}.", "response": answer})
    return out


def docstring_records(modules: tuple[str, ...] = MODULES) -> list[dict[str, str]]:
    out = []
    for name in modules:
        module = importlib.import_module(name)
        for attr in sorted(getattr(module, "__all__", None) or dir(module)):
            obj = getattr(module, attr, None)
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            answer = _first_paragraph(doc)
            # Builtins often open with their signature ("dumps(obj, ...)"): not an answer.
            if answer and not answer.startswith(f"{attr}("):
                out.append({"prompt": f"What does `{name}.{attr}` do?", "response": answer})
    return out


def instruction_records() -> list[dict[str, str]]:
    """Topic and docstring records, each prompt once (first answer kept)."""
    seen: set[str] = set()
    out = []
    for record in topic_records() + docstring_records():
        if record["prompt"] not in seen:
            seen.add(record["prompt"])
            out.append(record)
    return out


def write_jsonl(path: Path) -> int:
    records = instruction_records()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return len(records)
