"""Which Kubeflow Pipelines backend a profile's compiled pipelines need, and the check of a
server's version against it. Pure: nothing here talks to a server.

A KFP API server parses each executor's platform config (the compiled YAML's
`platforms.kubernetes.deploymentSpec.executors`) strictly against the
`kubernetes_executor_config.proto` of its own release: a field its protos lack is refused at
`POST /runs` (kubeflow/pipelines#12495). So the minimum is a property of what kfp-kubernetes
writes, not of what the SDK can express. `FEATURES` lists what our YAML uses and the first
backend release that accepts each; tests/unit/test_backend_protos.py parses every shipped
profile's YAML strictly against the protos of the release `required_backend` names, and shows
that the release before it refuses today's output.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from flywheel.config import Profile

Version = tuple[int, int, int]

# The oldest backend Flywheel supports (README "On a cluster"): kfp-kubernetes 2.17 writes
# `optional` into every secretAsEnv entry, which 2.14's strict parse refuses. Nothing older is
# tested: a profile never needs less than this, even one that names no Secret.
MIN_BACKEND = "2.15.0"

_TAG = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")


def parse_version(tag: str | None) -> Version | None:
    """A release tag ("2.15.0", "v2.15.0") as a comparable tuple; None for anything else (a
    dev build reports "unknown" or a `git describe` string, a pre-release has a suffix)."""
    m = _TAG.fullmatch((tag or "").strip())
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def _version(tag: str) -> Version:
    parsed = parse_version(tag)
    if parsed is None:
        raise ValueError(f"not a release version: {tag!r}")
    return parsed


@dataclass(frozen=True)
class Feature:
    """Something the compiled YAML uses, the first backend release that accepts it, and why."""

    name: str
    since: str  # first backend release that accepts it
    ref: str  # the upstream change or report
    used: Callable[[Profile], bool]  # does this profile's YAML use it?

    @property
    def version(self) -> Version:
        return _version(self.since)

    def describe(self) -> str:
        return f"{self.name} ({self.since}, {self.ref})"


def _always(_profile: Profile) -> bool:
    return True


def _tolerations(profile: Profile) -> bool:
    return any(r.tolerations for r in profile.kfp.resources.values())


def _secrets(profile: Profile) -> bool:
    return bool(profile.kfp.kubernetes.secrets)


def _pvc_sub_path(profile: Profile) -> bool:
    return any(p.sub_path for p in profile.kfp.kubernetes.pvcs)


FEATURES: tuple[Feature, ...] = (
    Feature(
        "dsl.OneOf over the tuned/untuned branch outputs (sub-DAG output resolution)",
        "2.5.0",
        "kubeflow/pipelines#11196",
        _always,
    ),
    Feature(
        "the job-id placeholder resolved by the driver",
        "2.5.0",
        "kubeflow/pipelines#11599",
        _always,
    ),
    Feature(
        "toleration lists (kfp.resources.<task>.tolerations)",
        "2.5.0",
        "kubernetes_executor_config.proto Toleration",
        _tolerations,
    ),
    Feature(
        "the exit handler's PipelineTaskFinalStatus input (the run summary)",
        "2.14.0",
        "kubeflow/pipelines#11953",
        _always,
    ),
    Feature(
        "secretAsEnv.optional, which kfp-kubernetes 2.17 writes for every Secret",
        "2.15.0",
        "kubeflow/pipelines#12495",
        _secrets,
    ),
    Feature(
        "a PVC sub_path (kfp.kubernetes.pvcs[].sub_path)",
        "2.16.0",
        "kubeflow/pipelines#11832",
        _pvc_sub_path,
    ),
)


@dataclass(frozen=True)
class Requirement:
    """The backend a profile's pipelines need: `version` or newer, and the features in use."""

    version: str
    features: tuple[Feature, ...]

    def newer_than(self, server: Version) -> tuple[Feature, ...]:
        """The features in use that a server of version `server` lacks."""
        return tuple(f for f in self.features if f.version > server)


def _show(version: Version) -> str:
    return ".".join(map(str, version))


def required_backend(profile: Profile) -> Requirement:
    """The oldest backend that runs what `profile` compiles to: MIN_BACKEND, or newer where the
    profile opts into a newer feature (a PVC sub_path needs 2.16.0)."""
    used = tuple(f for f in FEATURES if f.used(profile))
    newest = max([_version(MIN_BACKEND), *(f.version for f in used)])
    return Requirement(_show(newest), used)


@dataclass(frozen=True)
class BackendVerdict:
    """What to do about a server: refuse (`refusal` set), warn (`warning` set) or go on."""

    refusal: str | None = None
    warning: str | None = None


def check_backend(host: str, tag_name: str | None, need: Requirement) -> BackendVerdict:
    """A server reporting `tag_name` against what the profile needs. An older release is
    refused in one line naming both versions and the features it lacks; a tag that is not a
    release (a dev build says "unknown", or nothing) cannot be compared: a warning."""
    server = parse_version(tag_name)
    if server is None:
        # what the server wrote, kept to one short line
        said = " ".join((tag_name or "").split())[:60]
        shown = f"version '{said}'" if said else "no version (no tag_name in healthz)"
        return BackendVerdict(
            warning=f"Kubeflow Pipelines at {host} reports {shown}, not a release: cannot check "
            f"that it is {need.version} or newer, which this profile needs; going on"
        )
    if server >= _version(need.version):
        return BackendVerdict()
    lacking = need.newer_than(server)
    why = "; ".join(f.describe() for f in lacking) or f"Flywheel supports {MIN_BACKEND} and newer"
    return BackendVerdict(
        refusal=f"Kubeflow Pipelines at {host} is {_show(server)}; this profile needs "
        f"{need.version} or newer: {why}. Upgrade the backend (README 'On a cluster')"
    )
