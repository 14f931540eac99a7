"""Everything the training stage decides before a worker starts (no Ray, no DeepSpeed)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
from fixtures_data import build_dataset

from flywheel.config import CONFIG_DIR, load_profile
from flywheel.errors import ConfigError, DataError
from flywheel.train import plan as P
from flywheel.train import train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return build_dataset(
        tmp_path_factory.mktemp("train-plan") / "ds", block_size=32, vocab_size=300
    )


@pytest.fixture
def profile(state_dir):
    return load_profile(
        None, ["data.block_size=32", "model.context=32", "train.micro_batch_size=4"]
    )


def _ray_started() -> bool:
    import ray

    return ray.is_initialized()


# ------------------------------------------------------------------ batch sizes


def test_batch_sizes_multiply(profile):
    p = profile.model_copy(deep=True)
    p.train.grad_accum = 3
    assert P.batch_sizes(p) == (4, 3, 2, 24)


def test_non_dividing_global_batch_is_a_config_error_naming_fields(state_dir):
    with pytest.raises(ConfigError, match=r"train.global_batch_size \(30\) != micro_batch_size"):
        load_profile(None, ["train.global_batch_size=30"])


def test_non_dividing_global_batch_fails_in_train_before_ray(profile, dataset, tmp_path):
    # A profile built in code can skip the YAML validator; the plan checks again.
    bad = profile.model_copy(deep=True)
    object.__setattr__(bad.train, "global_batch_size", 30)
    with pytest.raises(ConfigError, match="global_batch_size"):
        train(bad, dataset, tmp_path / "m")
    assert not _ray_started()


# ------------------------------------------------------------- DeepSpeed config


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_shipped_deepspeed_json_fills_from_the_profile(state_dir, stage):
    p = load_profile(None, [f"train.zero_stage={stage}"])
    raw, source = P.load_deepspeed_json(p)
    assert source.endswith(f"zero{stage}.json")
    assert "auto" not in json.dumps(raw)
    cfg = P.deepspeed_config(p, raw, source)
    assert cfg["train_batch_size"] == 16
    assert cfg["train_micro_batch_size_per_gpu"] == 8
    assert cfg["gradient_accumulation_steps"] == 1
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["bf16"] == {"enabled": False}  # CPU profile: fp32
    assert "optimizer" not in cfg and "scheduler" not in cfg


def test_deepspeed_json_for_gpu_turns_on_bf16(state_dir):
    p = load_profile(None, ["train.scaling.use_gpu=true"])
    cfg = P.deepspeed_config(p, *P.load_deepspeed_json(p))
    assert cfg["bf16"]["enabled"] is True
    assert P.precision(p) == "bf16"


def test_deepspeed_json_auto_values_are_filled(profile):
    cfg = P.deepspeed_config(
        profile, {"train_batch_size": "auto", "gradient_clipping": "auto"}, "x.json"
    )
    assert cfg["train_batch_size"] == 8 and cfg["gradient_clipping"] == 1.0


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"train_batch_size": 64}, r"x.json: train_batch_size = 64 contradicts the profile"),
        ({"gradient_accumulation_steps": 4}, "train.grad_accum gives 1"),
        (
            {"zero_optimization": {"stage": 3}},
            r"zero_optimization.stage = 3 .*train.zero_stage gives 2",
        ),
        ({"fp16": {"enabled": True}}, "fp16.enabled"),
        ({"optimizer": {"type": "Adam"}}, "remove 'optimizer'"),
        ({"scheduler": {"type": "WarmupLR"}}, "remove 'scheduler'"),
    ],
)
def test_deepspeed_json_contradicting_the_profile(profile, raw, match):
    with pytest.raises(ConfigError, match=match):
        P.deepspeed_config(profile, raw, "x.json")


def test_zero_stage_alone_picks_the_packaged_json(state_dir, dataset):
    # Was a ConfigError at plan time: zero_stage=3 against the default zero2.json.
    p = load_profile(None, ["data.block_size=32", "model.context=32", "train.zero_stage=3"])
    plan = P.make_plan(p, dataset)
    assert plan.zero_stage == 3 and plan.deepspeed["zero_optimization"]["stage"] == 3
    assert plan.deepspeed_config_path.endswith("zero3.json")


def test_zero_stage_and_deepspeed_config_together_is_a_config_error(state_dir, tmp_path):
    own = tmp_path / "ds.json"
    own.write_text('{"zero_optimization": {"stage": 1}}')
    with pytest.raises(
        ConfigError, match=r"train.deepspeed_config: give train.zero_stage .* not both"
    ):
        load_profile(None, ["train.zero_stage=3", f"train.deepspeed_config={own}"])


def test_your_own_deepspeed_json_sets_the_stage(state_dir, dataset, tmp_path):
    own = tmp_path / "ds.json"
    own.write_text('{"zero_optimization": {"stage": 1}}')
    overrides = ["data.block_size=32", "model.context=32", "train.zero_stage=null"]
    p = load_profile(None, [*overrides, f"train.deepspeed_config={own}"])
    plan = P.make_plan(p, dataset)
    assert plan.zero_stage == 1 and plan.deepspeed_config_path == str(own)
    own.write_text('{"zero_optimization": {"stage": 5}}')
    with pytest.raises(ConfigError, match=r"ds.json: zero_optimization.stage must be 0, 1, 2 or 3"):
        P.make_plan(p, dataset)
    own.write_text("{}")  # no stage: DeepSpeed's default
    assert P.make_plan(p, dataset).zero_stage == 0


def test_deepspeed_json_missing_or_broken(profile, tmp_path):
    p = profile.model_copy(deep=True)
    p.train.zero_stage = None  # a file of your own sets the stage itself
    p.train.deepspeed_config = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match=r"train.deepspeed_config: .*not found"):
        P.load_deepspeed_json(p)
    (tmp_path / "bad.json").write_text("{not json")
    p.train.deepspeed_config = str(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match=r"bad.json: not valid JSON"):
        P.load_deepspeed_json(p)


def test_shipped_jsons_are_the_four_stages():
    assert sorted(f.name for f in (CONFIG_DIR / "deepspeed").glob("*.json")) == [
        f"zero{i}.json" for i in range(4)
    ]


# -------------------------------------------------------------------- schedule


def test_lr_factor_warmup_then_cosine_to_floor():
    f = [P.lr_factor(s, warmup=4, max_steps=20, schedule="cosine") for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(f[4:]))
    assert P.lr_factor(20, warmup=4, max_steps=20, schedule="cosine") == pytest.approx(0.1)


def test_lr_factor_linear_and_constant():
    assert P.lr_factor(10, warmup=0, max_steps=10, schedule="linear") == pytest.approx(0.1)
    assert P.lr_factor(5, warmup=0, max_steps=10, schedule="linear") == pytest.approx(0.55)
    assert P.lr_factor(7, warmup=2, max_steps=10, schedule="constant") == 1.0
    # Past max_steps (a continued run) the factor stays at the floor, never negative.
    assert P.lr_factor(50, warmup=0, max_steps=10, schedule="cosine") == pytest.approx(0.1)


# ---------------------------------------------------------------------- dataset


def test_inspect_dataset_reads_footers_and_tokenizer(dataset):
    info = P.inspect_dataset(dataset)
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert info.block_size == 32
    assert info.train_tokens == manifest["tokens"]["train"]
    assert info.vocab_size == manifest["vocab_size"]
    assert info.content_hash == manifest["content_hash"]
    assert info.eos_token_id is not None and len(info.train_files) == 2


def test_too_few_tokens_for_one_global_batch(state_dir, tmp_path):
    small = build_dataset(tmp_path / "small", block_size=32, vocab_size=300, max_train_blocks=7)
    p = load_profile(None, ["data.block_size=32", "model.context=32", "train.micro_batch_size=4"])
    with pytest.raises(
        DataError,
        match=r"224 training tokens \(7 blocks of 32\) is fewer than one global batch of 8",
    ):
        train(p, small, tmp_path / "m")
    assert not _ray_started()


def test_not_a_dataset(profile, tmp_path):
    with pytest.raises(DataError, match="not a prepared dataset"):
        train(profile, tmp_path, tmp_path / "m")


def test_block_size_longer_than_context(state_dir, dataset, tmp_path):
    p = load_profile(None, ["data.block_size=16", "model.context=16"])
    with pytest.raises(ConfigError, match=r"block_size \(32\) exceeds model.context \(16\)"):
        P.make_plan(p, dataset)


# ------------------------------------------------------------------------ model


def test_width_not_divisible_by_heads(state_dir, dataset, tmp_path):
    with pytest.raises(
        ConfigError, match=r"model.n_embd \(30\) must be divisible by model.n_head \(4\)"
    ):
        load_profile(None, ["model.n_embd=30", "model.n_head=4"])
    p = load_profile(None, ["data.block_size=32", "model.context=32"])
    object.__setattr__(p.model, "n_embd", 30)
    object.__setattr__(p.model, "n_head", 4)
    with pytest.raises(ConfigError, match=r"must be divisible by model.n_head"):
        train(p, dataset, tmp_path / "m")
    assert not _ray_started()


def test_llama_needs_even_head_width(state_dir, dataset):
    p = load_profile(
        None,
        [
            "data.block_size=32",
            "model.context=32",
            "model.arch=llama",
            "model.n_embd=18",
            "model.n_head=2",
        ],
    )
    with pytest.raises(ConfigError, match="even head width"):
        P.make_plan(p, dataset)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fresh_model_matches_the_profile_and_the_tokenizer(state_dir, dataset, arch):
    from flywheel.train.model import build_model

    p = load_profile(None, ["data.block_size=32", "model.context=32", f"model.arch={arch}"])
    plan = P.make_plan(p, dataset)
    model = build_model(p.model, plan.model_source, plan.dataset)
    assert model.config.model_type == arch
    assert model.get_input_embeddings().num_embeddings == plan.dataset.vocab_size
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64


def test_init_from_checks_vocab_and_positions(state_dir, dataset, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    p = load_profile(None, ["data.block_size=32", "model.context=32"])
    small = tmp_path / "small-vocab"
    GPT2LMHeadModel(
        GPT2Config(vocab_size=100, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    ).save_pretrained(small)
    with pytest.raises(ConfigError, match=r"init_from: the model's vocabulary \(100\) is smaller"):
        P.make_plan(p, dataset, init_from=str(small))
    short = tmp_path / "short"
    GPT2LMHeadModel(
        GPT2Config(vocab_size=400, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    ).save_pretrained(short)
    with pytest.raises(ConfigError, match="exceeds the model's 16 positions"):
        P.make_plan(p, dataset, init_from=str(short))
    with pytest.raises(ConfigError, match=r"init_from: .* is not a model directory"):
        P.make_plan(p, dataset, init_from=str(tmp_path / "missing"))
    ok = tmp_path / "ok"
    GPT2LMHeadModel(
        GPT2Config(vocab_size=400, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    ).save_pretrained(ok)
    assert P.make_plan(p, dataset, init_from=str(ok)).model_source.kind == "init_from"


def test_base_model_that_cannot_load_names_the_field(state_dir, dataset, tmp_path):
    # A missing path is refused when the profile loads (issue 10, case 6) ...
    with pytest.raises(ConfigError, match=r"model.base: path not found: /nowhere/model"):
        load_profile(None, ["model.base=/nowhere/model"])
    # ... a directory that holds no model, when the plan reads it.
    empty = tmp_path / "empty-model"
    empty.mkdir()
    p = load_profile(None, ["data.block_size=32", "model.context=32", f"model.base={empty}"])
    with pytest.raises(ConfigError, match=r"model.base: cannot load a model config from .*empty"):
        P.make_plan(p, dataset)


def test_plan_is_plain_data(profile, dataset):
    plan = P.make_plan(profile, dataset)
    again = P.TrainPlan.model_validate(json.loads(plan.model_dump_json()))
    assert again == plan
    assert plan.tokens_per_step == 8 * 32 and plan.backend == "gloo" and plan.precision == "fp32"
    assert math.isclose(plan.deepspeed["gradient_clipping"], 1.0)


def test_resume_from_without_a_checkpoint_fails_before_ray(profile, dataset, tmp_path):
    p = profile.model_copy(deep=True)
    p.train.resume_from = str(tmp_path)
    with pytest.raises(ConfigError, match=r"train.resume_from: no checkpoint"):
        train(p, dataset, tmp_path / "m")
    assert not _ray_started()


def test_tokenizer_match_is_recorded_for_a_warm_start(state_dir, dataset, tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    p = load_profile(None, ["data.block_size=32", "model.context=32"])
    same = tmp_path / "same"
    GPT2LMHeadModel(
        GPT2Config(vocab_size=300, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    ).save_pretrained(same)
    AutoTokenizer.from_pretrained(dataset / "tokenizer").save_pretrained(same)
    assert P.make_plan(p, dataset, init_from=str(same)).tokenizer_matches_model is True
    other_ds = build_dataset(tmp_path / "other", block_size=32, vocab_size=300, max_docs=60)
    other = tmp_path / "other-model"
    GPT2LMHeadModel(
        GPT2Config(vocab_size=300, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    ).save_pretrained(other)
    AutoTokenizer.from_pretrained(other_ds / "tokenizer").save_pretrained(other)
    assert P.make_plan(p, dataset, init_from=str(other)).tokenizer_matches_model is False
    assert P.make_plan(p, dataset).tokenizer_matches_model is None  # fresh model
