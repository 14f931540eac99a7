"""The data stage on instruction/chat records (flywheel.sft.stage through data.stage.prepare).

No Ray: SFT sets are rendered in the stage's process. Real files (JSONL, parquet), the real
pydoc instruction set, a real BPE trained by the stage, the CLI in this process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures_data import pydoc_texts, train_tokenizer

from flywheel import artifacts
from flywheel.config import load_profile
from flywheel.data.stage import prepare
from flywheel.errors import DataError
from flywheel.sft import records as R
from flywheel.sft.prepare import read_samples
from flywheel.sft.render import IGNORE_INDEX
from flywheel.sft.stage import MALFORMED_JSON, UNSUPPORTED_FILE

GOOD = [
    {"prompt": f"What is {w}?", "response": f"{w.capitalize()} is a word used in tests."}
    for w in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota")
]
SHORT = ["data.block_size=64", "model.context=64", "data.tokenizer.vocab_size=300"]


def _corpus(root: Path) -> Path:
    root.mkdir(parents=True)
    lines = [json.dumps(r) for r in GOOD[:6]]
    lines += [
        "{not json",
        json.dumps(["a list"]),
        json.dumps({"prompt": "Q?", "response": "  "}),
        json.dumps({"prompt": "long " * 80, "response": "x"}),
    ]
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    chats = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["response"]},
            ]
        }
        for r in GOOD[6:]
    ]
    pq.write_table(pa.Table.from_pylist(chats), root / "b.parquet")
    (root / "notes.txt").write_text("not records")
    return root


def test_files_source_instruction_records_with_every_reject_and_a_manifest(state_dir, tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    profile = load_profile(
        None,
        [
            "data.format=instruction",
            "data.source.kind=files",
            f"data.source.path={corpus}",
            "data.max_reject_share=0.9",
            *SHORT,
        ],
    )
    stats = prepare(profile, tmp_path / "ds")
    ds = tmp_path / "ds"

    rejects = [json.loads(x) for x in (ds / artifacts.REJECTS).read_text().splitlines()]
    by_id = {r["id"]: r for r in rejects}
    assert by_id["a.jsonl:7"]["reason"] == MALFORMED_JSON
    assert by_id["a.jsonl:8"]["reason"] == R.NOT_AN_OBJECT
    assert by_id["a.jsonl:9"]["reason"] == R.EMPTY_RESPONSE
    assert by_id["a.jsonl:10"]["reason"] == R.LONGER_THAN_CONTEXT
    assert by_id["notes.txt"]["reason"] == UNSUPPORTED_FILE
    # The chat records in b.parquet lack the instruction columns: rejected, not skipped.
    assert {by_id[f"b.parquet:{i}"]["reason"] for i in range(3)} == {R.MISSING_FIELD}
    assert all(r["source"] in ("a.jsonl", "b.parquet", "notes.txt") for r in rejects)
    assert stats.docs_read == 14 and stats.docs_kept == 6 and stats.rejected_total == 8

    m = artifacts.DatasetManifest.read(ds)
    assert m.format == "instruction" and m.content_hash == stats.content_hash
    assert m.rejects.by_reason == stats.rejected and sum(m.rejects.by_reason.values()) == 8
    assert m.rejects.by_source == {"a.jsonl": 4, "b.parquet": 3, "notes.txt": 1}
    sft = m.model_dump()["sft"]
    assert sum(sft["samples"].values()) == 6 and sft["packing"] is False
    assert 0 < sum(sft["response_tokens"].values()) < sum(sft["tokens"].values())
    assert sft["template"] == "chatml" and m.tokenizer.trained
    samples = [s for split in artifacts.SPLITS for s in read_samples(ds / split)]
    assert sorted(s.id for s in samples) == sorted(f"a.jsonl:{i}" for i in range(1, 7))
    for s in samples:  # prompt masked, response learned
        assert s.labels[0] == IGNORE_INDEX and 0 < s.response_tokens < len(s.input_ids)

    # The template the samples were rendered with travels with the tokenizer.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ds / artifacts.TOKENIZER_DIR)
    assert "<|im_start|>" in tok.chat_template and tok.convert_tokens_to_ids("<|im_end|>") > 0

    again = prepare(profile, tmp_path / "again")
    assert again.content_hash == stats.content_hash  # reproducible
    for split in artifacts.SPLITS:
        assert (ds / split / "part-00000.parquet").read_bytes() == (
            tmp_path / "again" / split / "part-00000.parquet"
        ).read_bytes()


def test_chat_from_parquet_with_the_base_models_tokenizer(state_dir, tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    base = tmp_path / "base"
    train_tokenizer(pydoc_texts(50), 400).save_pretrained(base)
    profile = load_profile(
        None,
        [
            "data.format=chat",
            "data.source.kind=files",
            f"data.source.path={corpus / 'b.parquet'}",
            f"model.base={base}",
            "data.split.validation_share=0",
            "data.split.test_share=0",
            # This base has no ChatML markers as tokens: its samples run longer.
            "data.block_size=128",
            "model.context=128",
        ],
    )
    stats = prepare(profile, tmp_path / "ds")
    m = artifacts.DatasetManifest.read(tmp_path / "ds")
    assert m.format == "chat" and stats.sequences["train"] == 3 and not stats.rejected
    assert not m.tokenizer.trained and m.tokenizer.base == str(base)
    assert m.model_dump()["tokenizer"]["base_field"] == "model.base"
    assert m.vocab_size == 400  # the base's vocabulary, not one trained here


def test_pydocs_instruction_set_and_too_many_rejects(state_dir, tmp_path):
    profile = load_profile(None, ["data.format=instruction", "data.block_size=24"])
    # Most demo answers are longer than 24 tokens: too many rejects, written first.
    with pytest.raises(DataError, match=r"records rejected .* mostly longer_than_context") as e:
        prepare(profile, tmp_path / "ds")
    kept = tmp_path / "ds"
    assert str(kept / artifacts.REJECTS) in str(e.value) and ".incoming-" not in str(e.value)
    lines = (kept / artifacts.REJECTS).read_text().splitlines()
    assert lines and all(json.loads(x)["reason"] == R.LONGER_THAN_CONTEXT for x in lines)
    assert not (kept / artifacts.MANIFEST).exists()


def test_cli_data_prepare_on_the_pydoc_instruction_set(state_dir, cli):
    code, out, err = cli(
        "data",
        "prepare",
        "data.format=instruction",
        "data.block_size=256",
        "model.context=256",
        "data.tokenizer.vocab_size=600",
        # No champion lookup: a fresh state dir's first MLflow store costs ~13 s of migrations.
        "model.warm_start=false",
    )
    assert code == 0, err
    made = list((state_dir / "datasets").iterdir())
    assert len(made) == 1
    m = artifacts.DatasetManifest.read(made[0])
    assert m.format == "instruction" and m.content_hash.startswith(made[0].name)
    assert "response tokens" in out and "padding at micro-batch 8" in out
    assert sum(m.sequences.values()) > 150


def test_sharegpt_chat_from_a_saved_hf_dataset_through_the_column_map(state_dir, tmp_path):
    import datasets

    rows = [
        {
            "conversations": [
                {"from": "human", "value": r["prompt"]},
                {"from": "gpt", "value": r["response"]},
            ]
        }
        for r in GOOD
    ] + [{"conversations": [{"from": "gpt", "value": "An answer to nothing."}]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    profile = load_profile(
        None,
        [
            "data.format=chat",
            "data.source.kind=hf",
            f"data.source.path={tmp_path / 'hf'}",
            "data.columns.messages=conversations",
            "data.columns.role=from",
            "data.columns.content=value",
            *SHORT,
        ],
    )
    stats = prepare(profile, tmp_path / "ds")
    assert stats.docs_read == 10 and stats.docs_kept == 9
    assert stats.rejected == {R.BAD_TURN_ORDER: 1}
    (reject,) = [
        json.loads(x) for x in (tmp_path / "ds" / artifacts.REJECTS).read_text().splitlines()
    ]
    assert reject["id"].endswith(":9") and reject["source"].startswith("hf:")
