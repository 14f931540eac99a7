"""Bad input to the data stage, as a careless user gives it, without Ray.

Issue 10: case 1 (an --out that overlaps the corpus or holds other files is refused before
any work, and nothing of it changes), case 3 (records that are valid JSON but not storable
text become rejects with a reason; a block that fails names itself and the row), the
`.incoming-*` leftovers of case 8, and the path checks of case 6 (a missing tokenizer or
model path is a profile error; a hub id without a network fails in one line, at once).
The cases that need Ray running are in tests/integration/test_bad_input_data_stage.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel import artifacts
from flywheel.config import SourceConfig, load_profile
from flywheel.data import output, schema, sources, steps
from flywheel.data.stage import prepare
from flywheel.errors import ConfigError, DataError

TEXT = "A plain document with enough letters in it to pass every quality filter of the stage."


# ------------------------------------------------------------------------ harness


# `cli` (run `flywheel ARGS` in this process) is in tests/conftest.py.


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root (dirs too) -> sha256 of its bytes ('dir' for a directory)."""
    return {
        str(p.relative_to(root)): (
            "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        )
        for p in sorted(root.rglob("*"))
    }


def incoming(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".incoming-" in p.name]


@pytest.fixture
def corpus(tmp_path) -> Path:
    """An ordinary data layout: train/ and test/ folders, a manifest of the user's own."""
    root = tmp_path / "corp"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        for i in range(3):
            (root / split / f"doc{i}.txt").write_text(f"{TEXT} ({split} {i})")
    (root / "manifest.json").write_text('{"owner": "me"}\n')
    return root


def _profile(*overrides: str):
    return load_profile(None, ["data.source.kind=files", *overrides])


# ------------------------------------------------ case 1: --out and the source


@pytest.mark.parametrize(
    ("source", "out", "why"),
    [
        ("corp/train", "corp", "contains the source"),
        ("corp", "corp", "is the source directory"),
        ("corp", "corp/prepared", "is inside the source"),
        ("corp/train/doc0.txt", "corp/train", "contains the source"),
    ],
)
def test_out_overlapping_the_source_is_refused_before_any_work(
    cli, corpus, state_dir, source, out, why
):
    root = corpus.parent
    before = snapshot(root)
    code, _, err = cli(
        "data",
        "prepare",
        "data.source.kind=files",
        f"data.source.path={root / source}",
        "--out",
        root / out,
    )
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"error: --out {root / out} {why}"), err
    assert f"data.source.path={root / source}" in err[0]
    assert snapshot(root) == before  # byte-identical, nothing added
    assert not state_dir.exists()  # refused before the dataset store was made


def test_out_holding_other_files_is_refused_and_untouched(cli, corpus, state_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "train").mkdir()
    (out / "train" / "data.csv").write_text("a,b\n")
    before = snapshot(tmp_path)
    code, _, err = cli(
        "data", "prepare", "data.source.kind=files", f"data.source.path={corpus}", "--out", out
    )
    assert code == 2
    assert err == [
        f"error: --out {out} holds files this stage did not write (notes.txt, train/data.csv); "
        "name a new or empty directory (an earlier output of `data prepare` may be replaced)"
    ]
    assert snapshot(tmp_path) == before


def test_a_manifest_among_other_files_does_not_make_a_dataset(tmp_path):
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "part-00000.parquet").write_bytes(b"x")
    (out / artifacts.MANIFEST).write_text(json.dumps({"schema_version": 1, "content_hash": "ab"}))
    assert output.kind_of(out) == "dataset"
    (out / "README.md").write_text("mine")
    assert output.kind_of(out) == "foreign"
    with pytest.raises(output.OutputDirError, match=r"did not write \(README.md\)"):
        output.check_target(out, [])
    # A manifest this stage did not write (no content hash) is not one of ours either.
    (out / "README.md").unlink()
    (out / artifacts.MANIFEST).write_text('{"owner": "me"}')
    assert output.kind_of(out) == "foreign"


def test_library_refuses_before_ray_starts(corpus, tmp_path):
    import ray

    before = snapshot(corpus)
    with pytest.raises(output.OutputDirError, match="contains the source") as err:
        prepare(_profile(f"data.source.path={corpus / 'train'}"), corpus)
    assert err.value.exit_code == 2
    assert not ray.is_initialized()
    assert snapshot(corpus) == before and not incoming(tmp_path)


