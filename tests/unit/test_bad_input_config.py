"""Bad profiles, as a careless user writes them: each fails when the profile loads, in one
line naming the file and the dotted field (exit 2), and creates nothing.

Covers issue 10 cases 6 (search space, Kubernetes quantities) and 7 (a profile that is not
a YAML mapping); the state directory's resolution (case 8) is in test_bad_input_cli.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fixtures_cli import flywheel, nonblank

from flywheel.config import DEFAULT_PROFILE, TaskResources, load_profile
from flywheel.errors import ConfigError


def _load_error(override: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_profile(None, [override])
    return str(info.value)


# ------------------------------------------------------------------ search space


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            "{lr: {type: float, low: 0.1, high: 0.01}}",
            "tune.search_space.lr: low (0.1) is above high (0.01)",
        ),
        (
            "{lr: {type: float, low: 0, high: 0.01, log: true}}",
            "tune.search_space.lr.low must be above 0 on a log scale, got 0",
        ),
        (
            "{lr: {type: float, low: -0.5, high: 0.01, log: true}}",
            "tune.search_space.lr.low must be above 0 on a log scale, got -0.5",
        ),
        (
            "{lr_schedule: {type: categorical, choices: cosine}}",
            "tune.search_space.lr_schedule.choices must be a non-empty list, got 'cosine'",
        ),
        (
            "{lr: {type: categorical, choices: 3}}",
            "tune.search_space.lr.choices must be a non-empty list, got 3",
        ),
        (
            "{lr: {type: categorical, choices: []}}",
            "tune.search_space.lr.choices must be a non-empty list, got []",
        ),
        (
            "{lr: {type: categorical, choices: [[0.1], 0.2]}}",
            "tune.search_space.lr.choices: [0.1] is not a single value",
        ),
        (
            "{micro_batch_size: {type: int, low: 1.5, high: 4}}",
            "tune.search_space.micro_batch_size.low must be a whole number for type int, got 1.5",
        ),
        (
            "{warmup_steps: {type: float, low: 0, high: 4}}",
            "tune.search_space.warmup_steps.type is float but train.warmup_steps takes whole "
            "numbers; use int",
        ),
        (
            "{lr: {type: float, low: small, high: 0.01}}",
            "tune.search_space.lr.low must be a number, got 'small'",
        ),
        (
            "{lr: {type: float, low: 0.001, high: 0.01, log: maybe}}",
            "tune.search_space.lr.log must be true or false, got 'maybe'",
        ),
        (
            "{lr: {type: float, low: 0.001, high: 0.01, log: true, step: 0.001}}",
            "tune.search_space.lr: step and log cannot be combined",
        ),
        (
            "{warmup_steps: {type: int, low: 0, high: 4, step: 0}}",
            "tune.search_space.warmup_steps.step must be above 0, got 0",
        ),
        (
            "{lr: {type: float, low: 0.001, high: 0.01, scale: 2}}",
            "tune.search_space.lr: unknown key(s) ['scale'] for type float",
        ),
        (
            "{lr: {type: uniform, low: 0.001, high: 0.01}}",
            "tune.search_space.lr.type must be float, int or categorical, got 'uniform'",
        ),
        ("{lr: {type: float, low: 0.001}}", "tune.search_space.lr needs low and high"),
        # Shape is fine, but a bound is no value its train field takes: the best value trains
        # the full run, so each is checked against its train.* field as the profile loads.
        (
            "{lr: {type: float, low: -1.0, high: 0.01}}",
            "tune.search_space.lr: -1.0 is not a valid train.lr (Input should be greater "
            "than or equal to 0)",
        ),
        (
            "{zero_stage: {type: int, low: 0, high: 4}}",
            "tune.search_space.zero_stage: 4 is not a valid train.zero_stage (Input should be "
            "less than or equal to 3)",
        ),
        (
            "{lr_schedule: {type: categorical, choices: [cosine, cubic]}}",
            "tune.search_space.lr_schedule: 'cubic' is not a valid train.lr_schedule",
        ),
    ],
)
def test_a_bad_search_space_fails_when_the_profile_loads(space, message):
    msg = _load_error(f"tune.search_space={space}")
    assert msg.startswith(f"{DEFAULT_PROFILE} (with overrides tune.search_space="), msg
    assert message in msg
    # The section is not repeated in front of a message that names its own field.
    assert "tune: tune." not in msg and "(profile):" not in msg


def test_a_good_search_space_loads_with_its_numbers_as_numbers():
    space = load_profile(
        None,
        [
            # PyYAML reads 1e-4 (no dot) as a string; 2.0 is a whole number for type int.
            "tune.search_space={lr: {type: float, low: 1e-4, high: '1e-2', log: true}, "
            "warmup_steps: {type: int, low: 0, high: 4.0, step: 2}, "
            "lr_schedule: {type: categorical, choices: [cosine, constant]}}"
        ],
    ).tune.search_space
    assert space["lr"] == {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}
    assert space["warmup_steps"] == {"type": "int", "low": 0, "high": 4, "log": False, "step": 2}
    assert isinstance(space["warmup_steps"]["high"], int)
    assert space["lr_schedule"]["choices"] == ["cosine", "constant"]


def test_a_bound_that_clashes_with_the_rest_of_train_fails_when_tuning_starts(tmp_path):
    """warmup_steps up to 1000 with max_steps 60: every trial passes (warmup clamped to the
    trial) and the full run would fail after the study. Refused before any trial; but a
    profile whose train section is short loads, since `flywheel train` runs no search."""
    from flywheel.tune.space import check_space

    space = "tune.search_space={warmup_steps: {type: int, low: 0, high: 1000}}"
    prof = load_profile(None, [space])
    with pytest.raises(ConfigError) as info:
        check_space(prof)
    assert str(info.value) == (
        "tune.search_space.warmup_steps = 1000: the full training run: "
        "train.warmup_steps must not exceed train.max_steps"
    )
    # The shipped space searches warmup_steps up to 5; a 4-step training run still loads.
    assert load_profile(None, ["train.max_steps=4", "train.warmup_steps=1"]).train.max_steps == 4
    # And through the CLI: one line, exit 2, before Ray or the study (nothing created).
    (tmp_path / "ds").mkdir()
    out = flywheel(tmp_path, "tune", "--data", "ds", space, timeout=120)
    lines = nonblank(out.stderr)
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].endswith("train.warmup_steps must not exceed train.max_steps")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_the_shipped_search_space_still_builds_optuna_distributions():
    from flywheel.tune.space import distributions

    assert set(distributions(load_profile().tune.search_space)) == {"lr", "warmup_steps"}


# ---------------------------------------------------------- Kubernetes quantities


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "kfp.resources.train.cpu=many",
            "kfp.resources.train.cpu: 'many' is not a Kubernetes quantity "
            '(like "500m", "2" or "0.5")',
        ),
        (
            "kfp.resources.train.memory=lots",
            "kfp.resources.train.memory: 'lots' is not a Kubernetes quantity "
            '(like "512Mi", "8G" or "8Gi")',
        ),
        ("kfp.resources.default.cpu=2 cores", "kfp.resources.default.cpu: '2 cores'"),
        ("kfp.resources.train.cpu=-1", "kfp.resources.train.cpu: '-1'"),
        ("kfp.resources.train.cpu=true", "kfp.resources.train.cpu: True"),
        ("kfp.resources.train.memory=1.5G", "kfp.resources.train.memory: '1.5G'"),
        ("kfp.resources.train.memory=8gb", "kfp.resources.train.memory: '8gb'"),
    ],
)
def test_a_bad_cpu_or_memory_fails_when_the_profile_loads(override, message):
    msg = _load_error(override)
    assert msg.startswith(f"{DEFAULT_PROFILE} (with overrides {override}): "), msg
    assert message in msg


@pytest.mark.parametrize(
    ("cpu", "memory", "want"),
    [
        ("500m", "512Mi", ("500m", "512Mi")),
        (2, "8G", ("2", "8G")),  # YAML's `cpu: 2` is an int
        (0.5, "8Gi", ("0.5", "8Gi")),
        ("4", 1024, ("4", "1024")),  # plain bytes, as KFP accepts
    ],
)
def test_good_quantities_load_as_strings_kfp_accepts(cpu, memory, want):
    res = TaskResources(cpu=cpu, memory=memory)
    assert (res.cpu, res.memory) == want
    assert _kfp_accepts(res.cpu, res.memory)


@pytest.mark.parametrize(("cpu", "memory"), [("many", "8G"), ("2 cores", "8G"), ("2", "1.5G")])
def test_what_the_profile_refuses_kfp_refuses_too(cpu, memory):
    with pytest.raises(ValueError):
        TaskResources(cpu=cpu, memory=memory)
    assert not _kfp_accepts(cpu, memory)


def _kfp_accepts(cpu: str, memory: str) -> bool:
    """KFP's own check, made when a pipeline builds a task (public setters only)."""
    from kfp import dsl

    @dsl.component(base_image="python:3.11")
    def noop():
        pass

    accepted = []

    @dsl.pipeline
    def pipe():
        try:
            noop().set_cpu_limit(cpu).set_memory_limit(memory)
            accepted.append(True)
        except ValueError:
            accepted.append(False)

    return accepted == [True]


