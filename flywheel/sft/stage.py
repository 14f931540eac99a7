"""The data stage for `data.format` instruction and chat: source -> SFT Dataset artifact.

    read records > split (by the turns) > tokenizer > render + mask > write + manifest

`flywheel.data.stage.prepare` hands these formats here. Records come from the same sources
as raw text (`files`: JSONL / parquet, `hf`: a datasets dataset; `pydocs`: the instruction
set of `flywheel.sft.demo`). Unlike raw text there is no dedup or packing (one record, one
sample: see `flywheel.sft.render` on why no packing) and the work runs in this process:
instruction sets are thousands of records, rendered in seconds, where a Ray start would
cost more than the work.

The tokenizer: `data.tokenizer.base` when set (the champion's, on a warm start); else the
base model's (`model.base`, a `models:/` URI resolved through the registry), since a
fine-tune must see its base's token ids; else byte-level BPE trained on the train split's
turns, as for raw text. The chat template the samples were rendered with is saved with the
tokenizer, so evaluation and serving prompt the model exactly as it was trained.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from flywheel import artifacts
from flywheel import progress as progress_events
from flywheel.config import DataConfig, Profile
from flywheel.data.stats import DataStats
from flywheel.errors import DataError
from flywheel.progress import DataStepDone, DataStepStarted, Progress
from flywheel.sft import prepare as P
from flywheel.sft.records import Conversation, Reject, parse_records
from flywheel.sft.render import resolve_template

# Part of the content hash: bump when rendering or splitting changes what is written.
SFT_PIPELINE_VERSION = 1
# Reasons a source row is not a record at all (as the raw-text stage names them).
UNDECODABLE = "undecodable_bytes"
MALFORMED_JSON = "malformed_json"
EMPTY_FILE = "empty_file"
UNREADABLE_FILE = "unreadable_file"
UNSUPPORTED_FILE = "unsupported_file_type"
RECORD_SUFFIXES = (".jsonl", ".parquet")
# ChatML's turn markers, added as single tokens to a BPE trained here.
CHATML_MARKERS = ["<|im_start|>", "<|im_end|>"]


class SftDataStats(DataStats):
    """DataStats of an SFT dataset: a document is a record, a sequence a sample."""

    format: str = "instruction"
    response_tokens: dict[str, int] = Field(default_factory=dict, description="split -> tokens")
    padding_share: float = Field(0.0, description="train split, micro-batch 8, file order")
    longest: int = 0

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        for split in artifacts.SPLITS:
            out[f"response_tokens_{split}"] = float(self.response_tokens.get(split, 0))
        out["padding_share"] = round(self.padding_share, 4)
        return out

    def rows(self) -> list[tuple[str, object]]:
        rows = super().rows()
        at = next(i for i, (what, _) in enumerate(rows) if what == "tokenizer")
        extra: list[tuple[str, object]] = [
            (f"  {s}: response tokens", f"{self.response_tokens.get(s, 0):,}")
            for s in artifacts.SPLITS
        ]
        extra.append(
            (f"padding at micro-batch {P.PADDING_MICRO_BATCH}", f"{self.padding_share:.0%}")
        )
        return rows[:at] + extra + rows[at:]


# ------------------------------------------------------------------------ read


@dataclass
class RecordSet:
    records: list[Any] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # id -> what to open
    rejects: list[Reject] = field(default_factory=list)  # rows that are not records
    digest: Any = field(default_factory=hashlib.sha256)  # of everything read, in order

    @property
    def read(self) -> int:
        return len(self.records) + len(self.rejects)

    def add(self, id_: str, source: str, record: Any) -> None:
        self.records.append(record)
        self.ids.append(id_)
        self.sources[id_] = source
        self.digest.update(json.dumps([id_, record], sort_keys=True, default=str).encode())

    def reject(self, id_: str, source: str, reason: str, detail: str) -> None:
        self.rejects.append(Reject(id_, reason, detail))
        self.sources[id_] = source
        self.digest.update(json.dumps([id_, reason, detail]).encode())


def _jsonl(path: Path, name: str, out: RecordSet) -> None:
    data = path.read_bytes()
    if not data.strip():
        out.reject(name, name, EMPTY_FILE, f"{len(data)} bytes")
        return
    before = out.read
    for lineno, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        if not raw.strip():
            continue
        id_ = f"{name}:{lineno}"
        try:
            out.add(id_, name, json.loads(raw.decode("utf-8")))
        except UnicodeDecodeError as exc:
            out.reject(id_, name, UNDECODABLE, f"line {lineno}: {exc.reason} at byte {exc.start}")
        except (json.JSONDecodeError, RecursionError) as exc:
            detail = exc if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            out.reject(id_, name, MALFORMED_JSON, f"line {lineno}: {detail}")
    if out.read == before:  # a byte-order mark and blank lines: an empty file, said so
        out.reject(name, name, EMPTY_FILE, f"{len(data)} bytes, no records")


def _parquet(path: Path, name: str, out: RecordSet) -> None:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        out.reject(name, name, UNREADABLE_FILE, f"{type(exc).__name__}: {exc}"[:300])
        return
    if not rows:
        out.reject(name, name, EMPTY_FILE, "0 rows")
    for i, row in enumerate(rows):
        out.add(f"{name}:{i}", name, row)


def _pydocs(cfg: DataConfig, out: RecordSet) -> None:
    from flywheel.sft import demo

    c = cfg.columns
    for i, r in enumerate(demo.instruction_records()):
        if cfg.format == "instruction":
            record: dict[str, Any] = {c.prompt: r["prompt"], c.response: r["response"]}
        else:  # the same exchanges as two-turn chats, in the profile's column names
            turns = [("user", r["prompt"]), ("assistant", r["response"])]
            record = {c.messages: [{c.role: role, c.content: text} for role, text in turns]}
        out.add(f"pydocs:{i}", "pydocs (flywheel.sft.demo)", record)


def read_records(cfg: DataConfig) -> RecordSet:
    """Every record of the source, in a fixed order, and the rows that are not records."""
    from flywheel.data import sources

    src, out = cfg.source, RecordSet()
    if src.kind == "pydocs":
        _pydocs(cfg, out)
    elif src.kind == "hf":
        table = sources.load_hf_table(src)
        name = sources.hf_source_name(src)
        for i, row in enumerate(table.drop_columns(["__row"]).to_pylist()):
            out.add(f"{name}:{i}", name, row)
    else:
        root = sources.files_root(src)
        for unit in sources.list_units(src):
            name = sources.printable(unit)
            suffix = Path(unit).suffix.lower()
            try:
                if suffix == ".jsonl":
                    _jsonl(root / unit, name, out)
                elif suffix == ".parquet":
                    _parquet(root / unit, name, out)
                else:
                    why = f"'{suffix}' is not one of {', '.join(RECORD_SUFFIXES)} ({cfg.format})"
                    out.reject(name, name, UNSUPPORTED_FILE, why)
            except OSError as exc:
                out.reject(name, name, UNREADABLE_FILE, str(exc))
    if src.max_docs:  # the first max_docs records, in the fixed order above
        out.records, out.ids = out.records[: src.max_docs], out.ids[: src.max_docs]
    return out


# ------------------------------------------------------------------- tokenizer


def tokenizer_source(profile: Profile) -> tuple[str, str] | None:
    """(field, where) of the tokenizer to load, or None to train one."""
    if profile.data.tokenizer.base:
        return "data.tokenizer.base", profile.data.tokenizer.base
    if profile.model.base:
        from flywheel.registry import resolve_model_source

        return "model.base", resolve_model_source(profile.model.base, profile)
    return None


def train_tokenizer(cfg: DataConfig, train: list[Conversation]):
    """Byte-level BPE on the train split's turns (+ ChatML's markers as single tokens)."""
    from flywheel.data import tokenizer

    if not train:
        raise DataError("data.split: the train split is empty; nothing to train a tokenizer on")
    tok = tokenizer.train_bpe((t.content for c in train for t in c.turns), cfg.tokenizer)
    tok.add_special_tokens({"additional_special_tokens": CHATML_MARKERS})
    return tok


def tokenizer_digest(tok: Any, template: str) -> str:
    h = hashlib.sha256(tok.backend_tokenizer.to_str().encode())
    h.update(b"\x1f" + template.encode())
    return h.hexdigest()


def content_hash(cfg: DataConfig, inputs: str, tok_digest: str) -> str:
    payload = {
        "schema_version": artifacts.SCHEMA_VERSION,
        "sft_pipeline_version": SFT_PIPELINE_VERSION,
        # As for raw text: where the source lies is not content, nor how work is batched.
        "data": cfg.model_dump(mode="json", exclude={"batch_size": True, "source": {"path"}}),
        "inputs": inputs,
        "tokenizer": tok_digest,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------- stage


def prepare_records(
    profile: Profile,
    out_dir: Path,
    progress: Progress | None = None,
    *,
    store: bool = False,
    label: str | None = None,
) -> SftDataStats:
    """`flywheel.data.stage.prepare` for instruction and chat data (same contract: the
    dataset is built beside the target and moved into place; a failure keeps the rejects)."""
    from flywheel.data import output

    cfg = profile.data
    out_dir = Path(out_dir)
    output.check_dataset_output(cfg, out_dir, store, label)
    work = (
        output.Workspace(out_dir, "dataset", store=True)
        if store
        else output.Workspace(out_dir.parent, out_dir.name, final=out_dir)
    )
    run = _SftRun(profile, work.path, progress or progress_events.ignore)
    try:
        stats = run()
    except BaseException as exc:
        target = out_dir / run.content_hash[:12] if store and run.content_hash else None
        try:
            kept = work.fail(out_dir if not store else target, str(exc))
        except Exception:
            work.discard()
            kept = None
        if kept is not None and isinstance(exc, DataError):
            # The messages name the working directory, which is gone: name where it went.
            text = str(exc).replace(str(work.path), str(kept))
            if str(kept) not in text:
                text += f"; every rejected record, with its reason: {kept / artifacts.REJECTS}"
            exc.args = (text,)
        raise
    target = out_dir / stats.content_hash[:12] if store else out_dir
    work.publish(target)
    stats.out_dir = str(target)
    return stats


class _SftRun:
    def __init__(self, profile: Profile, work: Path, report: Progress):
        self.profile, self.cfg, self.work, self.report = profile, profile.data, work, report
        self.content_hash: str | None = None
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[dict]:
        info: dict = {}
        self.report(DataStepStarted(name))
        t0 = time.perf_counter()
        yield info
        self.timings[name] = round(time.perf_counter() - t0, 3)
        self.report(DataStepDone(name, self.timings[name], info))

    def __call__(self) -> SftDataStats:
        from flywheel.data import tokenizer as T

        cfg, out = self.cfg, self.work
        if cfg.format == "text":
            raise DataError("data.format is 'text': the SFT stage reads instruction or chat")
        t_start = time.perf_counter()
        # Before reading: a base that cannot load fails in a second, naming its field.
        found = tokenizer_source(self.profile)
        base = T.load_base(found[1], field=found[0]) if found else None
        with self.step("read") as info:
            rs = read_records(cfg)
            if not rs.records and not rs.rejects:
                raise DataError(f"data.source: no {cfg.format} records found")
            convs, bad = parse_records(rs.records, cfg.format, cfg.columns, rs.ids)
            rejects = rs.rejects + bad
            info.update(records=rs.read, rejected=len(rejects))
        with self.step("split") as info:
            by_split = P.split_conversations(convs, cfg.split)
            info.update(records={s: len(v) for s, v in by_split.items()})
        with self.step("tokenizer") as info:
            tok = base if base is not None else train_tokenizer(cfg, by_split["train"])
            template, template_name = resolve_template(tok, cfg.chat_template)
            if not getattr(tok, "chat_template", None):
                # Saved with the tokenizer: evaluation and serving render prompts as here.
                tok.chat_template = template
            tok_info = T.save(tok, out / artifacts.TOKENIZER_DIR)
            tok_digest = tokenizer_digest(tok, template)
            self.content_hash = content_hash(cfg, rs.digest.hexdigest(), tok_digest)
            info.update(vocab_size=tok_info["vocab_size"], template=template_name)
        with self.step("render") as info:
            s = P.write_sft(rs.read, by_split, rejects, cfg, tok, out, rs.sources)
            info.update(samples=s.samples, rejected=sum(s.rejects.values()))
        with self.step("write") as info:
            by_source = Counter(rs.sources.get(r, "") for r in _reject_ids(out))
            stats = SftDataStats(
                format=cfg.format,
                content_hash=self.content_hash,
                out_dir=str(out),
                docs_read=rs.read,
                docs_kept=sum(s.samples.values()),
                rejected=s.rejects,
                rejected_by_source=dict(sorted(by_source.items())),
                docs=s.samples,
                tokens=s.tokens,
                sequences=s.samples,
                tail_tokens={k: 0 for k in artifacts.SPLITS},
                block_size=cfg.block_size,
                vocab_size=tok_info["vocab_size"],
                tokenizer_trained=base is None,
                response_tokens=s.response_tokens,
                padding_share=s.padding_share,
                longest=s.longest,
            )
            manifest = _manifest(self.profile, stats, tok_info, template_name, found)
            # Written last: a directory with a manifest is a complete dataset.
            artifacts.DatasetManifest.model_validate(manifest).write(out)
            info.update(samples=stats.sequences, padding_share=round(s.padding_share, 3))
        stats.seconds = round(time.perf_counter() - t_start, 3)
        stats.timings = self.timings
        return stats


def _reject_ids(out: Path) -> list[str]:
    lines = (out / artifacts.REJECTS).read_text().splitlines()
    return [json.loads(line)["id"] for line in lines if line.strip()]


def _manifest(
    profile: Profile,
    stats: SftDataStats,
    tok_info: dict,
    template: str,
    found: tuple[str, str] | None,
) -> dict:
    cfg = profile.data
    splits = {
        s: {
            "docs": stats.docs[s],
            "tokens": stats.tokens[s],
            "sequences": stats.sequences[s],
            "response_tokens": stats.response_tokens[s],
            "tail_tokens": 0,
            "files": [f"{s}/{P.PART}"],
        }
        for s in artifacts.SPLITS
    }
    return artifacts.dataset_manifest(
        cfg,
        stats,
        pipeline_version=SFT_PIPELINE_VERSION,
        splits=splits,
        tok_info=tok_info,
        tokenizer={
            "base": found[1] if found else None,
            "base_field": found[0] if found else None,
        },
        # No raw-text held-out documents: the held-out records are the test split's samples.
        text={"test": "", "test_docs": 0, "reference": "", "reference_docs": 0},
        steps=[],
        format=cfg.format,
        sft={
            "label_column": P.LABEL_COLUMN,
            "samples": stats.sequences,
            "tokens": stats.tokens,
            "response_tokens": stats.response_tokens,
            "padding_share": stats.padding_share,
            "padding_micro_batch": P.PADDING_MICRO_BATCH,
            "longest": stats.longest,
            "template": template,
            "train_on_inputs": cfg.train_on_inputs,
            "packing": False,
        },
    )
