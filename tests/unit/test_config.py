"""Every profile in configs/ loads; bad profiles fail naming the file and field."""

from pathlib import Path

import pytest

from flywheel.config import CONFIG_DIR, apply_overrides, load_profile, parse_override
from flywheel.errors import ConfigError

PROFILES = sorted(p for p in CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_every_profile_loads(path: Path):
    profile = load_profile(path)
    assert profile.train.effective_global_batch >= 1


def test_every_profile_opens_with_a_run_comment():
    for path in PROFILES:
        first = path.read_text().splitlines()[0]
        assert first.startswith("#"), (
            f"{path.name} should open with a comment showing how to run it"
        )


def test_overrides_are_typed():
    p = load_profile(None, ["train.lr=1e-4", "train.scaling.num_workers=1", "tune.enabled=false"])
    assert p.train.lr == pytest.approx(1e-4)
    assert p.train.scaling.num_workers == 1
    assert p.tune.enabled is False


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.lrr=1", "train.lrr: unknown field"),
        ("train.lr=-1", "train.lr"),
        ("model.n_head=3", "divisible by model.n_head"),
        ("data.dedup.bands=7", "data.dedup.bands must divide"),
        ("train.global_batch_size=7", "train.global_batch_size (7)"),
        ("ray.mode=address", "ray.address is not set"),
        ("data.block_size=4096", "exceeds model.context"),
        ("tune.search_space.nope={type: float, low: 0, high: 1}", "tune.search_space.nope"),
    ],
)
def test_bad_values_name_file_and_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_profile(None, [override])
    assert "local.yaml" in str(err.value)
    assert field in str(err.value)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_profile(bad)
    with pytest.raises(ConfigError, match="profile not found"):
        load_profile(tmp_path / "absent.yaml")


def test_override_syntax():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    with pytest.raises(ConfigError, match=r"expected dotted\.key=value"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match="is not a section"):
        apply_overrides({"train": 3}, ["train.lr=1"])


def test_state_path_is_under_cwd_not_package(state_dir):
    p = load_profile()
    path = p.state_path("mlflow")
    assert path.is_dir()
    assert str(path).startswith(str(state_dir.parent))
    assert "site-packages" not in str(path)


def test_test_modules_have_unique_basenames():
    # pytest's default (prepend) import mode imports test files by basename: a second
    # tests/*/test_x.py shadows the first and the whole session fails to collect.
    tests = Path(__file__).resolve().parents[1]
    names = [p.name for p in tests.rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_a_base_path_on_a_pvc_the_pods_mount_is_not_checked_here():
    """/models exists only inside the pods that mount the claim; everywhere else a missing
    path is still a profile error naming the field."""
    pvc = "kfp.kubernetes.pvcs=[{name: hf-cache, mount_path: /models}]"
    assert load_profile(None, ["model.base=/models/llama", pvc]).model.base == "/models/llama"
    with pytest.raises(ConfigError, match=r"model\.base: path not found: /elsewhere/llama"):
        load_profile(None, ["model.base=/elsewhere/llama", pvc])


@pytest.mark.parametrize("fmt", ["instruction", "chat"])
def test_a_record_format_loads_now_the_data_stage_reads_it(fmt):
    """The data stage hands instruction/chat to flywheel.sft.stage (it was refused before)."""
    assert load_profile(None, [f"data.format={fmt}"]).data.format == fmt
    with pytest.raises(ConfigError, match=r"data\.format"):
        load_profile(None, ["data.format=xml"])