# ------------------------------------------------------------ the profile file


def _write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("binary.yaml", bytes(range(128, 256)), "not a text file (a profile is UTF-8 YAML)"),
        ("empty.yaml", b"", "the profile is empty (omit --profile for the defaults)"),
        ("comment.yaml", b"# nothing yet\n", "the profile is empty"),
        ("list.yaml", b"- train\n- tune\n", "a profile must be a mapping of sections, got a list"),
        ("scalar.yaml", b"local\n", "a profile must be a mapping of sections, got a str"),
        ("broken.yaml", b"train: [1\n", "not valid YAML"),
    ],
)
def test_a_profile_that_is_not_a_yaml_mapping_names_the_file(tmp_path, name, content, message):
    path = _write(tmp_path, name, content)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert str(info.value).startswith(f"{path}: {message}")
    assert "\n" not in str(info.value)


def test_a_directory_given_as_profile(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: is a directory, not a profile")):
        load_profile(tmp_path)


def test_cli_binary_profile_is_one_line_exit_2_and_creates_nothing(tmp_path):
    """Before: UnicodeDecodeError, exit 1. After: the file named, exit 2."""
    path = _write(tmp_path, "p.yaml", bytes(range(128, 256)))
    work = tmp_path / "work"
    work.mkdir()
    out = flywheel(work, "models", "list", "--profile", str(path), timeout=120)
    lines = nonblank(out.stderr)
    assert out.returncode == 2
    assert lines == [f"error: {path}: not a text file (a profile is UTF-8 YAML)"]
    assert list(work.iterdir()) == []  # no state directory, no registry


def test_cli_quotes_a_bracketed_value_verbatim(tmp_path):
    """Rich markup must not eat `[cosine, cubic]` out of the error line."""
    out = flywheel(
        tmp_path,
        "models",
        "list",
        "tune.search_space={lr_schedule: {type: categorical, choices: [cosine, cubic]}}",
        timeout=120,
    )
    lines = nonblank(out.stderr)
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "choices: [cosine, cubic]}}):" in lines[0]
    assert "'cubic' is not a valid train.lr_schedule" in lines[0]
