"""Pure pieces of tuning: the search space as Optuna distributions, the profile one trial
trains with, the early-stopping schedule, where the study is stored.

No Ray, no MLflow: everything here is checked by unit tests in milliseconds, and every
error names the profile field (`tune.search_space.<name>...`).
"""

from __future__ import annotations

import math
from typing import Any

from flywheel.config import Profile, validate_profile
from flywheel.errors import ConfigError

DB_FILE = "optuna.db"


def distributions(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`tune.search_space` as Optuna distributions (what `study.ask` samples from)."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out: dict[str, Any] = {}
    for name, spec in space.items():
        field = f"tune.search_space.{name}"
        kind = spec.get("type")
        unknown = set(spec) - {"type", "low", "high", "log", "step", "choices"}
        if unknown:
            raise ConfigError(f"{field}: unknown key(s) {sorted(unknown)}")
        try:
            if kind == "categorical":
                out[name] = CategoricalDistribution(list(spec["choices"]))
            elif kind == "int":
                out[name] = IntDistribution(
                    int(spec["low"]),
                    int(spec["high"]),
                    log=bool(spec.get("log", False)),
                    step=int(spec.get("step", 1)),
                )
            else:
                step = spec.get("step")
                out[name] = FloatDistribution(
                    float(spec["low"]),
                    float(spec["high"]),
                    log=bool(spec.get("log", False)),
                    step=None if step is None else float(step),
                )
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"{field}: {exc}") from None
    return out


def plain(value: Any) -> Any:
    """A JSON-ready Python scalar (Optuna may hand back numpy types)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and value.is_integer() and not math.isinf(value):
        return value  # keep floats as floats: lr=0.001 must not become an int
    return value


def trial_profile(profile: Profile, params: dict[str, Any], field: str = "params") -> Profile:
    """The profile one trial trains with: the sampled params on a short, single-worker run.

    - max_steps = tune.trial_steps: a trial is the same training code on a step budget.
    - one worker: `tune.parallel` trials then fit where one full run fits (2 CPUs here);
      the global batch shrinks with it, which is the usual trade of tuning on a proxy run.
    - warmup is clamped to the trial's steps (the full run keeps the sampled value).
    - one checkpoint, at the end (a trial's loss reaches the study through the loop's
      validation reports, not through checkpoints), and an MLflow flush at every rung
      spacing, so a trial stopped at a rung has its losses on record.
    - max_failures 0: a trial that dies is a failed trial, not one to restart.
    - state_dir absolute, as resolved now: Ray Train workers run in their own working
      directories, where a relative path would not find it.
    """
    t = profile.tune
    data = profile.model_dump()
    train = data["train"]
    train.update({k: plain(v) for k, v in params.items()})
    steps = t.trial_steps
    grace, _ = asha_schedule(steps)
    train.update(
        max_steps=steps,
        warmup_steps=min(int(train["warmup_steps"]), steps),
        checkpoint_every=steps,
        keep_checkpoints=1,
        max_failures=0,
        log_every=min(int(train["log_every"]), grace),
        resume_from=None,
        global_batch_size=None,
    )
    train["scaling"]["num_workers"] = 1
    # A trial searches nothing, and its train section is trial-sized: the study's bounds
    # (checked against the full run when the profile loaded) do not apply to it.
    data["tune"]["search_space"] = {}
    data["state_dir"] = str(profile.state_root())
    return validate_profile(data, f"tune trial with {field} {params}")


def check_space(profile: Profile) -> dict[str, Any]:
    """Distributions for the profile's space, after checking that every bound and choice
    makes a valid training profile, so a bad space fails before any trial starts.

    Two profiles per value: a trial's (short, one worker) and the full run's, which trains
    with the best value found (a warmup_steps bound above train.max_steps would pass every
    trial, warmup clamped, and fail the training after the study). Each value alone was
    checked against its train field when the profile loaded.
    """
    dists = distributions(profile.tune.search_space)
    for name, spec in profile.tune.search_space.items():
        values = spec["choices"] if spec["type"] == "categorical" else [spec["low"], spec["high"]]
        for value in values:
            full = profile.model_dump()
            full["train"][name] = plain(value)
            try:
                trial_profile(profile, {name: value}, f"tune.search_space.{name}")
                validate_profile(full, "the full training run")
            except ConfigError as exc:
                raise ConfigError(f"tune.search_space.{name} = {value!r}: {exc}") from None
    return dists


def asha_schedule(trial_steps: int) -> tuple[int, int]:
    """(grace period, reduction factor) for ASHA over `trial_steps` optimizer steps.

    Grace = a quarter of the budget: earlier than that, a tiny model's loss mostly says how
    high its learning rate is, not how well it will end. Reduction factor 2 with that grace
    gives rungs at 1/4 and 1/2 of the budget (2 and 4 of 8 steps): two chances to stop a
    weak trial, where Ray's default of 4 would leave one.
    """
    return max(1, trial_steps // 4), 2


def dataset_study(profile: Profile, data_hash: str) -> Profile:
    """One study per prepared dataset: a retrain on new data starts a fresh study instead of
    taking "best" over trials that saw other data; the same data resumes its study."""
    data = profile.model_dump()
    data["tune"]["study_name"] = f"{profile.tune.study_name}-{data_hash[:12]}"
    return validate_profile(data, f"tune.study_name for dataset {data_hash[:12]}")


def storage_url(profile: Profile) -> str:
    """tune.storage (an RDB URL on a cluster), else SQLite under the state directory."""
    if profile.tune.storage:
        return profile.tune.storage
    return f"sqlite:///{profile.state_path('optuna') / DB_FILE}"


def masked(url: str) -> str:
    """The storage URL without its password, for logs, MLflow params and results."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url
