"""Bad CLI input, as a careless user types it: each case exits with one line on stderr and
the right code (2 usage or profile, 1 otherwise), loses nothing and leaves nothing behind.

Issue 10 cases 7 (alias words written as versions, unwritable outputs and state
directories) and 8 (where the state directory is, and saying so when one is created).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from flywheel.config import STATE_ENV, Profile, load_profile, resolve_state_dir, search_dirs

# ------------------------------------------------------------------------ harness


# `cli` (run `flywheel ARGS` in this process) is in tests/conftest.py.


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A fresh working directory with the default state_dir resolution (no env pin). A
    .flywheel above tmp (say /tmp/.flywheel) is not searched: tmp is no repository."""
    root = tmp_path / "project"
    root.mkdir()
    assert search_dirs(root) == [root], "the test's tmp dir is inside a repository"
    monkeypatch.chdir(root)
    monkeypatch.delenv(STATE_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return root


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ---------------------------------------------- case 8: where the state directory is


def test_state_dir_resolution_order(project, monkeypatch):
    # Nothing anywhere: ./.flywheel (not created by resolving).
    assert resolve_state_dir() == (project / ".flywheel", "state_dir")
    assert not (project / ".flywheel").exists()
    # A .flywheel above the working directory is found up to the repository's root, as git
    # finds .git.
    (project / ".git").mkdir()
    (project / ".flywheel").mkdir()
    deep = project / "src" / "pkg"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert resolve_state_dir() == (project / ".flywheel", "state_dir")
    # The environment variable wins over the search, read when resolving (not at import).
    monkeypatch.setenv(STATE_ENV, str(project / "elsewhere"))
    assert resolve_state_dir() == (project / "elsewhere", f"${STATE_ENV}")
    # A state_dir the profile names is used as given: the profile's stores (the cluster path).
    assert resolve_state_dir("/srv/state") == (Path("/srv/state"), "state_dir")
    assert resolve_state_dir("run-state") == (deep / "run-state", "state_dir")
    assert Profile(state_dir="run-state").state_root() == deep / "run-state"


def test_a_command_from_a_subdirectory_finds_the_projects_registry(project, cli, monkeypatch):
    """Before: a second, empty registry in the subdirectory, silently. After: one registry,
    and a line on stderr where a command creates a new state directory."""
    (project / ".git").mkdir()
    code, out, err = cli("models", "list")
    assert code == 0
    assert err == [f"state: {project / '.flywheel'} (new)"]
    sub = project / "notebooks" / "week1"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    code, out, err = cli("models", "history")
    assert code == 0 and err == []  # found, not new: nothing to say
    assert "no champion moves of flywheel-lm yet" in out
    assert not (sub / ".flywheel").exists() and not (project / "notebooks" / ".flywheel").exists()
    assert (project / ".flywheel" / "mlflow" / "mlflow.db").is_file()


def test_a_new_state_dir_is_announced_once(project, capsys):
    prof = load_profile()
    prof.state_path("mlflow")
    prof.state_path("optuna")
    err = capsys.readouterr().err.splitlines()
    assert err == [f"state: {project / '.flywheel'} (new)"]


def test_the_environment_variable_places_the_state_and_says_so(project, cli, tmp_path, monkeypatch):
    monkeypatch.setenv(STATE_ENV, str(tmp_path / "shared-state"))
    code, out, err = cli("models", "list")
    assert code == 0 and err == [f"state: {tmp_path / 'shared-state'} (new)"]
    assert str(tmp_path / "shared-state" / "mlflow" / "mlflow.db") in out
    assert _tree(project) == []


def test_the_compiled_pipeline_does_not_carry_the_environment(project, tmp_path, monkeypatch):
    """FLYWHEEL_STATE_DIR is read at run time, never at compile time."""
    from flywheel.kfp.compile import compile_pipeline

    secret_place = tmp_path / "only-on-this-laptop"
    monkeypatch.setenv(STATE_ENV, str(secret_place))
    prof = load_profile()
    assert prof.to_param()["state_dir"] == ".flywheel"
    text = compile_pipeline("retrain", prof, tmp_path / "build").read_text()
    assert "only-on-this-laptop" not in text


def test_a_tune_trial_keeps_the_resolved_state_dir(project, monkeypatch):
    from flywheel.tune.space import trial_profile

    (project / ".git").mkdir()
    (project / ".flywheel").mkdir()
    sub = project / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub)
    trial = trial_profile(load_profile(), {"lr": 1e-3})
    # Absolute: a trial runs in its own working directory, where no search would find it.
    assert trial.state_dir == str(project / ".flywheel")
    assert trial.tune.search_space == {}


