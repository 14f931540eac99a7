"""What a stage command uses when the user names nothing: the newest prepared dataset in the
state directory, and the registry's champion.

A new user runs `flywheel data prepare` and then `flywheel train`; asking them to copy a
content-hash path between the two is friction with no safety in it, as long as the command
says which dataset it took. Nothing here creates the state directory: looking is free.
"""

from __future__ import annotations

from pathlib import Path

from flywheel.artifacts import MANIFEST
from flywheel.config import Profile
from flywheel.errors import DataError, RegistryError

# Under the state directory: where `flywheel data prepare` puts datasets by content hash.
DATASETS = "datasets"


def newest_dataset(store: Path) -> Path | None:
    """The prepared dataset in `store` whose manifest was written last, or None.

    A prepared dataset is a directory with a manifest (the data stage writes it last, so
    its time is when the dataset was finished). Hidden entries are the stage's working
    directories and a failed run's reports have no manifest: neither is a candidate. The
    same hash prepared again is replaced in place, so it counts as new again. Ties (a
    coarse file-system clock) go to the name, so the answer never depends on listing order.
    """
    if not store.is_dir():
        return None
    found: list[tuple[int, str, Path]] = []
    for entry in store.iterdir():
        manifest = entry / MANIFEST
        if entry.name.startswith(".") or not entry.is_dir() or not manifest.is_file():
            continue
        found.append((manifest.stat().st_mtime_ns, entry.name, entry))
    return max(found)[2] if found else None


def default_dataset(profile: Profile) -> Path:
    """The newest prepared dataset in the profile's state directory, or a DataError saying
    how to make one."""
    store = profile.state_root() / DATASETS
    found = newest_dataset(store)
    if found is None:
        raise DataError(
            f"no prepared dataset in {store}; run `flywheel data prepare` first, or pass --data DIR"
        )
    return found


def default_model(profile: Profile) -> tuple[str, str]:
    """The champion's registry URI and version, or a RegistryError saying there is none."""
    from flywheel.registry import Registry

    registry = Registry(profile)
    champion = registry.champion()
    uri = registry.champion_uri()
    if champion is None or uri is None:
        raise RegistryError(
            f"{registry.name} has no champion at {registry.uri}; name a model directory "
            "or promote a version (`flywheel models promote V`)"
        )
    return uri, champion.version
