"""The registry adapter on MLflow's SQLite store (the local default): registration with the
transformers flavour, alias moves and their history, refusals, failure without a
half-promotion, the move lock, an unreachable server, and the CLI.

One module-scoped store holds three registered versions; a test that moves aliases works
on its own copy of the database, so tests stay independent and the flavour is paid once.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import pytest
from fixtures_models import build_eval_dataset, fresh_model, save_model, train_tokenizer

from flywheel.config import Profile
from flywheel.errors import RegistryError
from flywheel.registry import (
    CHAMPION,
    LOCK_SUFFIX,
    NotFoundError,
    Registry,
    lineage_tags,
    parse_model_uri,
)


def _profile(state_dir, **registry) -> Profile:
    return Profile(state_dir=str(state_dir), registry={"retry_backoff_s": 0.01, **registry})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(state dir, model dir) with versions 1..3 registered, no champion yet."""
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path_factory.mktemp("registry")
    from fixtures_models import split_paragraphs

    tok = train_tokenizer(split_paragraphs()[0])
    model_dir = save_model(fresh_model(tok), tok, root / "model", {"train": {"lr": 0.01}})
    reg = Registry(_profile(root / "state"))
    for i in (1, 2, 3):
        version = reg.register_candidate(
            model_dir,
            tags=lineage_tags(
                data_hash="hash-abc",
                training_run_id=f"train-{i}",
                pipeline_run_id=f"pipe-{i}",
                trigger_reason="test",
            ),
            model_card=f"# card {i}",
        )
        assert version == str(i)
    yield root / "state", model_dir
    mp.undo()


@pytest.fixture
def reg(base, tmp_path, monkeypatch):
    """A registry on a private copy of the base store (artifacts stay shared, read-only)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    state = tmp_path / "state"
    (state / "mlflow").mkdir(parents=True)
    shutil.copy2(base[0] / "mlflow" / "mlflow.db", state / "mlflow" / "mlflow.db")
    return Registry(_profile(state))


def test_registered_versions_carry_lineage_alias_card_and_flavour(base):
    reg = Registry(_profile(base[0]))
    versions = reg.versions()
    assert [v.version for v in versions] == ["1", "2", "3"]
    v3 = versions[-1]
    assert v3.aliases == ["challenger"]  # the alias follows the newest candidate
    assert v3.tags["data_manifest_hash"] == "hash-abc"
    assert v3.tags["training_run_id"] == "train-3"
    assert v3.tags["pipeline_run_id"] == "pipe-3"
    assert v3.tags["trigger_reason"] == "test"
    assert v3.tags["flywheel.flavor"] == "pyfunc"
    assert v3.description == "# card 3"
    assert reg.champion() is None and reg.champion_uri() is None and reg.history() == []
    # What it was trained as: a full fine-tune of a fresh model, every parameter trained.
    from transformers import AutoModelForCausalLM

    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base[1]).parameters())
    assert v3.tags["flywheel.method"] == "full" and v3.tags["flywheel.base_model"] == "fresh"
    assert v3.tags["flywheel.params.trainable"] == v3.tags["flywheel.params.total"] == str(n)
    assert v3.tags["flywheel.data_format"] == "text" and "flywheel.adapter" not in v3.tags
    # Logged as flywheel's pyfunc (what `mlflow models serve` runs) with the card, and a
    # signature whose params are the generation knobs serving honours.
    client = reg._client
    files = {f.path for f in client.list_artifacts(v3.run_id, "model")}
    assert {"model/MLmodel", "model/artifacts", "model/serving_model.py"} <= files
    assert "model/model_card.md" in files
    mlmodel = client.download_artifacts(v3.run_id, "model/MLmodel", str(base[0].parent / "dl"))
    from mlflow.models import Model

    meta = Model.load(mlmodel)
    assert "python_function" in meta.flavors
    params = {p.name: p.default for p in meta.signature.params.params}
    # A 64-position model serves at most 32 new tokens by default; greedy by default.
    assert params == {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0}
    assert meta.signature.inputs.input_names() == ["prompt"]


def _lora_model_dir(root: Path, base_model_dir: Path) -> tuple[Path, object]:
    """A LoRA run's output layout: the merged model's files, its adapter in adapter/."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel.config import LoraConfig
    from flywheel.sft.lora import apply_lora, save_adapter_and_merged

    peft = apply_lora(
        AutoModelForCausalLM.from_pretrained(base_model_dir), LoraConfig(rank=4, alpha=8)
    )
    torch.manual_seed(0)
    with torch.no_grad():  # as if trained: LoRA starts with B = 0, a no-op update
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    saved = save_adapter_and_merged(peft, root / "work", merged_name="hf")
    out = root / "lora-model"
    shutil.copytree(saved.merged, out)
    shutil.copytree(saved.adapter, out / "adapter")
    AutoTokenizer.from_pretrained(base_model_dir).save_pretrained(out)
    info = {
        "model": {"base": "models:/flywheel-lm@champion"},
        "train": {"method": "lora"},
        # model.base as resolved for training: the registry cache's directory.
        "summary": {"model_source": {"kind": "base", "path": str(base_model_dir)}},
    }
    (out / "flywheel_training.json").write_text(json.dumps(info))
    return out, saved


