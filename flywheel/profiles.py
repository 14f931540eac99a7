"""Profile rewriting for one run: the run knobs and the warm-start policy applied to a
validated profile, each rewrite validated again (errors name the knob that caused it).

The stage runners (`flywheel.stages`) and the CLI's stage commands both start here, so a
pipeline step and `flywheel train` see the same profile for the same inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flywheel.config import Profile, validate_profile

# The profile crosses the KFP process boundary as a dict; errors in it name this.
PROFILE_PARAM = "pipeline parameter 'profile'"

# What `Dataset.save_to_disk` / `DatasetDict.save_to_disk` leave in a directory.
_HF_MARKERS = ("dataset_info.json", "dataset_dict.json")


def load(profile: dict[str, Any] | Profile) -> Profile:
    if isinstance(profile, Profile):
        return profile
    return validate_profile(profile, PROFILE_PARAM)


def with_data_location(profile: Profile, data_location: str) -> Profile:
    """The `data_location` run knob: a path, URI or dataset name replacing the profile's source.

    A directory or file means `files`; anything else is handed to `datasets` (`hf`), which
    accepts a save_to_disk path or a hub name. An s3:// or gs:// URI is looked at in its
    store (this is the step's first contact with it, so an unreadable store fails here,
    naming data_location): a save_to_disk layout means `hf`, other objects `files`; `prepare`
    copies them in. Empty keeps the profile's source.
    """
    from flywheel import storage

    if not data_location:
        return profile
    data = profile.model_dump()
    if storage.is_remote(data_location):
        url = profile.storage.endpoint_url
        storage.check_readable(data_location, "data_location", url)
        hf = any(storage.has_entry(data_location, n, "data_location", url) for n in _HF_MARKERS)
        kind = "hf" if hf else "files"
    else:
        if storage.is_uri(data_location):  # file:///abs/path -> /abs/path
            data_location = storage.parse(data_location, "data_location").path
        exists = Path(data_location).exists()
        kind = "files" if exists and not _is_hf_dir(data_location) else "hf"
    data["data"]["source"].update(kind=kind, path=data_location)
    return validate_profile(data, f"{PROFILE_PARAM} with data_location={data_location!r}")


def _is_hf_dir(path: str) -> bool:
    return any((Path(path) / name).exists() for name in _HF_MARKERS)


@contextlib.contextmanager
def staged_source(profile: Profile) -> Iterator[Profile]:
    """The profile with an s3:// or gs:// `data.source.path` copied to a local temporary
    directory (removed afterwards; file:// becomes its path), so the data stage's readers
    stay local-file readers. Pass the result to `record_source` to keep the URI."""
    from flywheel import storage

    uri = profile.data.source.path
    if uri is None or not storage.is_uri(uri):
        yield profile
        return
    with storage.staged(uri, "data.source.path", profile.storage.endpoint_url) as local:
        data = profile.model_dump()
        data["data"]["source"]["path"] = local
        yield validate_profile(data, PROFILE_PARAM)


def record_source(dataset_dir: str | Path, source: str | None) -> None:
    """The manifest names where the corpus lives (a URI), not the temporary copy read."""
    from flywheel import storage
    from flywheel.artifacts import MANIFEST, DatasetManifest

    if source is None or not storage.is_remote(source):
        return
    if not (Path(dataset_dir) / MANIFEST).is_file():
        return
    manifest = DatasetManifest.read(dataset_dir)
    manifest.config.get("source", {})["path"] = source
    manifest.write(dataset_dir)


def with_params(profile: Profile, params: dict[str, Any] | None) -> Profile:
    """Merge tuned parameters (train field -> value) into the training config."""
    if not params:
        return profile
    data = profile.model_dump()
    data["train"].update(params)
    return validate_profile(data, f"{PROFILE_PARAM} with tuned params {params}")


def champion_model_dir(profile: Profile) -> Path | None:
    """The warm-start policy: the champion's model, downloaded (the registry's cache), when
    the profile warm-starts and a champion exists; else None (train from the base/fresh).
    `model.warm_start_from: adapter`: model.base plus the champion's adapter instead."""
    if not profile.model.warm_start:
        return None
    from flywheel.registry import CHAMPION, Registry

    registry = Registry(profile)
    if registry.champion() is None:
        return None
    if profile.model.warm_start_from == "adapter":  # model.base + the champion's adapter
        from flywheel.train.model import champion_on_base

        return champion_on_base(profile, registry)
    return registry.download(CHAMPION)


def with_champion_tokenizer(profile: Profile) -> Profile:
    """A run that will warm-start from the champion tokenizes with the champion's tokenizer.

    The data stage otherwise trains a fresh BPE every run, and a warm-started model would
    read token ids that now mean other strings. An explicit `data.tokenizer.base` wins.
    """
    if profile.data.tokenizer.base is not None:
        return profile
    champion = champion_model_dir(profile)
    if champion is None:
        return profile
    data = profile.model_dump()
    data["data"]["tokenizer"]["base"] = str(champion)
    return validate_profile(data, f"{PROFILE_PARAM} with the champion's tokenizer")