def test_output_in_a_hidden_folder_of_the_source_is_allowed(corpus):
    # The files source skips hidden paths (as it skips .flywheel/), so it never reads it back.
    assert output.overlap(corpus / ".prepared", corpus) is None
    assert output.overlap(corpus.parent / "elsewhere", corpus) is None


# ------------------------------------------- case 1 + 8: the working directory


def _fake_dataset(path: Path, marker: str) -> None:
    (path / "train").mkdir(parents=True)
    (path / "train" / "part-00000.parquet").write_text(marker)
    (path / artifacts.REJECTS).write_text("")
    (path / artifacts.MANIFEST).write_text(
        json.dumps({"schema_version": 1, "content_hash": marker})
    )


def test_publish_replaces_only_an_earlier_output_and_leaves_no_working_dir(tmp_path):
    final = tmp_path / "ds"
    _fake_dataset(final, "old")
    work = output.Workspace(tmp_path, "ds", final=final)
    assert work.path.parent == tmp_path and work.path.name.startswith(".ds.incoming-")
    _fake_dataset(work.path, "new")
    work.publish(final)
    assert json.loads((final / artifacts.MANIFEST).read_text())["content_hash"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no .incoming, no .replaced


def test_publish_into_an_empty_directory(tmp_path):
    final = tmp_path / "ds"
    final.mkdir()
    work = output.Workspace(tmp_path, "ds", final=final)
    _fake_dataset(work.path, "new")
    work.publish(final)
    assert (final / "train" / "part-00000.parquet").read_text() == "new"
    assert not incoming(tmp_path) and not (final / output.OWNER).exists()


def test_a_failed_run_keeps_its_reports_and_the_last_good_dataset(tmp_path):
    final = tmp_path / "ds"
    _fake_dataset(final, "good")
    before = snapshot(final)
    work = output.Workspace(tmp_path, "ds", final=final)
    (work.path / "train").mkdir()
    (work.path / artifacts.REJECTS).write_text('{"id": "a"}\n')
    (work.path / output.DROPPED).write_text('{"id": "b"}\n')
    assert work.reports_dir(final) == tmp_path / "ds.failed"
    kept = work.fail(final, "data: nothing left")
    assert kept == tmp_path / "ds.failed"
    assert snapshot(final) == before  # the good dataset is not the price of a failure
    assert sorted(p.name for p in kept.iterdir()) == sorted(
        [artifacts.REJECTS, output.DROPPED, output.FAILED]
    )
    assert json.loads((kept / output.FAILED).read_text())["error"] == "data: nothing left"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "ds.failed"]
    # The next failure replaces that report folder (it is the stage's own), nothing else.
    again = output.Workspace(tmp_path, "ds", final=final)
    (again.path / artifacts.REJECTS).write_text("")
    assert again.fail(final, "second") == kept
    assert json.loads((kept / output.FAILED).read_text())["error"] == "second"


def test_a_failure_before_any_report_leaves_nothing(tmp_path):
    final = tmp_path / "new" / "deeper" / "ds"
    work = output.Workspace(final.parent, "ds", final=final)
    (work.path / "tokenizer").mkdir()
    assert work.fail(final, "boom") is None
    assert list(tmp_path.iterdir()) == []  # the parents it made are gone too


