"""The compiled YAML parses strictly against the protos of the Kubeflow Pipelines backend its
profile needs: rung 1 of DESIGN.md "How a cluster claim is proven here".

A KFP API server unmarshals each executor's platform config with strict protojson, against the
`kubernetes_executor_config.proto` of its own release: a field those protos lack is refused at
`POST /runs` (kubeflow/pipelines#12495). Here the protos of each release
(`../shared/contracts/kfp-protos/<tag>/`, read in place, never copied into the project) are
compiled with grpcio-tools' protoc into descriptor sets, each loaded into a descriptor pool of
its own (kfp's generated modules hold the same proto names in the default pool), and every
compiled pipeline of every shipped profile is parsed with
`json_format.ParseDict(..., ignore_unknown_fields=False)`: the pipeline spec, its deployment
config, the platform spec and each executor's `KubernetesExecutorConfig`, against the release
`flywheel.kfp.backend.required_backend` names for the profile. And the release before the
minimum refuses today's output, which is why the minimum is what it is.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from flywheel.config import CONFIG_DIR, load_profile
from flywheel.kfp.backend import MIN_BACKEND, parse_version, required_backend
from flywheel.kfp.compile import available, compile_pipeline

PROTO_FILES = ("pipeline_spec.proto", "kubernetes_executor_config.proto")
SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
# Not shipped: the cluster profile with a claim mounted at a sub_path, the one opt-in feature
# that raises the backend a profile needs (to 2.16.0).
SUB_PATH = "kfp.kubernetes.pvcs=[{name: hf-cache, mount_path: /models, sub_path: lm}]"
PROFILES = {name: (CONFIG_DIR / f"{name}.yaml", []) for name in SHIPPED}
PROFILES["cluster+sub_path"] = (CONFIG_DIR / "cluster.yaml", [SUB_PATH])


@dataclass(frozen=True)
class Protos:
    """One release's messages, in a descriptor pool of their own."""

    tag: str
    pool: object

    def parse(self, doc: dict, message: str) -> None:
        """Strictly, as the backend's protojson.Unmarshal does: an unknown field raises."""
        from google.protobuf import json_format, message_factory

        cls = message_factory.GetMessageClass(self.pool.FindMessageTypeByName(message))
        json_format.ParseDict(doc, cls(), ignore_unknown_fields=False)


def _compile_protos(src: Path, out: Path) -> Protos:
    import grpc_tools
    from google.protobuf import descriptor_pb2, descriptor_pool

    # google/protobuf/*.proto come with grpc_tools; google/rpc/status.proto (an import of
    # pipeline_spec.proto) ships beside the release's protos in the contracts.
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    descriptors = out / f"{src.name}.pb"
    proc = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{src}", f"-I{well_known}",
         "--include_imports", f"--descriptor_set_out={descriptors}", *PROTO_FILES],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, f"protoc on {src}: {proc.stderr}"
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(descriptors.read_bytes()).file:
        pool.Add(file)
    return Protos(src.name, pool)


@pytest.fixture(scope="module")
def protos(contracts_dir, tmp_path_factory) -> dict[str, Protos]:
    """Release tag -> its compiled protos, oldest first; compiled once per module."""
    pytest.importorskip(
        "grpc_tools",
        reason="grpcio-tools is not installed (the dev lock pins it): cannot compile the KFP protos",
    )
    root = contracts_dir / "kfp-protos"
    tags = [
        d.name
        for d in (root.iterdir() if root.is_dir() else [])
        if parse_version(d.name) and all((d / f).is_file() for f in PROTO_FILES)
    ]
    if not tags:
        pytest.skip(f"no KFP release protos under {root} (shared/contracts is incomplete)")
    out = tmp_path_factory.mktemp("kfp-protos")
    return {t: _compile_protos(root / t, out) for t in sorted(tags, key=parse_version)}


def _release(protos: dict[str, Protos], version: str) -> Protos:
    """The protos of `version`, or else of the oldest release after it that is here."""
    for tag, compiled in protos.items():
        if parse_version(tag) >= parse_version(version):
            return compiled
    pytest.skip(f"no KFP protos for {version} or newer in shared/contracts/kfp-protos")


