"""Real text for drift tests: Python docs (reference) and text of other kinds.

Nothing generated: the Python documentation shipped with the interpreter
(`pydoc_data.topics`), license texts a Debian/Ubuntu machine ships in
/usr/share/common-licenses, and the standard library's own source code.
"""

from __future__ import annotations

import json
import random
import re
import sysconfig
from pathlib import Path

import pandas as pd

LICENSES = Path("/usr/share/common-licenses")


def _paragraphs(text: str, min_chars: int = 80) -> list[str]:
    out = []
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.split())
        if len(para) >= min_chars:
            out.append(para)
    return out


def pydoc_paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    paras = [p for key in sorted(topics) for p in _paragraphs(topics[key])]
    random.Random(0).shuffle(paras)
    return paras


def license_paragraphs() -> list[str]:
    files = sorted(p for p in LICENSES.iterdir() if p.is_file()) if LICENSES.is_dir() else []
    return [p for f in files for p in _paragraphs(f.read_text(errors="replace"))]


def stdlib_code_chunks(n: int = 300) -> list[str]:
    """Blocks of Python source code (code, not docstrings: blank-line separated)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[str] = []
    for file in sorted(root.glob("*.py")):
        for block in re.split(r"\n\s*\n", file.read_text(errors="replace")):
            if len(block) >= 120 and '"""' not in block and "'''" not in block:
                chunks.append(block)
        if len(chunks) >= n:
            break
    return chunks[:n]


def write_reference(texts: list[str], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        {
            "id": [f"pydoc-{i}" for i in range(len(texts))],
            "source": "pydocs",
            "timestamp": pd.Timestamp("2024-01-01", tz="UTC"),
            "text": texts,
        }
    ).to_parquet(path)
    return path


def write_window(texts: list[str], path: Path, text_field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for i, text in enumerate(texts):
            stamp = f"2024-06-01T00:{i // 60 % 60:02d}:{i % 60:02d}Z"
            fh.write(json.dumps({text_field: text, "timestamp": stamp}) + "\n")
    return path


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 1024) -> Path:
    """A byte-level BPE trained on the reference, saved as a HF tokenizer dir."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, show_progress=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    return out_dir
