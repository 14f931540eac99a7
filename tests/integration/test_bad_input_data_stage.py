"""Bad input to the data stage with local Ray running (issue 10, cases 1, 3, 5, 8).

A corpus with one record of each odd kind is prepared without a crash, each odd record in
rejects.jsonl with its reason; a block that fails inside Ray is reported in one line naming
the block and the row; a corpus the filters empty fails saying why and where the reasons
are; an earlier dataset is replaced only by a complete new one; and no run leaves a
working directory behind. The refusals that need no Ray are in
tests/unit/test_bad_input_data.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from flywheel import artifacts
from flywheel.config import RayConfig, load_profile
from flywheel.data import output, prepare, schema
from flywheel.errors import DataError

pytestmark = pytest.mark.integration

BLOCK = 16


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    from flywheel.runtime import ray_session

    with ray_session(RayConfig(mode="local", num_cpus=2)):
        yield


def _topics(n: int = 40) -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:n]]


def _profile(corpus: Path, *extra: str):
    return load_profile(
        None,
        [
            "data.source.kind=files",
            f"data.source.path={corpus}",
            "data.tokenizer.vocab_size=300",
            f"data.block_size={BLOCK}",
            f"model.context={BLOCK}",
            "data.split.validation_share=0.2",
            "data.split.test_share=0.2",
            "data.reference_sample_docs=5",
            "data.dedup.near=false",
            "ray.num_cpus=2",
            *extra,
        ],
    )


def incoming(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".incoming-" in p.name or ".replaced-" in p.name]


ODD = {
    # record line -> expected reason (None: read as a document)
    r'{"text": "\ud800 starts with a lone surrogate, valid JSON all the same"}': schema.INVALID_UNICODE,
    r'{"text": "a surrogate pair \ud83d\ude00 is one character, and fine to keep here"}': None,
    '{"text": null}': schema.MISSING_TEXT,
    '{"text": 12345}': schema.NON_STRING_TEXT,
    '{"text": {"nested": "object"}}': schema.NON_STRING_TEXT,
    '{"text": ["a", "list"]}': schema.NON_STRING_TEXT,
    '["not", "an", "object"]': schema.NOT_AN_OBJECT,
}


@pytest.fixture(scope="module")
def odd_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("odd")
    good = [json.dumps({"text": t}) for t in _topics()]
    # A UTF-8 byte-order mark and CRLF line ends, as Windows tools write them.
    body = "\r\n".join([*good[:20], *ODD]) + "\r\n"
    (root / "records.jsonl").write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8", "surrogatepass"))
    (root / "more.jsonl").write_bytes(
        "\n".join(good[20:]).encode() + b'\n{"text": "caf\xe9 in latin-1"}\n'
    )
    (root / "windows.txt").write_bytes(_topics(41)[-1].encode("utf-16"))
    with open(os.fsencode(root) + b"/r\xe9sum\xe9.txt", "wb") as f:  # not a UTF-8 name
        f.write(_topics(42)[-1].encode())
    return root


def test_odd_records_are_rejects_not_a_crash(odd_corpus, tmp_path):
    out = tmp_path / "ds"
    stats = prepare(_profile(odd_corpus), out)
    rejects = [json.loads(line) for line in (out / artifacts.REJECTS).read_text().splitlines()]
    got = {(r["source"], r["reason"]) for r in rejects}
    assert got == {("records.jsonl", reason) for reason in ODD.values() if reason} | {
        ("more.jsonl", schema.UNDECODABLE)
    }
    surrogate = next(r for r in rejects if r["reason"] == schema.INVALID_UNICODE)
    assert surrogate["id"] == "records.jsonl:21"  # line 21, after 20 good records
    assert surrogate["detail"] == "'text': lone surrogate U+D800 at character 0"
    manifest = artifacts.read_manifest(out)
    assert manifest["rejects"]["by_reason"] == stats.rejected
    assert stats.rejected[schema.INVALID_UNICODE] == 1 and stats.rejected_total == len(rejects) == 7
    # Read as documents: the BOM-led first record, the surrogate pair, the UTF-16 file and
    # the file whose name is not UTF-8 (named printably, as in every report).
    assert stats.docs_read - stats.rejected_total == 20 + 1 + 20 + 1 + 1
    assert not any("\\x" in r["id"] for r in rejects)
    assert not incoming(tmp_path)


def test_a_block_failing_inside_ray_names_block_and_row():
    import ray

    from flywheel.data import steps

    rows = [{"id": f"f.jsonl:{i}", "source": "f.jsonl", "text": f"text {i}"} for i in range(4)]

    def poison(batch: pd.DataFrame) -> pd.DataFrame:
        # What a reader bug would pass on: one text that is not a string. Ray then stores
        # the whole column as pickled objects, as it did for a lone surrogate.
        batch["text"] = batch["text"].astype(object)
        batch.loc[batch["id"] == "f.jsonl:2", "text"] = 7
        return batch

    ds = (
        ray.data.from_pandas(schema.doc_frame(rows))
        .map_batches(poison, batch_format="pandas")
        .map_batches(steps.QualityFilter(load_profile(None).data.filters), batch_format="pandas")
    )
    with pytest.raises(Exception) as err:  # Ray's own exception class, holding ours as text
        ds.materialize()
    assert schema.step_failure_message(err.value) == (
        "data step QualityFilter failed on row 'f.jsonl:2' from f.jsonl (its text is int, "
        "not text): AttributeError: Can only use .str accessor with string values!"
    )


def test_everything_filtered_says_why_and_where(tmp_path, state_dir, capsys):
    from flywheel.cli.common import console, err_console
    from flywheel.cli.main import main

    corpus = tmp_path / "short"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text(
        "\n".join(json.dumps({"text": t}) for t in ["tiny", "small", "wee"]) + "\n{oops\n"
    )
    console.file = err_console.file = None
    with pytest.raises(SystemExit) as exit_:
        main(["data", "prepare", "data.source.kind=files", f"data.source.path={corpus}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 1
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and len(err) <= 2, err  # and at most the "state: ... (new)" line
    store = state_dir / "datasets"
    (kept,) = store.iterdir()  # datasets/<hash>: the reports, no dataset, no working dir
    assert errors[0] == (
        "error: data.source: no document survived reading and filtering (4 rows read; "
        "quality too_short 3, read malformed_json 1); check data.filters and the source; "
        f"every rejected and dropped row, with its reason: {kept / artifacts.REJECTS}, "
        f"{kept / output.DROPPED}"
    )
    dropped = pd.read_json(kept / output.DROPPED, lines=True)
    assert dropped["reason"].tolist() == ["too_short"] * 3
    assert dropped["detail"].tolist() == ["4 chars", "5 chars", "3 chars"]
    assert [
        json.loads(x)["reason"] for x in (kept / artifacts.REJECTS).read_text().splitlines()
    ] == [schema.MALFORMED_JSON]
    assert json.loads((kept / output.FAILED).read_text())["stage"] == "prepare-data"
    assert not (kept / artifacts.MANIFEST).exists() and not incoming(tmp_path)


def test_an_earlier_dataset_is_replaced_only_by_a_complete_one(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(_topics(30)):
        (corpus / f"{i:02d}.txt").write_text(text)
    out = tmp_path / "ds"
    first = prepare(_profile(corpus), out)
    shards = {p.name: p.read_bytes() for p in (out / "train").iterdir()}
    # A run that fails keeps the last good dataset intact and its reports beside it.
    with pytest.raises(DataError, match="no document survived") as err:
        prepare(_profile(corpus, "data.filters.min_chars=199999"), out)
    assert str(tmp_path / "ds.failed" / output.DROPPED) in str(err.value)
    assert artifacts.read_manifest(out)["content_hash"] == first.content_hash
    assert {p.name: p.read_bytes() for p in (out / "train").iterdir()} == shards
    # The same inputs again: replaced by an identical dataset (same bytes, same names).
    again = prepare(_profile(corpus), out)
    assert again.content_hash == first.content_hash
    assert {p.name: p.read_bytes() for p in (out / "train").iterdir()} == shards
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "ds", "ds.failed"]
    assert not incoming(tmp_path)
