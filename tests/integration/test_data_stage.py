"""The whole data stage on a small mixed corpus with local Ray (num_cpus=2).

The corpus is built in code from real text (pydoc topics, stdlib docstrings) in every
supported format, with one planted case of each kind of bad input, an exact copy and a
near-copy, so every count below is known in advance.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel import artifacts
from flywheel.config import RayConfig, load_profile
from flywheel.data import prepare, schema, sources
from flywheel.errors import DataError
from flywheel.progress import DataStepStarted

pytestmark = pytest.mark.integration

BLOCK = 32
EXPECTED_REJECTS = {
    schema.MALFORMED_JSON: 1,
    schema.MISSING_TEXT: 1,
    schema.NON_STRING_TEXT: 1,
    schema.EMPTY_FILE: 1,
    schema.UNDECODABLE: 1,
    schema.UNSUPPORTED_FILE: 1,
}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    from flywheel.runtime import ray_session

    with ray_session(RayConfig(mode="local", num_cpus=2)):
        yield


def _topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return sorted(topics.items())[:50]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    topics = _topics()
    (root / "topics").mkdir()
    for name, text in topics[:30]:
        (root / "topics" / f"{name}.txt").write_text(text)
    records = [
        json.dumps({"id": f"rec-{n}", "text": t, "ts": f"2024-03-{i + 1:02d}"})
        for i, (n, t) in enumerate(topics[30:])
    ]
    records[3:3] = [
        "{broken json",
        json.dumps({"id": "no-text"}),
        json.dumps({"id": "num", "text": 7}),
    ]
    (root / "records.jsonl").write_text("\n".join(records) + "\n")
    docstrings = sources.read_module_docstrings(sources.stdlib_root(), "json/decoder.py")
    docstrings += sources.read_module_docstrings(sources.stdlib_root(), "argparse.py")
    pq.write_table(
        pa.table(
            {
                "id": [d["id"] for d in docstrings],
                "text": [d["text"] for d in docstrings],
                "ts": ["2024-04-01T00:00:00"] * len(docstrings),
            }
        ),
        root / "docstrings.parquet",
    )
    # Planted: an exact copy (different file), and a near-copy (a few words changed).
    (root / "copy.txt").write_text(topics[0][1])
    longest = max(topics[:30], key=lambda kv: len(kv[1]))
    (root / "near.md").write_text(longest[1].replace(" the ", " THE ", 3))
    (root / "empty.txt").write_bytes(b"")
    (root / "latin1.txt").write_bytes("résumé of the café".encode("latin-1"))
    (root / "notes.csv").write_text("a,b\n1,2\n")
    return root


def _profile(corpus: Path, *extra: str):
    return load_profile(
        None,
        [
            "data.source.kind=files",
            f"data.source.path={corpus}",
            "data.source.id_field=id",
            "data.source.timestamp_field=ts",
            "data.tokenizer.vocab_size=400",
            f"data.block_size={BLOCK}",
            f"model.context={BLOCK}",
            "data.split.validation_share=0.1",
            "data.split.test_share=0.1",
            "data.reference_sample_docs=20",
            "ray.num_cpus=2",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "a"
    steps: list[str] = []
    stats = prepare(
        _profile(corpus),
        out,
        progress=lambda e: steps.append(
            f"{e.step}:{'start' if isinstance(e, DataStepStarted) else 'done'}"
        ),
    )
    return stats, out, steps


def test_counts(prepared):
    stats, out, steps = prepared
    assert steps[:2] == ["ray:start", "ray:done"] and steps[-1] == "write:done"
    assert stats.rejected == EXPECTED_REJECTS
    assert stats.rejected_by_source == {
        "records.jsonl": 3,
        "empty.txt": 1,
        "latin1.txt": 1,
        "notes.csv": 1,
    }
    drops = pd.read_json(out / "dropped.jsonl", lines=True)
    assert len(drops) == sum(stats.dropped.values())
    by_id = drops.set_index("id")
    # The planted copy: the smaller id survives, the other names it.
    first = f"topics/{_topics()[0][0]}.txt"
    assert by_id.loc[first, "reason"] == "exact_duplicate"
    assert by_id.loc[first, "detail"] == "copy of copy.txt"
    # The planted near-copy: one of the pair goes, naming the other.
    longest = max(_topics()[:30], key=lambda kv: len(kv[1]))[0]
    pair = {"near.md", f"topics/{longest}.txt"}
    near = drops[drops["id"].isin(pair)]
    assert near["reason"].tolist() == ["near_duplicate"]
    assert near["detail"].iloc[0] == f"near-duplicate of {(pair - {near['id'].iloc[0]}).pop()}"
    assert stats.dropped["quality"] == (drops["dropped_by"] == "quality").sum() > 0
    dropped = sum(stats.dropped.values())
    assert stats.docs_read == stats.docs_kept + dropped + sum(EXPECTED_REJECTS.values())
    assert stats.docs_kept == sum(stats.docs.values())
    assert all(stats.docs[s] > 0 and stats.sequences[s] > 0 for s in artifacts.SPLITS)
    assert all(stats.tokens[s] == stats.sequences[s] * BLOCK for s in artifacts.SPLITS)


def test_manifest_and_layout(prepared):
    stats, out, _ = prepared
    manifest = artifacts.read_manifest(out)
    assert manifest["content_hash"] == stats.content_hash
    assert manifest["block_size"] == BLOCK
    assert manifest["counts"]["rejected"] == 6
    chain = manifest["counts"]["steps"]
    assert [b["name"] for b in chain] == list(schema.PIPELINE_STEPS)
    assert all(a["kept"] == b["read"] for a, b in itertools.pairwise(chain))
    assert chain[-1]["kept"] == stats.docs_kept
    for split in artifacts.SPLITS:
        files = artifacts.split_files(out, split)
        assert [f"{split}/{f.name}" for f in files] == manifest["splits"][split]["files"]
        table = pq.read_table(files[0])
        assert table.column_names == [artifacts.TOKEN_COLUMN]
        lengths = pa.compute.list_value_length(table.column(artifacts.TOKEN_COLUMN))
        assert set(lengths.to_pylist()) == {BLOCK}
    test_text = pq.read_table(out / artifacts.TEST_TEXT).to_pandas()
    assert list(test_text.columns) == ["id", "source", "timestamp", "text"]
    assert len(test_text) == stats.docs["test"] == manifest["text"]["test_docs"]
    ref = pq.read_table(out / artifacts.REFERENCE_TEXT).to_pandas()
    assert len(ref) == 20
    assert not set(ref["id"]) & set(test_text["id"])


def test_rejects_file(prepared):
    _, out, _ = prepared
    lines = [json.loads(x) for x in (out / artifacts.REJECTS).read_text().splitlines()]
    assert {(r["source"], r["reason"]) for r in lines} == {
        ("empty.txt", schema.EMPTY_FILE),
        ("latin1.txt", schema.UNDECODABLE),
        ("notes.csv", schema.UNSUPPORTED_FILE),
        ("records.jsonl", schema.MALFORMED_JSON),
        ("records.jsonl", schema.MISSING_TEXT),
        ("records.jsonl", schema.NON_STRING_TEXT),
    }
    assert all(set(r) == {"id", "source", "reason", "detail"} and r["detail"] for r in lines)


def test_tokens_eos_between_documents(prepared):
    from transformers import AutoTokenizer

    stats, out, _ = prepared
    tok = AutoTokenizer.from_pretrained(out / artifacts.TOKENIZER_DIR)
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    flat = np.concatenate(
        [
            np.concatenate(pq.read_table(f).column(0).to_numpy(zero_copy_only=False))
            for f in artifacts.split_files(out, "train")
        ]
    )
    eos = int((flat == tok.eos_token_id).sum())
    assert 0 <= stats.docs["train"] - eos < BLOCK  # one EOS per document, bar the tail
    # A train document (from the reference sample) appears verbatim, followed by EOS.
    ref = pq.read_table(out / artifacts.REFERENCE_TEXT).to_pandas()["text"]
    hay = flat.tobytes()
    found = sum(
        np.asarray(
            [*tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id], dtype=np.int32
        ).tobytes()
        in hay
        for t in ref[:5]
    )
    assert found >= 4


def test_reproducible_bytes(prepared, corpus, tmp_path):
    stats, out, _ = prepared
    again = prepare(_profile(corpus, "data.batch_size=17"), tmp_path / "b")
    assert again.content_hash == stats.content_hash
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(
        p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file()
    )
    differing = [
        str(f) for f in files if (out / f).read_bytes() != (tmp_path / "b" / f).read_bytes()
    ]
    # The manifest records batch_size (a knob that changes no output), so it alone may differ.
    assert differing in ([], ["manifest.json"])
    left, right = (json.loads((d / artifacts.MANIFEST).read_text()) for d in (out, tmp_path / "b"))
    left["config"].pop("batch_size"), right["config"].pop("batch_size")
    assert left == right


def test_shards_cut_in_ray_hold_the_same_sequences(prepared, corpus, tmp_path, monkeypatch):
    """Shards of 8 sequences, each packed and written by its own Ray task, hold exactly the
    sequences of the one-shard run, in order: the lookahead completes every sequence that
    straddles two shards."""
    from flywheel.data import shards

    stats, out, _ = prepared
    monkeypatch.setattr(shards, "SEQUENCES_PER_SHARD", 8)
    small = prepare(_profile(corpus), tmp_path / "small")
    assert small.sequences == stats.sequences and small.tail_tokens == stats.tail_tokens
    for split in artifacts.SPLITS:
        files = artifacts.split_files(tmp_path / "small", split)
        assert len(files) > 1 or stats.sequences[split] <= 12
        cut = [pq.read_table(f).column(0).to_pylist() for f in files]
        whole = [pq.read_table(f).column(0).to_pylist() for f in artifacts.split_files(out, split)]
        assert [s for part in cut for s in part] == [s for part in whole for s in part]


def test_dedup_against_the_champions_index(prepared, corpus, tmp_path):
    """A later prepare with data.dedup.index = the first dataset drops exact copies and
    near-copies of its documents (counted like every other drop, the champion's id named),
    and keeps a replayed champion document."""
    from flywheel.data import index

    _, first, _ = prepared
    topics = dict(_topics())
    names = sorted(list(topics)[:30], key=lambda n: -len(topics[n]))[1:5]  # long, not near.md's
    new = tmp_path / "new"
    new.mkdir()
    (new / "copy-a.txt").write_text(topics[names[0]])
    (new / "copy-b.txt").write_text(topics[names[1]])
    (new / "edited.txt").write_text(topics[names[2]].replace(" the ", " THE ", 3))
    replay = {"id": "replay-1", "text": topics[names[3]]}
    (new / index.REPLAY_SOURCE).write_text(json.dumps(replay) + "\n")
    fresh = sources.read_module_docstrings(sources.stdlib_root(), "textwrap.py")
    fresh += sources.read_module_docstrings(sources.stdlib_root(), "string.py")
    lines = [json.dumps({"id": d["id"], "text": d["text"]}) + "\n" for d in fresh]
    (new / "fresh.jsonl").write_text("".join(lines))
    split = ["data.split.validation_share=0", "data.split.test_share=0"]
    prepare(
        _profile(new, f"data.dedup.index={first}", *split, "data.reference_sample_docs=2"),
        tmp_path / "out",
    )
    manifest = json.loads((tmp_path / "out" / artifacts.MANIFEST).read_text())
    by_reason = manifest["dropped"]["by_reason"]
    assert by_reason.get(f"exact_dedup:{index.COPY}") == 2
    assert by_reason.get(f"near_dedup:{index.NEAR}") == 1
    first_hash = json.loads((first / artifacts.MANIFEST).read_text())["content_hash"]
    assert manifest["dedup_index"]["deduplicated_against"] == first_hash
    drops = pd.read_json(tmp_path / "out" / "dropped.jsonl", lines=True)
    copy = drops[drops["id"] == "copy-a.txt"]
    assert copy["detail"].tolist() == [f"copy of topics/{names[0]}.txt (champion's data)"]
    assert "replay-1" not in set(drops["id"])  # replayed on purpose: kept
    chain = manifest["counts"]["steps"]  # the champion's drops in the step chain too
    assert chain[-2]["dropped"][index.COPY] == 2 and chain[-1]["dropped"][index.NEAR] == 1


def test_near_duplicate_components_in_ray_equal_the_union_find():
    """Min-label propagation over Ray groupbys (the path past ONE_TASK_EDGES; the `prepared`
    fixture's planted near-copy takes the one-task path) gives every dropped key its
    component's smallest key, as the in-process union-find does."""
    import ray

    from flywheel.data import stage, steps

    rng = np.random.default_rng(3)
    keys = [f"{x:016x}{y:016x}" for x, y in rng.integers(0, 2**63, size=(40, 2))]
    # Paths of four (up to three rounds after the first labels; a round is two Ray groupbys,
    # ~3 s here) and a star; which key of a family is smallest is random.
    a = [k for i in range(0, 32, 4) for k in keys[i : i + 3]] + [keys[32]] * 7
    b = [k for i in range(0, 32, 4) for k in keys[i + 1 : i + 4]] + keys[33:40]
    edges = pd.DataFrame({"a": a, "b": b, "jaccard": 0.9})
    with stage.data_context():  # the shuffle prepare runs with (the default took ~50 s here)
        got = stage.near_duplicate_components(
            ray.data.from_pandas(edges).repartition(2), one_task_edges=0
        ).to_pandas()
    assert dict(zip(got["key"], got["kept"], strict=True)) == steps.duplicate_components(edges)
    assert len(got) == 8 * 3 + 7


def test_too_many_rejects_names_worst_source(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ok.txt").write_text(
        "A fine document with enough letters to pass every quality filter here."
    )
    (bad / "junk.jsonl").write_text("{oops\n{nope\n" + json.dumps({"text": 1}) + "\n")
    (bad / "empty.md").write_text("")
    with pytest.raises(
        DataError, match=r"worst source: junk.jsonl \(3 rejected, mostly malformed_json\)"
    ):
        prepare(_profile(bad, "data.max_reject_share=0.5"), tmp_path / "out")
    assert len((tmp_path / "out" / artifacts.REJECTS).read_text().splitlines()) == 4
    assert not (tmp_path / "out" / artifacts.MANIFEST).exists()


def test_hf_dataset_from_disk(tmp_path):
    import datasets

    texts = [t for _, t in _topics()[:40]]
    ds = datasets.Dataset.from_dict(
        {
            "body": [*texts, None],
            "uid": [f"u{i}" for i in range(len(texts) + 1)],
        }
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(tmp_path / "hf")
    stats = prepare(
        _profile(
            tmp_path / "hf",
            "data.source.kind=hf",
            "data.source.text_field=body",
            "data.source.id_field=uid",
            "data.source.timestamp_field=null",
        ),
        tmp_path / "out",
    )
    assert stats.docs_read == 41
    assert stats.rejected == {schema.MISSING_TEXT: 1}
    assert stats.rejected_by_source == {f"hf:{tmp_path / 'hf'}[train]": 1}
    assert stats.docs_kept == 40 - sum(stats.dropped.values())
    test_ids = pd.read_parquet(tmp_path / "out" / artifacts.TEST_TEXT)["id"]
    assert test_ids.str.match(r"u\d+$").all()


def test_cli_prepare_default_out_dir(corpus, state_dir, cli):
    # Through the `cli` fixture: it unpins the shared rich consoles from a capture an earlier
    # test closed (calling main() directly failed with "I/O operation on closed file" when the
    # unit tier ran first in the same session).
    args = ["data", "prepare", "data.source.kind=files", f"data.source.path={corpus}"]
    args += [
        "data.tokenizer.vocab_size=400",
        "data.block_size=32",
        "model.context=32",
        "data.split.test_share=0.1",
    ]
    code, out, err = cli(*args)
    assert code == 0, err
    made = list((state_dir / "datasets").iterdir())
    assert len(made) == 1 and len(made[0].name) == 12
    assert artifacts.read_manifest(made[0])["content_hash"].startswith(made[0].name)
    assert "documents read" in out and "rejected: malformed_json" in out
    assert f"wrote {made[0]}" in out.replace("\n", "")