def _release_before(protos: dict[str, Protos], version: str) -> Protos:
    older = [c for t, c in protos.items() if parse_version(t) < parse_version(version)]
    if not older:
        pytest.skip(f"no KFP protos older than {version} in shared/contracts/kfp-protos")
    return older[-1]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, tuple[object, dict[str, list[dict]]]]:
    """Profile name -> (profile, pipeline name -> YAML documents of its compiled file)."""
    out: dict[str, tuple[object, dict[str, list[dict]]]] = {}
    for name, (path, overrides) in PROFILES.items():
        profile = load_profile(path, overrides)
        where = tmp_path_factory.mktemp(name.replace("+", "-"))
        out[name] = (
            profile,
            {
                pipeline: list(
                    yaml.safe_load_all(compile_pipeline(pipeline, profile, where).read_text())
                )
                for pipeline in available()
            },
        )
    return out


def _strict_errors(protos: Protos, docs: list[dict]) -> list[str]:
    """Every message of one compiled file that `protos`' release refuses, with its place."""
    from google.protobuf import json_format

    spec = docs[0]
    parts = [
        ("pipeline spec", spec, "ml_pipelines.PipelineSpec"),
        ("deploymentSpec", spec["deploymentSpec"], "ml_pipelines.PipelineDeploymentConfig"),
    ]
    if len(docs) > 1:
        parts.append(("platform spec", docs[1], "ml_pipelines.PlatformSpec"))
        executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        for label, config in executors.items():
            parts.append((label, config, "kfp_kubernetes.KubernetesExecutorConfig"))
    errors = []
    for where, doc, message in parts:
        try:
            protos.parse(doc, message)
        except json_format.ParseError as exc:
            errors.append(f"{where}: {' '.join(str(exc).split())}")
    return errors


def _executors(docs: list[dict]) -> dict:
    return (
        docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    )


@pytest.mark.parametrize("name", list(PROFILES))
def test_every_pipeline_parses_strictly_on_the_backend_its_profile_needs(protos, compiled, name):
    profile, pipelines = compiled[name]
    need = required_backend(profile)
    release = _release(protos, need.version)
    if need.version == MIN_BACKEND:
        # The README's minimum itself, not a newer release standing in for it.
        assert release.tag == MIN_BACKEND, f"no protos for the minimum {MIN_BACKEND}"
    for pipeline, docs in pipelines.items():
        assert _strict_errors(release, docs) == [], (name, pipeline, release.tag)
    if profile.kfp.kubernetes.secrets:
        # not vacuous: the settings are in the YAML, one KubernetesExecutorConfig per task
        assert all(len(_executors(docs)) > 5 for docs in pipelines.values()), name


def test_the_release_before_the_minimum_refuses_todays_output(protos, compiled):
    """Why the minimum is 2.15.0: kfp-kubernetes 2.17 writes `optional` into every
    secretAsEnv entry; 2.14.0's SecretAsEnv has no such field, so its API server refuses
    POST /runs for every pipeline of the cluster profile (kubeflow/pipelines#12495)."""
    before = _release_before(protos, MIN_BACKEND)
    _, pipelines = compiled["cluster"]
    for pipeline, docs in pipelines.items():
        errors = _strict_errors(before, docs)
        refused = [e for e in errors if 'SecretAsEnv" has no field named "optional"' in e]
        assert refused, (before.tag, pipeline, errors)
        # every executor that gets a Secret, and nothing else
        assert (
            len(refused)
            == len(errors)
            == sum(1 for cfg in _executors(docs).values() if cfg.get("secretAsEnv"))
        )


def test_a_pvc_sub_path_needs_2_16_and_the_minimum_refuses_it(protos, compiled):
    profile, pipelines = compiled["cluster+sub_path"]
    assert required_backend(profile).version == "2.16.0"
    before = _release_before(protos, "2.16.0")
    assert parse_version(before.tag) >= parse_version(MIN_BACKEND)
    for pipeline, docs in pipelines.items():
        errors = _strict_errors(before, docs)
        assert errors, (before.tag, pipeline)
        assert all('PvcMount" has no field named "subPath"' in e for e in errors), errors