@pytest.mark.parametrize("how", ["override", "env"])
def test_an_unusable_state_dir_is_one_line_naming_the_field(project, cli, monkeypatch, how):
    """Before: NotADirectoryError, exit 1. After: the field (or variable) and path, exit 2."""
    (project / "notes.txt").write_text("mine")
    bad = project / "notes.txt" / "state"
    args = ["models", "list"]
    if how == "override":
        args.append(f"state_dir={bad}")
        origin = "state_dir"
    else:
        monkeypatch.setenv(STATE_ENV, str(bad))
        origin = f"${STATE_ENV}"
    code, out, err = cli(*args)
    assert code == 2 and out == ""
    assert err == [f"error: {origin} {bad}: cannot create {bad / 'mlflow'} (Not a directory)"]
    assert _tree(project) == ["notes.txt"] and (project / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("value", ["", "'  '"])
def test_an_empty_state_dir_is_refused_not_the_working_directory(project, cli, value):
    """Before: stores (mlflow/, optuna/) spilled straight into the working directory."""
    code, out, err = cli("models", "list", f"state_dir={value}")
    assert code == 2 and out == "" and len(err) == 1
    assert "state_dir: empty; name a directory, or leave it out for .flywheel" in err[0]
    assert _tree(project) == []


# --------------------------------------------------- case 7: outputs and inputs


@pytest.fixture
def files(project):
    """A file where a directory is expected, a directory with a user's file in it."""
    (project / "notes.txt").write_text("mine")
    (project / "results").mkdir()
    (project / "results" / "keep.md").write_text("keep")
    (project / "ds").mkdir()  # exists; the commands below fail before reading it
    (project / "model").mkdir()
    (project / "model" / "config.json").write_text("{}")
    return project


def _untouched(root: Path) -> None:
    """Nothing lost (the user's files as they were) and nothing left behind (no store)."""
    assert _tree(root) == [
        "ds",
        "model",
        "model/config.json",
        "notes.txt",
        "results",
        "results/keep.md",
    ]
    assert (root / "notes.txt").read_text() == "mine"
    assert (root / "results" / "keep.md").read_text() == "keep"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["train", "--data", "ds", "--out", "notes.txt/model"],
            "--out notes.txt/model: cannot create it ({root}/notes.txt is not a directory)",
        ),
        (
            ["train", "--data", "ds", "--out", "results"],
            "--out results: not empty; name a new directory",
        ),
        (
            ["tune", "--data", "ds", "--out", "notes.txt"],
            "--out notes.txt: exists and is not a directory",
        ),
        (
            ["evaluate", "model", "--data", "ds", "--out", "results"],
            "--out results: is a directory; name a file",
        ),
        (
            ["evaluate", "model", "--data", "ds", "--out", "notes.txt/r.json"],
            "--out notes.txt/r.json: cannot create it ({root}/notes.txt is not a directory)",
        ),
        (
            ["data", "prepare", "--out", "notes.txt/ds"],
            "--out notes.txt/ds: cannot create it ({root}/notes.txt is not a directory)",
        ),
        (
            ["drift", "check", "--window", "notes.txt", "--out", "notes.txt/report"],
            "--out notes.txt/report: cannot create it ({root}/notes.txt is not a directory)",
        ),
    ],
)
def test_an_unwritable_out_is_one_line_before_any_work(files, cli, args, message):
    """Before: FileNotFoundError / NotADirectoryError / IsADirectoryError, some only after
    the work was done. After: one line naming --out and the path, exit 1, nothing made."""
    code, out, err = cli(*args)
    assert code == 1 and out == ""  # refused before any progress display or table
    assert err == ["error: " + message.format(root=files)]
    _untouched(files)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--data", "nope"], "Invalid value for --data: 'nope' does not exist"),
        (
            ["train", "--data", "notes.txt"],
            "Invalid value for --data: 'notes.txt' is not a directory",
        ),
        (
            ["train", "--data", "ds", "--init-from", "nope"],
            "Invalid value for --init-from: 'nope' does not exist",
        ),
        (["tune", "--data", "nope"], "Invalid value for --data: 'nope' does not exist"),
        (
            ["evaluate", "model", "--data", "nope"],
            "Invalid value for --data: 'nope' does not exist",
        ),
        (
            ["drift", "check", "--window", "notes.txt", "--tokenizer", "nope"],
            "Invalid value for --tokenizer: 'nope' does not exist",
        ),
    ],
)
def test_a_missing_input_directory_is_a_usage_error(files, cli, args, message):
    code, out, err = cli(*args)
    assert code == 2 and out == "" and err == [f"error: {message}"]
    _untouched(files)