def test_a_lora_version_is_the_merged_model_with_its_adapter_and_counts(reg, base, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel.sft.lora import load_adapter

    model_dir, saved = _lora_model_dir(tmp_path, base[1])
    version = reg.register_candidate(
        model_dir, tags=lineage_tags(data_hash="h"), model_card="# lora", data_format="chat"
    )
    tags = reg.version(version).tags
    assert tags["flywheel.method"] == "lora"
    assert tags["flywheel.base_model"] == "models:/flywheel-lm@champion"
    # The counts PEFT's model had while training (adapter trainable, base + adapter total).
    assert int(tags["flywheel.params.trainable"]) == saved.params.trainable
    assert int(tags["flywheel.params.total"]) == saved.params.total
    assert 0 < saved.params.trainable < saved.params.total
    lora = json.loads(tags["flywheel.lora"])
    assert lora["r"] == 4 and lora["lora_alpha"] == 8
    assert lora["target_modules"] == ["c_attn", "c_fc", "c_proj"]  # auto for gpt2
    assert tags["flywheel.adapter"].endswith("/adapter") and tags["flywheel.data_format"] == "chat"
    # The version serves the merged weights (no adapter inside) with a chat tokenizer.
    merged = reg.download(version)
    assert not (merged / "adapter").exists()
    assert AutoTokenizer.from_pretrained(merged).chat_template  # chatml, stored for serving
    # The adapter comes back on its own and loads onto the base it was trained on.
    adapter = reg.download_adapter(version)
    assert adapter.name == f"v{version}-adapter" and (adapter / "adapter_config.json").is_file()
    load_adapter(AutoModelForCausalLM.from_pretrained(base[1]), adapter)
    with pytest.raises(NotFoundError, match=r"version 1 has no adapter \(train.method full\)"):
        reg.download_adapter("1")
    # An SFT version takes chat turns and carries a chat-format input example.
    from mlflow.models import Model

    run_id = reg.version(version).run_id
    mlmodel = reg._client.download_artifacts(run_id, "model/MLmodel", str(tmp_path / "dl"))
    meta = Model.load(mlmodel)
    assert meta.signature.inputs.input_names() == ["messages"]
    example = json.loads(
        Path(
            reg._client.download_artifacts(
                run_id, "model/serving_input_example.json", str(tmp_path / "dl")
            )
        ).read_text()
    )
    assert example["dataframe_split"]["data"][0][0][0]["role"] == "user"
    assert example["params"]["max_new_tokens"] == 32


def test_a_lora_runs_exported_model_directory_keeps_its_adapter(base, tmp_path):
    """train.run._export (the Model artifact of the train step): the merged weights at the
    top, the adapter in adapter/, the model source in the summary: what registration reads."""
    from transformers import AutoTokenizer

    from flywheel.artifacts import TOKENIZER_DIR
    from flywheel.registry.lineage import training_tags
    from flywheel.train.run import _export

    _, saved = _lora_model_dir(tmp_path, base[1])
    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved.merged, ckpt / "hf")
    shutil.copytree(saved.adapter, ckpt / "adapter")
    AutoTokenizer.from_pretrained(base[1]).save_pretrained(tmp_path / "ds" / TOKENIZER_DIR)
    profile = Profile(state_dir=str(tmp_path / "state"), train={"method": "lora"})
    source = {"kind": "init_from", "path": "/cache/flywheel-lm/v2"}
    out = tmp_path / "out"
    _export(ckpt, tmp_path / "ds", out, {"model_source": source}, profile)
    assert (out / "config.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    tags = training_tags(out)
    assert tags["flywheel.method"] == "lora" and tags["flywheel.base_model"] == source["path"]
    assert int(tags["flywheel.params.trainable"]) == saved.params.trainable


def test_warm_start_from_merged_weights_or_from_the_base_plus_the_champions_adapter(
    reg, base, tmp_path
):
    import torch
    from transformers import AutoModelForCausalLM

    from flywheel.errors import ConfigError
    from flywheel.profiles import champion_model_dir

    model_dir, _ = _lora_model_dir(tmp_path, base[1])
    version = reg.register_candidate(model_dir, tags=lineage_tags(data_hash="h"), model_card="#")
    reg.promote(version, reason="r", actor="x")
    merged = champion_model_dir(reg.profile)  # the default: the registered merged weights
    assert merged == reg.download(version)
    state = reg.profile.model_dump()
    state["model"] |= {"base": str(base[1]), "warm_start_from": "adapter"}
    on_base = champion_model_dir(Profile.model_validate(state))
    assert on_base.name == f"v{version}-on-{str(base[1]).replace('/', '_')}"
    # The same base plus the same adapter: the weights the merged version holds.
    a = AutoModelForCausalLM.from_pretrained(merged).state_dict()
    b = AutoModelForCausalLM.from_pretrained(on_base).state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    base_w = AutoModelForCausalLM.from_pretrained(base[1]).state_dict()
    assert not all(torch.equal(base_w[k], b[k]) for k in b)  # the adapter was applied
    # A champion without an adapter (a full fine-tune) cannot give one.
    reg.promote("1", reason="r", actor="x")
    with pytest.raises(ConfigError, match=r"model.warm_start_from: adapter: .*no adapter"):
        champion_model_dir(Profile.model_validate(state))
    state["model"]["base"] = None
    with pytest.raises(ValueError, match=r"model\.warm_start_from: adapter needs model\.base"):
        Profile.model_validate(state)


def test_promote_rollback_and_history(reg):
    e1 = reg.promote("1", reason="first champion", actor="ci")
    e2 = reg.promote("2", reason="won the gate", actor="pipeline:run-2")
    e3 = reg.promote("3", reason="hotfix", actor="alice", kind="manual")
    back = reg.rollback(reason="3 regressed", actor="alice")
    assert reg.champion().version == "2"
    assert reg.champion_uri() == f"models:/{reg.name}@champion"
    hist = reg.history()
    assert hist == [e1, e2, e3, back]
    assert [(h.seq, h.kind, h.from_version, h.to_version) for h in hist] == [
        (1, "promotion", None, "1"),
        (2, "promotion", "1", "2"),
        (3, "manual", "2", "3"),
        (4, "rollback", "3", "2"),
    ]
    assert hist[2].actor == "alice" and hist[3].reason == "3 regressed"
    # A second rollback walks further back: 2 came from 1.
    assert reg.rollback(reason="again", actor="alice").to_version == "1"
    assert reg.rollback(to="3", reason="explicit", actor="bob").to_version == "3"
    # The history is plain tags on the registered model, readable by any MLflow client.
    raw = reg._client.get_registered_model(reg.name).tags
    entry = json.loads(raw["flywheel.history.00000001"])
    assert entry["from"] is None and entry["to"] == "1" and entry["actor"] == "ci"
    # The version carries the record of its promotion.
    v3 = reg.version("3")
    assert v3.tags["flywheel.promoted_by"] == "bob"
    assert v3.tags["flywheel.promotion_kind"] == "rollback"
    assert [v.aliases for v in reg.versions()] == [[], [], ["challenger", "champion"]]


def test_refusals(reg):
    with pytest.raises(RegistryError, match="reason is required"):
        reg.promote("1", reason=" ", actor="x")
    with pytest.raises(NotFoundError):
        reg.promote("99", reason="r", actor="x")
    with pytest.raises(RegistryError, match="no champion to roll back"):
        reg.rollback(reason="r", actor="x")
    reg.promote("1", reason="r", actor="x")
    # Promoting the champion again changes nothing (a retry succeeds, no history entry)...
    assert reg.promote("1", reason="again", actor="x") is None
    assert reg.promote("champion", reason="again", actor="x", kind="manual") is None
    # ...but a rollback onto it is a mistake worth saying.
    with pytest.raises(RegistryError, match="already the champion"):
        reg.rollback(to="1", reason="r", actor="x")
    with pytest.raises(RegistryError, match="no earlier champion"):
        reg.rollback(reason="r", actor="x")
    # A version created outside flywheel has no lineage: it cannot become champion.
    client = reg._client
    foreign = client.create_model_version(reg.name, reg.version("1").source, run_id=None)
    with pytest.raises(RegistryError, match="no flywheel lineage"):
        reg.promote(str(foreign.version), reason="r", actor="x")
    assert len(reg.history()) == 1 and reg.champion().version == "1"


def test_download_gives_a_from_pretrained_directory_and_is_cached(reg):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reg.promote("2", reason="r", actor="x")
    path = reg.download("champion")
    assert path.name == "v2"
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.n_layer == 2 and tok.eos_token == "<|endoftext|>"
    assert json.loads((path / "flywheel_training.json").read_text())["train"] == {"lr": 0.01}
    assert (path / "model_card.md").read_text().startswith("# card 2")
    mtime = (path / ".complete").stat().st_mtime
    assert reg.download("2") == path and (path / ".complete").stat().st_mtime == mtime


def test_evaluate_resolves_a_registry_uri(reg, tmp_path):
    from flywheel.evaluate import evaluate

    reg.promote("1", reason="r", actor="x")
    ds = build_eval_dataset(tmp_path / "ds", max_docs=5)
    profile = reg.profile.model_copy(
        update={"eval": reg.profile.eval.model_copy(update={"bootstrap_samples": 10})}
    )
    rep = evaluate(profile, f"models:/{reg.name}@champion", ds)
    assert rep.model == f"models:/{reg.name}@champion"
    assert rep.model_dir.endswith("v1") and rep.n_docs == 5


def test_failed_alias_move_leaves_no_half_promotion(reg, monkeypatch):
    from mlflow.exceptions import MlflowException

    reg.promote("1", reason="r", actor="x")
    calls = []

    def down(*args, **kwargs):
        calls.append(args)
        raise MlflowException("backend went away", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(reg._client, "set_registered_model_alias", down)
    with pytest.raises(RegistryError, match="after 4 attempt"):
        reg.promote("2", reason="r", actor="x")
    assert len(calls) == reg.cfg.retries + 1
    monkeypatch.undo()
    # The alias did not move, the aborted move left no history entry, the lock is free.
    assert reg.champion().version == "1"
    assert [h.to_version for h in reg.history()] == ["1"]
    assert reg.promote("2", reason="retry", actor="x").seq == 2


def test_a_held_lock_makes_a_move_wait_then_fail(reg):
    reg._client.create_registered_model(
        reg.name + LOCK_SUFFIX,
        tags={"flywheel.lock.owner": "someone", "flywheel.lock.since": repr(time.time())},
    )
    reg.cfg = reg.cfg.model_copy(update={"lock_timeout_s": 0.5})
    t0 = time.monotonic()
    with pytest.raises(RegistryError, match="holds the lock \\(someone"):
        reg.promote("1", reason="r", actor="x")
    assert 0.5 <= time.monotonic() - t0 < 5
    assert reg.champion() is None and reg.history() == []


def test_a_stale_lock_is_broken(reg):
    reg._client.create_registered_model(
        reg.name + LOCK_SUFFIX,
        tags={"flywheel.lock.owner": "dead", "flywheel.lock.since": repr(time.time() - 3600)},
    )
    assert reg.promote("1", reason="r", actor="x").to_version == "1"
    with pytest.raises(Exception, match=r"not found|RESOURCE_DOES_NOT_EXIST"):
        reg._client.get_registered_model(reg.name + LOCK_SUFFIX)


def test_a_lock_released_while_its_create_conflicts_is_taken(reg, monkeypatch):
    """MLflow's SQL store answers a duplicate name by reading the model that holds it; when
    the holder released the lock in between, that read is a 404 from the create (CI once
    hit this with two processes promoting at once). The mover tries again and gets it."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    client = reg._client
    create = client.create_registered_model
    answers = ["released meanwhile"]

    def racing(name, *args, **kwargs):
        if name.endswith(LOCK_SUFFIX) and answers:
            raise MlflowException(
                f"Registered Model with name={name} not found ({answers.pop()})",
                error_code=RESOURCE_DOES_NOT_EXIST,
            )
        return create(name, *args, **kwargs)

    monkeypatch.setattr(client, "create_registered_model", racing)
    assert reg.promote("1", reason="r", actor="x").to_version == "1"
    assert answers == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_fails_fast_with_a_clear_message(tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    reg = Registry(
        _profile(tmp_path, tracking_uri=uri, retries=2, retry_backoff_s=0.1, http_timeout_s=2)
    )
    t0 = time.monotonic()
    with pytest.raises(RegistryError) as err:
        reg.champion()
    elapsed = time.monotonic() - t0
    assert elapsed < 5, elapsed  # 3 attempts, 0.1 + 0.2 s of backoff; no MLflow retries
    msg = str(err.value)
    assert uri in msg and "after 3 attempt" in msg and "MLFLOW_TRACKING_URI" in msg
    with pytest.raises(RegistryError, match="unreachable"):
        reg.promote("1", reason="r", actor="x")


def test_parse_model_uri():
    assert parse_model_uri("models:/flywheel-lm@champion") == ("flywheel-lm", "champion")
    assert parse_model_uri("models:/m/12") == ("m", "12")
    with pytest.raises(RegistryError, match="expected models:/"):
        parse_model_uri("runs:/abc/model")


def test_resolve_model_source_downloads_registry_uris_and_passes_the_rest(reg, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel.registry import resolve_model_source

    reg.promote("2", reason="r", actor="x")
    by_alias = resolve_model_source(f"models:/{reg.name}@champion", reg.profile)
    assert Path(by_alias).name == "v2"  # the alias followed, into the registry cache
    assert Path(by_alias).parent == reg.profile.state_path("registry-cache", reg.name)
    AutoModelForCausalLM.from_pretrained(by_alias)
    assert AutoTokenizer.from_pretrained(by_alias).eos_token == "<|endoftext|>"
    by_version = resolve_model_source(f"models:/{reg.name}/3", reg.profile.model_dump())
    assert Path(by_version).name == "v3"
    # Paths and hub ids are not the registry's business: returned as given.
    local = str(tmp_path / "some-model")
    assert resolve_model_source(local, reg.profile) == local
    assert resolve_model_source("Qwen/Qwen2.5-0.5B", reg.profile) == "Qwen/Qwen2.5-0.5B"


@pytest.mark.parametrize(
    "uri, why",
    [
        ("models:/flywheel-lm@nope", "no alias 'nope'"),
        ("models:/flywheel-lm/99", "no version 99"),
        ("models:/never-registered@champion", "never-registered' not found"),
        ("models:/flywheel-lm", "expected models:/"),
    ],
)
def test_resolve_model_source_refusals_name_model_base(reg, uri, why):
    from flywheel.errors import ConfigError
    from flywheel.registry import resolve_model_source

    with pytest.raises(ConfigError, match=r"^model\.base: .*" + why.replace("'", ".")):
        resolve_model_source(uri, reg.profile)


def test_profile_accepts_registry_uris_as_model_base(tmp_path):
    from pydantic import ValidationError

    for uri in ("models:/flywheel-lm@champion", "models:/flywheel-lm/3", "models:/m/latest"):
        assert Profile(state_dir=str(tmp_path), model={"base": uri}).model.base == uri
    with pytest.raises(ValidationError, match=r"model\.base: 'models:/flywheel-lm@': expected"):
        Profile(state_dir=str(tmp_path), model={"base": "models:/flywheel-lm@"})


def test_model_card(base, tmp_path):
    from flywheel.evaluate.report import EvalReport
    from flywheel.gate import decide_promotion
    from flywheel.registry import model_card

    rep = EvalReport(
        model="m", model_dir="m", dataset="d", data_hash="hash-abc", perplexity=40.0,
        perplexity_ci=(39.0, 41.0), accuracy=0.3, accuracy_ci=(0.29, 0.31), mean_nll=3.7,
        confidence=0.95, bootstrap_samples=10, n_docs=5, n_tokens=500, seconds=1.0,
        bits_per_byte=1.5, n_bytes=1780,
    )  # fmt: skip
    profile = _profile(tmp_path)
    decision = decide_promotion(rep, None, profile.gate)
    card = model_card(profile, base[1], {"content_hash": "hash-abc", "docs": 5}, rep, decision)
    assert card.startswith("# flywheel-lm")
    assert "**Data manifest:** `hash-abc`" in card
    assert "fresh gpt2" in card and '"lr": 0.01' in card
    assert "| perplexity | 40 |" in card and "**PROMOTE**" in card


def test_cli_list_history_promote_rollback(reg, capsys, monkeypatch):
    from flywheel.cli.main import main

    monkeypatch.setenv("COLUMNS", "200")
    # The CLI console binds the sys.stdout of its import time; point it at this test's capture.
    import sys

    from flywheel.cli.common import console

    monkeypatch.setattr(console, "file", sys.stdout)
    state = f"state_dir={reg.profile.state_dir}"
    main(["models", "promote", "2", "--reason", "by hand", "--actor", "carol", state])
    main(["models", "promote", "3", "--reason", "newer", "--actor", "carol", state])
    main(["models", "rollback", "--reason", "bad outputs", state])
    main(["models", "list", state])
    main(["models", "history", state])
    out = capsys.readouterr().out
    assert "champion (none) -> 2" in out and "champion 3 -> 2 (rollback, #3)" in out
    assert "challenger" in out and "hash-abc" in out
    assert "manual" in out and "rollback" in out and "bad outputs" in out and "carol" in out
    assert reg.champion().version == "2"
    with pytest.raises(SystemExit) as err:
        main(["models", "promote", "77", "--reason", "x", state])
    assert err.value.code == 1
    assert "error:" in capsys.readouterr().err
    assert reg.history()[-1].kind == "rollback"
    assert CHAMPION in reg.version("2").aliases
    # Promoting the champion again succeeds and changes nothing: automation can retry it.
    n = len(reg.history())
    main(["models", "promote", "2", "--reason", "retry", state])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines == [f"{reg.name}: version 2 is already the champion; nothing changed"]
    assert len(reg.history()) == n and reg.champion().version == "2"
    # --json: one JSON document on stdout, the same facts as the tables.
    main(["models", "list", "--json", state])
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == reg.name and [v["version"] for v in doc["versions"]] == ["1", "2", "3"]
    assert doc["versions"][1]["aliases"] == ["champion"]
    assert doc["versions"][2]["tags"]["data_manifest_hash"] == "hash-abc"
    main(["models", "history", "--json", state])
    moves = json.loads(capsys.readouterr().out)["history"]
    assert [(m["seq"], m["kind"], m["from"], m["to"]) for m in moves] == [
        (1, "manual", None, "2"),
        (2, "manual", "2", "3"),
        (3, "rollback", "3", "2"),
    ]
    assert moves[2]["reason"] == "bad outputs" and moves[0]["actor"] == "carol"


def test_rollback_target_undoes_rollbacks_like_a_stack():
    from datetime import UTC, datetime

    from flywheel.registry import HistoryEntry, rollback_target

    def e(seq, kind, frm, to):
        now = datetime.now(UTC)
        fields = {"from": frm, "to": to}
        return HistoryEntry(seq=seq, time=now, actor="a", kind=kind, reason="r", **fields)

    h = [e(1, "promotion", None, "1"), e(2, "promotion", "1", "2"), e(3, "manual", "2", "3")]
    assert rollback_target(h, "3") == "2"
    h.append(e(4, "rollback", "3", "2"))
    assert rollback_target(h, "2") == "1"
    h.append(e(5, "rollback", "2", "1"))
    with pytest.raises(RegistryError, match="no earlier champion"):
        rollback_target(h, "1")
    # An explicit rollback elsewhere counts as a move: rolling back undoes it.
    h.append(e(6, "rollback", "1", "3"))
    assert rollback_target(h, "3") == "1"
    with pytest.raises(RegistryError, match="not set through flywheel"):
        rollback_target(h, "2")


def test_a_server_that_never_answers_is_bounded_by_the_request_timeout(tmp_path):
    # A socket that accepts connections (the kernel's backlog) but never responds: each
    # request hangs until registry.http_timeout_s, then the bounded retries give up.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
        reg = Registry(
            _profile(tmp_path, tracking_uri=uri, retries=1, retry_backoff_s=0.1, http_timeout_s=1)
        )
        t0 = time.monotonic()
        with pytest.raises(RegistryError, match="after 2 attempt"):
            reg.versions()
        assert time.monotonic() - t0 < 8


def test_a_retried_gate_reuses_the_version_it_registered(reg, base):
    """KFP retries a gate pod that died after registering: the same pipeline run and training
    run must not become a second version, and the retry still leaves the alias on it."""
    reg.promote("1", reason="first", actor="ci")  # move challenger's neighbourhood a little
    tags = lineage_tags(training_run_id="train-2", pipeline_run_id="pipe-2", trigger_reason="x")
    again = reg.register_candidate(base[1], tags=tags, model_card="# retry")
    assert again == "2"
    assert [v.version for v in reg.versions()] == ["1", "2", "3"]
    assert reg.version("challenger").version == "2"
    # Another training run in the same pipeline run is a different candidate.
    other = lineage_tags(training_run_id="train-9", pipeline_run_id="pipe-2")
    assert reg.register_candidate(base[1], tags=other, model_card="# new") == "4"


def test_mlflow_http_limits_are_set_only_around_calls_to_a_tracking_server(monkeypatch):
    """MLflow reads its HTTP retry/timeout settings from the environment per request: the
    adapter sets them only while a call to a server runs, never for a local store, and
    leaves the process environment as it found it."""
    import os

    from mlflow.exceptions import MlflowException

    from flywheel.config import RegistryConfig
    from flywheel.registry.adapter import MlflowAdapter

    key = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
    monkeypatch.delenv(key, raising=False)
    cfg = RegistryConfig(retries=2, retry_backoff_s=0.01)
    seen: list[str | None] = []

    def flaky():
        seen.append(os.environ.get(key))
        if len(seen) < 3:
            raise MlflowException("busy", error_code="TEMPORARILY_UNAVAILABLE")
        return "ok"

    assert MlflowAdapter("sqlite:///unused.db", cfg).call("x", flaky) == "ok"
    assert seen == [None, None, None]  # retried by the adapter, environment untouched
    seen.clear()
    assert MlflowAdapter("http://127.0.0.1:9", cfg).call("x", flaky) == "ok"
    assert seen == ["0", "0", "0"] and key not in os.environ


@pytest.mark.parametrize(
    "reason", ["[/]", "[bold red]alarm[/] [link=http://x.example]click[/link]"]
)
def test_cli_shows_a_reason_literally_never_as_markup(reg, capsys, monkeypatch, reason):
    """Issue 24: `--reason '[/]'` broke `models history` for good (rich MarkupError), and
    markup in a reason was rendered. Every console prints user text as written."""
    import sys

    from flywheel.cli.common import console
    from flywheel.cli.main import main

    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.setattr(console, "file", sys.stdout)
    state = f"state_dir={reg.profile.state_dir}"
    main(["models", "promote", "2", "--reason", reason, "--actor", "[i]eve[/i]", state])
    main(["models", "history", state])
    out = capsys.readouterr().out
    assert reason in out and "[i]eve[/i]" in out
