"""Issue 24, rule 1: one grammar for dotted overrides, profiles parsed strictly.

Overrides: a key is one or more names joined by single dots, then `=`, then a YAML value;
anything else is refused before any work (exit 2) naming the override and the grammar. A
section (`train={}`) is refused, never reset to code defaults. Profiles: a key repeated in
one mapping is an error naming the key and both lines; aliases are bounded (none nested,
at most MAX_ALIASES) so an alias bomb fails fast; an empty or non-mapping document is an
error. Numbers: non-finite values are refused at load wherever a number is read.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fixtures_cli import flywheel, nonblank

from flywheel.config import (
    MAX_ALIASES,
    OVERRIDE_GRAMMAR,
    apply_overrides,
    load_profile,
    load_yaml,
    parse_override,
)
from flywheel.errors import ConfigError

# ------------------------------------------------------------------ the grammar


@pytest.mark.parametrize(
    ("item", "problem"),
    [
        ("train..lr=0.01", "empty name between dots"),
        (".train.lr=1", "key starts or ends with a dot"),
        ("train.lr.=1", "key starts or ends with a dot"),
        ("train. lr=1", "space in the key"),
        (" train.lr=1", "space in the key"),
        ("train.lr =1", "space in the key"),
        ("train.lr", "no '='"),
        ("=1", "empty key"),
        ("tr@in.lr=1", "'tr@in' is not a name"),
        ("train.1lr=1", "'1lr' is not a name"),
        ("train.-lr=1", "'-lr' is not a name"),
    ],
)
def test_an_override_off_the_grammar_is_refused_naming_it(item, problem):
    with pytest.raises(ConfigError) as info:
        parse_override(item)
    assert str(info.value) == f"override {item!r}: {problem}; {OVERRIDE_GRAMMAR}"


@pytest.mark.parametrize(
    ("item", "parsed"),
    [
        ("train.lr=1e-3", (["train", "lr"], 0.001)),
        ("train.max_steps=1e3", (["train", "max_steps"], 1000.0)),  # YAML 1.2: a float
        ("kfp.resources.prepare-data.cpu=4", (["kfp", "resources", "prepare-data", "cpu"], 4)),
        ("model.base=", (["model", "base"], "")),
        ("data.source.path=a=b", (["data", "source", "path"], "a=b")),  # first = splits
        ("gate.metrics={}", (["gate", "metrics"], {})),
    ],
)
def test_an_override_on_the_grammar_parses(item, parsed):
    assert parse_override(item) == parsed


def test_exponent_without_a_dot_is_a_number_in_a_profile():
    assert load_profile(None, ["train.max_steps=1e3"]).train.max_steps == 1000


@pytest.mark.parametrize(
    "item", ["train={}", "train={max_steps: 5}", "data.filters=null", "ray.kuberay={}"]
)
def test_an_override_of_a_whole_section_is_refused(item):
    key = item.split("=", 1)[0]
    with pytest.raises(ConfigError) as info:
        load_profile("configs/cluster.yaml", [item])
    assert str(info.value) == (
        f"override {item!r}: {key} is a section; set its fields one by one ({key}.<field>=value)"
    )


def test_a_field_holding_a_map_and_a_map_entry_are_values_replaced_whole():
    prof = load_profile("configs/cluster.yaml", ["kfp.resources.train={cpu: '2'}"])
    assert prof.kfp.resources["train"].cpu == "2"
    assert prof.kfp.resources["train"].accelerator_count in (None, 0)
    assert load_profile("configs/cluster.yaml", ["kfp.resources={}"]).kfp.resources == {}


def test_overrides_apply_left_to_right():
    assert load_profile(None, ["train.lr=0.1", "train.lr=0.2"]).train.lr == pytest.approx(0.2)
    data = apply_overrides({}, ["kfp.resources={}", "kfp.resources.train.cpu=2"])
    assert data == {"kfp": {"resources": {"train": {"cpu": 2}}}}


def test_a_malformed_override_exits_2_before_any_work(tmp_path):
    out = flywheel(tmp_path, "data", "prepare", "train..lr=0.01", timeout=120)
    lines = nonblank(out.stderr)
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "override 'train..lr=0.01': empty name between dots" in lines[0]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------- strict profiles


def _profile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "train:\n  lr: 0.1\ntrain:\n  max_steps: 3\n",
            "key 'train' appears twice (lines 1 and 3)",
        ),
        ("train:\n  lr: 0.1\n  lr: 0.2\n", "key 'lr' appears twice (lines 2 and 3)"),
        ("train: {lr: 0.1, lr: 0.2}\n", "key 'lr' appears twice (lines 1 and 1)"),
    ],
)
def test_a_duplicate_key_names_the_key_and_both_lines(tmp_path, text, message):
    path = _profile(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert str(info.value) == f"{path}: {message}; the later one would replace the first"


def test_an_alias_bomb_fails_fast(tmp_path):
    laughs = ", ".join(["lol"] * 9)
    lines = [f"a0: &a0 [{laughs}]"]
    for i in range(1, 12):  # 9**12 strings if expanded
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    path = _profile(tmp_path, "\n".join(lines) + "\n")
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert time.monotonic() - start < 1.0
    assert str(info.value) == (
        f"{path}: line 2: YAML alias *a0 inside an anchored node; aliases may not nest"
    )


def test_too_many_aliases_are_refused():
    text = "a: &a 1\nb: [" + ", ".join(["*a"] * (MAX_ALIASES + 1)) + "]\n"
    with pytest.raises(ConfigError, match=f"more than {MAX_ALIASES} aliases"):
        load_yaml(text, "p.yaml")


def test_an_alias_and_a_merge_still_load_and_are_not_shared(tmp_path):
    """cluster.yaml shares a GPU pool's settings by an alias; an override of one task's copy
    must not change the other's."""
    prof = load_profile("configs/cluster.yaml", ["kfp.resources.evaluate-champion.cpu=3"])
    assert prof.kfp.resources["evaluate-champion"].cpu == "3"
    assert prof.kfp.resources["evaluate"].cpu != "3"  # one mapping, *eval-gpu, in cluster.yaml
    assert prof.kfp.resources["train"].node_selector == prof.kfp.resources["tune"].node_selector


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the profile is empty"),
        ("# only a comment\n", "the profile is empty"),
        ("[train]\n", "a profile must be a mapping of sections, got a list"),
        ("just words\n", "a profile must be a mapping of sections, got a str"),
        ("train:\n  lr: [unclosed\n", "not valid YAML"),
    ],
)
def test_an_empty_or_non_mapping_profile_is_an_error(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_profile(_profile(tmp_path, text))


# ------------------------------------------------------------ non-finite numbers


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ("gate.max_perplexity=.inf", "gate.max_perplexity: Input should be a finite number"),
        ("train.lr=.nan", "train.lr: Input should be a finite number"),
        ("drift.drift_share=-.inf", "drift.drift_share: Input should be a finite number"),
        ("gate.margins={bits_per_byte: .nan}", "gate.margins.bits_per_byte: Input should be a"),
        (
            "tune.search_space={lr: {type: float, low: 0.001, high: .inf}}",
            "tune.search_space.lr.high must be a finite number, got inf",
        ),
        (
            "tune.search_space={lr: {type: categorical, choices: [0.1, .nan]}}",
            "tune.search_space.lr: nan is not a valid train.lr (Input should be a finite number)",
        ),
    ],
)
def test_a_non_finite_number_is_refused_at_load(item, field):
    with pytest.raises(ConfigError) as info:
        load_profile(None, [item])
    assert field in str(info.value)