def test_a_bad_profile_is_reported_before_a_bad_flag(files, cli):
    code, out, err = cli("train", "--data", "nope", "train.nope=1")
    assert code == 2 and out == "" and len(err) == 1 and "train.nope: unknown field" in err[0]


def test_evaluate_finds_both_models_before_scoring_either(files, cli):
    """Before: the first model was scored (minutes on a real one), then --against failed."""
    code, out, err = cli("evaluate", "model", "--data", "ds", "--against", "nope")
    assert code == 1 and out == ""
    assert err == ["error: nope: not a model directory (no config.json from save_pretrained)"]
    _untouched(files)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_parent_is_named(files, cli):
    locked = files / "results"
    locked.chmod(0o555)
    try:
        code, out, err = cli("train", "--data", "ds", "--out", "results/new")
    finally:
        locked.chmod(0o755)
    assert code == 1 and out == ""
    assert err == [f"error: --out results/new: cannot write in {locked} (permission denied)"]


# ------------------------------------------- case 7: alias words are never written


@pytest.fixture
def registry(project):
    """versions 1..3 with flywheel lineage, champion 1, challenger 3; built through MLflow's
    public client (no model files: promotion reads tags, never weights)."""
    from mlflow import MlflowClient

    from flywheel.registry import TAG_REGISTERED_BY, Registry

    reg = Registry(load_profile())
    client = MlflowClient(tracking_uri=reg.uri, registry_uri=reg.uri)
    client.create_registered_model(reg.name)
    for i in (1, 2, 3):
        client.create_model_version(
            reg.name, f"file://{project}/m{i}", tags={TAG_REGISTERED_BY: "flywheel"}
        )
    client.set_registered_model_alias(reg.name, "challenger", "3")
    reg.promote("1", reason="first", actor="ci")
    return reg


def test_promote_an_alias_writes_its_version_number(registry, cli):
    """Before: `models promote champion` checked the resolved version, then tagged version
    'champion' and recorded `to: champion` (MLflow refused). After: the number everywhere."""
    # Issue 12: promoting the champion is a no-op that succeeds (automation retries it).
    code, out, err = cli("models", "promote", "champion", "--reason", "again")
    assert code == 0 and err == []
    assert f"{registry.name}: version 1 is already the champion; nothing changed" in out
    assert len(registry.history()) == 1

    code, out, err = cli("models", "promote", "challenger", "--reason", "won by hand")
    assert code == 0, err
    assert f"{registry.name}: champion 1 -> 3 (#2)" in out
    assert registry.champion().version == "3"
    assert registry.version("3").tags["flywheel.promotion_reason"] == "won by hand"

    code, out, err = cli("models", "rollback", "--to", "latest", "--reason", "x")
    assert code == 1 and err == [f"error: {registry.name} version 3 is already the champion"]

    code, out, err = cli("models", "rollback", "--reason", "regressed")
    assert code == 0 and "champion 3 -> 1 (rollback, #3)" in out

    code, out, err = cli("models", "promote", "latest", "--reason", "newest")
    assert code == 0 and "champion 1 -> 3 (#4)" in out
    hist = registry.history()
    assert [(h.from_version, h.to_version) for h in hist] == [
        (None, "1"),
        ("1", "3"),
        ("3", "1"),
        ("1", "3"),
    ]
    assert all(re.fullmatch(r"\d+", v.version) for v in registry.versions())


def test_an_unknown_alias_is_one_line_and_moves_nothing(registry, cli):
    code, out, err = cli("models", "promote", "production", "--reason", "x")
    assert code == 1 and out == ""
    assert err == [f"error: {registry.name} has no alias 'production' at {registry.uri}"]
    assert registry.champion().version == "1" and len(registry.history()) == 1


def test_an_unknown_version_is_one_line_and_moves_nothing(registry, cli):
    code, out, err = cli("models", "rollback", "--to", "99", "--reason", "x")
    assert code == 1 and out == ""
    assert err == [f"error: {registry.name} has no version 99 at {registry.uri}"]
    assert registry.champion().version == "1" and len(registry.history()) == 1


def test_latest_in_a_registry_uri():
    from flywheel.registry import parse_model_uri

    assert parse_model_uri("models:/flywheel-lm/latest") == ("flywheel-lm", "latest")
    assert parse_model_uri("models:/flywheel-lm/7") == ("flywheel-lm", "7")
