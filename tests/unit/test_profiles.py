"""Profile rewriting for one run (flywheel.profiles) and the tuning study per dataset."""

from __future__ import annotations

from flywheel import profiles
from flywheel.config import Profile, load_profile
from flywheel.tune.space import dataset_study


def test_one_study_per_dataset_and_the_same_data_resumes_it():
    p = Profile()
    a = dataset_study(p, "a" * 64)
    assert a.tune.study_name == f"{p.tune.study_name}-{'a' * 12}"
    assert dataset_study(p, "a" * 64).tune.study_name == a.tune.study_name
    assert dataset_study(p, "b" * 64).tune.study_name != a.tune.study_name
    assert p.tune.study_name != a.tune.study_name  # the input profile is left alone


def test_no_warm_start_without_a_champion_or_when_the_profile_says_so(state_dir):
    assert profiles.champion_model_dir(load_profile(None, ["model.warm_start=false"])) is None
    fresh = load_profile(None, [])
    assert fresh.model.warm_start and profiles.champion_model_dir(fresh) is None
    assert profiles.with_champion_tokenizer(fresh) is fresh


def test_load_takes_the_pipeline_dict_or_a_profile():
    p = Profile()
    assert profiles.load(p) is p
    assert profiles.load(p.to_param()) == p