def test_sweep_removes_only_dead_runs_of_this_stage(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(dead.stdout)
    host = socket.gethostname()

    def workdir(name: str, pid: int, host: str = host, owner: bool = True) -> Path:
        p = tmp_path / name
        p.mkdir()
        if owner:
            (p / output.OWNER).write_text(json.dumps({"host": host, "pid": pid}))
        return p

    crashed = workdir(f".ds.incoming-{dead_pid}-0123abcd", dead_pid)
    running = workdir(f".ds.incoming-{os.getpid()}-0123abcd", os.getpid())
    other_host = workdir(f".ds.incoming-{dead_pid}-4567abcd", dead_pid, host="elsewhere")
    not_ours = workdir(f".ds.incoming-{dead_pid}-89abcdef", dead_pid, owner=False)
    legacy = workdir(f".incoming-{dead_pid}", dead_pid, owner=False)
    assert output.sweep(tmp_path) == [crashed]
    assert running.exists() and other_host.exists() and not_ours.exists() and legacy.exists()
    # The CLI's older `.incoming-<pid>` only in the dataset store, where only it wrote.
    assert output.sweep(tmp_path, store=True) == [legacy]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a read-only directory")
def test_a_mounted_output_under_a_read_only_parent(tmp_path):
    parent = tmp_path / "ro"
    final = parent / "out"
    final.mkdir(parents=True)
    parent.chmod(0o555)
    try:
        work = output.Workspace(parent, "out", final=final)
        assert work.path.parent == final
        _fake_dataset(work.path, "new")
        work.publish(final)
        assert sorted(p.name for p in final.iterdir()) == [
            artifacts.MANIFEST,
            artifacts.REJECTS,
            "train",
        ]
    finally:
        parent.chmod(0o755)


# ---------------------------------------- case 3: records that are not storable text


def _read(tmp_path: Path, name: str, data: bytes, **kw) -> pd.DataFrame:
    (tmp_path / name).write_bytes(data)
    cfg = SourceConfig(kind="files", path=str(tmp_path), **kw)
    return sources.ReadUnits(cfg)(pd.DataFrame(sources.unit_rows([name])))


def _storable(frame: pd.DataFrame) -> None:
    """What Ray does between blocks: the batch must become Arrow without a fallback."""
    pa.Table.from_pandas(frame[list(schema.DOC_COLUMNS)], preserve_index=False)


def test_lone_surrogate_in_text_id_or_timestamp_is_a_reject(tmp_path):
    lines = [
        r'{"text": "\ud800 a lone surrogate in the text"}',
        r'{"id": "x\udfff", "text": "fine text"}',
        r'{"text": "fine text", "ts": "2024-01-01\ud83d"}',
        r'{"text": "a proper pair \ud83d\ude00 is fine"}',
    ]
    out = _read(tmp_path, "s.jsonl", "\n".join(lines).encode(), id_field="id", timestamp_field="ts")
    _storable(out)
    assert out["reason"].tolist() == [schema.INVALID_UNICODE] * 3 + [""]
    assert out["detail"].tolist()[:3] == [
        "'text': lone surrogate U+D800 at character 0",
        "'id': lone surrogate U+DFFF at character 1",
        "'ts': lone surrogate U+D83D at character 10",
    ]
    assert out["id"].tolist() == ["s.jsonl:1", "x\\udfff", "s.jsonl:3", "s.jsonl:4"]
    assert out["text"].iloc[3] == "a proper pair \U0001f600 is fine"


@pytest.mark.parametrize(
    ("record", "reason", "detail"),
    [
        ('{"text": null}', schema.MISSING_TEXT, "no 'text' value"),
        ("{}", schema.MISSING_TEXT, "no 'text' value"),
        ('{"text": NaN}', schema.MISSING_TEXT, "no 'text' value"),
        ('{"text": 42}', schema.NON_STRING_TEXT, "'text' is int"),
        ('{"text": 1e999}', schema.NON_STRING_TEXT, "'text' is float"),
        ('{"text": true}', schema.NON_STRING_TEXT, "'text' is bool"),
        ('{"text": ["a", "b"]}', schema.NON_STRING_TEXT, "'text' is list"),
        ('{"text": {"body": "x"}}', schema.NON_STRING_TEXT, "'text' is dict"),
        ('"just a string"', schema.NOT_AN_OBJECT, "got str"),
        ("[1, 2]", schema.NOT_AN_OBJECT, "got list"),
        ("[" * 100_000 + "]" * 100_000, schema.MALFORMED_JSON, "line 1: nested too deeply"),
        ('{"text": "x"', schema.MALFORMED_JSON, "line 1: Expecting ',' delimiter"),
    ],
)
def test_each_odd_record_is_rejected_with_its_reason(tmp_path, record, reason, detail):
    out = _read(tmp_path, "r.jsonl", record.encode())
    _storable(out)
    assert len(out) == 1
    row = out.iloc[0]
    assert (row.dropped_by, row.reason, row.source) == (schema.READ, reason, "r.jsonl")
    assert row.detail.startswith(detail)


def test_odd_but_valid_encodings_are_read(tmp_path):
    rec = json.dumps({"text": TEXT})
    bom_crlf = ("\ufeff" + rec + "\r\n\r\n" + rec + "\r\n").encode()
    out = _read(tmp_path, "bom.jsonl", bom_crlf)
    assert out["reason"].tolist() == ["", ""] and out["id"].tolist() == [
        "bom.jsonl:1",
        "bom.jsonl:3",
    ]
    utf16 = _read(tmp_path, "u16.jsonl", (rec + "\n" + rec).encode("utf-16"))
    assert utf16["reason"].tolist() == ["", ""] and utf16["text"].iloc[0] == TEXT
    txt16 = _read(tmp_path, "win.txt", ("Caf\u00e9 notes\r\n" + TEXT).encode("utf-16"))
    assert txt16["reason"].tolist() == [""] and txt16["text"].iloc[0].startswith("Caf\u00e9 notes")


def test_one_undecodable_line_rejects_that_line_only(tmp_path):
    data = json.dumps({"text": TEXT}).encode() + b"\n" + b'{"text": "caf\xe9"}\n'
    out = _read(tmp_path, "mixed.jsonl", data)
    assert out["reason"].tolist() == ["", schema.UNDECODABLE]
    assert out["detail"].iloc[1] == "line 2: invalid continuation byte at byte 13"


def test_a_file_name_that_is_not_utf8_is_read_and_named_printably(tmp_path):
    raw = os.fsencode(tmp_path) + b"/caf\xe9.txt"
    with open(raw, "wb") as f:
        f.write(TEXT.encode())
    cfg = SourceConfig(kind="files", path=str(tmp_path))
    units = sources.list_units(cfg)
    out = sources.ReadUnits(cfg)(pd.DataFrame(sources.unit_rows(units)))
    _storable(out)
    assert out["id"].tolist() == ["caf\\xe9.txt"] and out["reason"].tolist() == [""]
    assert out["text"].iloc[0] == TEXT


def test_parquet_with_odd_columns(tmp_path):
    table = pa.table(
        {
            "text": pa.array([b"bytes, not text", None], type=pa.binary()),
            "id": [float("nan"), 2.0],
        }
    )
    pq.write_table(table, tmp_path / "p.parquet")
    cfg = SourceConfig(kind="files", path=str(tmp_path), id_field="id")
    out = sources.ReadUnits(cfg)(pd.DataFrame(sources.unit_rows(["p.parquet"])))
    _storable(out)
    assert out["reason"].tolist() == [schema.NON_STRING_TEXT, schema.MISSING_TEXT]
    assert out["id"].tolist() == ["p.parquet:0", "2.0"]  # NaN id: the row's own position


def test_a_reader_that_raises_rejects_that_file_only(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.txt").write_text(TEXT)
    real = sources.read_text_file

    def flaky(root, relpath):
        if relpath == "a.txt":
            raise MemoryError("too big")
        return real(root, relpath)

    monkeypatch.setattr(sources, "read_text_file", flaky)
    cfg = SourceConfig(kind="files", path=str(tmp_path))
    out = sources.ReadUnits(cfg)(pd.DataFrame(sources.unit_rows(["a.txt", "b.txt"])))
    assert out["reason"].tolist() == [schema.UNREADABLE_FILE, ""]
    assert out["detail"].iloc[0] == "MemoryError: too big"


# -------------------------------------------- case 3: a failing block names the row


def _docs(texts: list) -> pd.DataFrame:
    frame = schema.doc_frame(
        [sources.doc_row(f"d{i}", f"f{i}.jsonl", "x") for i in range(len(texts))]
    )
    frame["text"] = pd.Series(texts, dtype=object)  # what Ray's pickled-object fallback gives
    return frame


def test_a_block_failure_names_the_block_and_the_row():
    batch = _docs([TEXT, 7, TEXT])
    with pytest.raises(schema.StepFailure) as err:
        steps.QualityFilter(load_profile(None).data.filters)(batch)
    msg = str(err.value)
    assert msg.startswith(
        "data step QualityFilter failed on row 'd1' from f1.jsonl (its text is int, not text): "
        "TypeError: "
    )
    assert "\n" not in msg and isinstance(err.value, DataError)


class Picky(schema.Step):
    """A block with a bug that only one text triggers."""

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch["n"] = [len(t) if t != "boom" else int(t) for t in batch["text"]]
        return batch


def test_a_row_that_alone_fails_is_found_by_retrying_row_by_row():
    with pytest.raises(schema.StepFailure) as err:
        Picky()(_docs([TEXT, TEXT, "boom", TEXT]))
    assert str(err.value) == (
        "data step Picky failed on row 'd2' from f2.jsonl: ValueError: invalid literal for "
        "int() with base 10: 'boom'"
    )
    assert Picky.__name__ == "Picky" and len(Picky()(_docs([TEXT]))) == 1


def test_a_keyed_block_failure_names_the_group():
    batch = pd.DataFrame({"id": ["a", "b"], "source": ["s", "s"], "reason": ["", ""]})
    with pytest.raises(
        schema.StepFailure,
        match=r"ExactDedup failed on a group of 2 rows \(first: row 'a' from s\): KeyError",
    ):
        steps.ExactDedup()(batch)


def test_the_message_survives_rays_wrapping():
    # Ray hands the driver its own exception whose text holds the worker's traceback.
    text = (
        'ray::MapBatches(QualityFilter)() (pid=1, ip=1.2.3.4)\n  File "x.py", line 3\n'
        "flywheel.data.schema.StepFailure: data step QualityFilter failed on row 'd1' from "
        "f.jsonl: AttributeError: boom\n\nThe above exception was the direct cause of ...\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block."
    )
    assert schema.step_failure_message(RuntimeError(text)) == (
        "data step QualityFilter failed on row 'd1' from f.jsonl: AttributeError: boom"
    )
    assert schema.step_failure_message(RuntimeError("unrelated")) is None


# ---------------------------------------- case 6: base paths and hub ids, at load


@pytest.mark.parametrize("field", ["data.tokenizer.base", "model.base"])
@pytest.mark.parametrize(
    "value", ["./nope", "../nope", "/nowhere/tok", "~/nope-x1", "my tok", "a--b/c"]
)
def test_a_missing_base_path_is_a_profile_error(field, value):
    with pytest.raises(ConfigError) as err:
        load_profile(None, [f"{field}={value}"])
    assert f"{field}: path not found: {value}" in str(err.value)
    assert "local.yaml" in str(err.value)  # names the file


@pytest.mark.parametrize("value", ["gpt2", "openai-community/gpt2", "org/name.v2"])
def test_hub_ids_and_existing_paths_load(value, tmp_path):
    assert load_profile(None, [f"data.tokenizer.base={value}"]).data.tokenizer.base == value
    assert load_profile(None, [f"model.base={tmp_path}"]).model.base == str(tmp_path)


def test_cli_missing_tokenizer_path_is_exit_2_one_line_nothing_created(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("data", "prepare", "data.tokenizer.base=./tok")
    assert code == 2
    assert len(err) == 1 and err[0].endswith(
        f"data.tokenizer.base: path not found: ./tok (relative to {tmp_path}); "
        "name an existing directory or a hub id"
    )
    assert list(tmp_path.iterdir()) == []


def test_hub_id_without_network_fails_at_once_in_one_line(cli, corpus, state_dir):
    # The test session runs with HF_HUB_OFFLINE=1 (tests/conftest.py), as a machine without
    # a network should: no retries, and the stage stops before Ray starts or reads anything.
    import ray

    t0 = time.perf_counter()
    code, _, err = cli(
        "data",
        "prepare",
        "data.source.kind=files",
        f"data.source.path={corpus}",
        "data.tokenizer.base=flywheel-test/no-such-tokenizer",
    )
    assert code == 1
    assert [e for e in err if not e.startswith("state:")] == [
        "error: data.tokenizer.base: cannot load tokenizer 'flywheel-test/no-such-tokenizer': "
        "not a local path, and not in the Hugging Face cache while HF_HUB_OFFLINE is set; "
        "download it first (`hf download flywheel-test/no-such-tokenizer`) or name a local "
        "directory"
    ]
    assert time.perf_counter() - t0 < 20  # was ~25 s of retries before any failure
    assert not ray.is_initialized()
    assert not incoming(state_dir.parent)


def test_hub_probe_when_online_but_unreachable(monkeypatch):
    # HF_HUB_OFFLINE unset, no route to the hub (an endpoint nothing listens on): one bounded
    # request, then one line naming the endpoint.
    from flywheel.data import hub

    monkeypatch.setattr("huggingface_hub.is_offline_mode", lambda: False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    t0 = time.perf_counter()
    can = hub.access("flywheel-test/no-such-model")
    assert time.perf_counter() - t0 < hub.PROBE_TIMEOUT_S + 2
    assert can.problem and can.problem.startswith("not a local path; the Hugging Face Hub")
    assert "unreachable" in can.problem and "no copy is cached" in can.problem
