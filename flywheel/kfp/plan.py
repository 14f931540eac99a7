"""What a submit or schedule sends to Kubeflow Pipelines (API v2beta1), decided before
connecting. Pure: nothing here talks to a server.

`submit_spec` / `schedule_spec` turn a profile and a compiled package into a `RunSpec`:
the content-named upload, the experiment, the run's name and only the parameters the
pipeline declares (the server rejects unknown ones). `flywheel.kfp.client` sends a spec
through `kfp.Client`; `plan_submit`, `plan_schedule` and `plan_recurring_action` list the
requests that sending it makes - method, path, query, body, the condition under which each
is sent and what the client checks in the answer - which is what ``--dry-run`` prints. A
test sends the same spec through the real client to the spec-checking stand-in and holds the
two side by side, so the plan cannot drift from what is sent. Ids the server assigns appear as ``{pipeline_id}``...
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from flywheel.config import Profile
from flywheel.errors import ConfigError
from flywheel.kfp.backend import Requirement, required_backend

DIGEST_TAG = "sha256:"
API_PREFIX = "/apis/v2beta1"  # every path of the v2beta1 REST API starts here
PAGE_SIZE = 100  # list pages the client asks for


@dataclass(frozen=True)
class PlannedRequest:
    """One HTTP request a command would send, as a dry run shows it. Query values are
    strings, as on the wire; `when` says under what condition it is sent (None: always);
    `checks` what the client refuses in the answer before sending anything else."""

    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    body: Any = None
    when: str | None = None
    checks: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "path": self.path}
        if self.query:
            out["query"] = self.query
        if self.body is not None:
            out["body"] = self.body
        if self.when:
            out["when"] = self.when
        if self.checks:
            out["checks"] = self.checks
        return out


@dataclass(frozen=True)
class Upload:
    """A compiled package as it is uploaded: named and described by its content."""

    package: Path
    pipeline_name: str
    digest: str

    @property
    def version_name(self) -> str:
        return version_name_for(self.pipeline_name, self.digest)

    @property
    def description(self) -> str:
        return f"flywheel {self.pipeline_name} {DIGEST_TAG}{self.digest}"


@dataclass(frozen=True)
class RunSpec:
    """Everything a run or recurring run sends, decided before connecting; the real path
    and the dry-run plan both read it. `cron` set: a recurring run."""

    upload: Upload
    experiment: str
    name: str
    parameters: dict[str, Any]
    service_account: str | None = None
    cron: str | None = None  # KFP's 6-field form
    max_concurrency: int = 1
    no_catchup: bool = True
    # The backend the package needs (flywheel.kfp.backend), checked against the server's
    # version before anything is uploaded; None: not checked.
    backend: Requirement | None = None


def package_digest(package: Path) -> str:
    return hashlib.sha256(Path(package).read_bytes()).hexdigest()


def version_name_for(pipeline_name: str, digest: str) -> str:
    return f"{pipeline_name}-{digest[:12]}"


def declared_parameters(package: Path) -> dict[str, dict[str, Any]]:
    """The root input parameters of a compiled pipeline (IR YAML). A pipeline with
    Kubernetes settings has a second YAML document, the platform spec, after the first."""
    try:
        docs = list(yaml.safe_load_all(Path(package).read_bytes().decode("utf-8")))
        doc = docs[0] if docs else None
    except UnicodeDecodeError:
        raise ConfigError(f"{package}: not a pipeline YAML (not UTF-8 text)") from None
    except OSError as exc:
        raise ConfigError(f"{package}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        why = " ".join(str(exc).split())
        raise ConfigError(f"{package}: not a readable pipeline YAML ({why})") from None
    spec = doc.get("pipeline_spec", doc) if isinstance(doc, dict) else None
    if not isinstance(spec, dict) or "root" not in spec:
        raise ConfigError(f"{package}: not a compiled pipeline (no 'root' in the IR YAML)")
    return spec["root"].get("inputDefinitions", {}).get("parameters", {}) or {}


def run_parameters(
    declared: dict[str, Any],
    profile: Profile,
    trigger_reason: str,
    data_location: str | None,
) -> dict[str, Any]:
    offered: dict[str, Any] = {
        "profile": profile.model_dump(mode="json"),
        "trigger_reason": trigger_reason,
    }
    if data_location:
        # retrain calls it data_location, monitor calls it window: same knob, where the data is
        offered["data_location"] = offered["window"] = data_location
    return {k: v for k, v in offered.items() if k in declared}


def eq_filter(key: str, value: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": key, "string_value": value}]})


def upload_for(pipeline: str, package: Path) -> Upload:
    return Upload(Path(package), f"flywheel-{pipeline}", package_digest(package))


def submit_spec(
    profile: Profile,
    pipeline: str,
    package: Path,
    *,
    experiment: str | None = None,
    trigger_reason: str = "manual",
    data_location: str | None = None,
    run_name: str | None = None,
) -> RunSpec:
    """What one run of a compiled pipeline sends (see `submit`)."""
    params = run_parameters(declared_parameters(package), profile, trigger_reason, data_location)
    return RunSpec(
        upload=upload_for(pipeline, package),
        experiment=experiment or profile.kfp.experiment,
        name=run_name or f"{pipeline}-{time.strftime('%Y%m%d-%H%M%S')}",
        parameters=params,
        # The pods run as this account (RBAC for Secrets, PVCs, the Ray cluster); None: the
        # namespace's default pipeline runner.
        service_account=profile.kfp.kubernetes.service_account,
        backend=required_backend(profile),
    )


def schedule_spec(
    profile: Profile,
    pipeline: str,
    package: Path,
    cron: str,
    *,
    name: str | None = None,
    experiment: str | None = None,
    trigger_reason: str = "schedule",
    data_location: str | None = None,
    max_concurrency: int = 1,
    catchup: bool = False,
) -> RunSpec:
    """What a recurring run on a standard 5-field cron schedule sends (see `schedule`)."""
    from flywheel.kfp.cron import to_kfp_cron

    kfp_cron = to_kfp_cron(cron)  # invalid cron fails before anything is uploaded
    if not 1 <= max_concurrency <= 10:
        raise ConfigError(f"max concurrency {max_concurrency}: Kubeflow accepts 1 to 10")
    run = submit_spec(
        profile,
        pipeline,
        package,
        experiment=experiment,
        trigger_reason=trigger_reason,
        data_location=data_location,
        run_name=name or f"flywheel-{pipeline}",
    )
    return replace(run, cron=kfp_cron, max_concurrency=max_concurrency, no_catchup=not catchup)


# ---------------------------------------------------------------- the plans


def _p(path: str) -> str:
    return API_PREFIX + path


def _ns(namespace: str | None) -> dict[str, str]:
    return {"namespace": namespace} if namespace else {}


def _plan_prelude(namespace: str | None, backend: Requirement | None) -> list[PlannedRequest]:
    """The health check every session starts with: the server's version and mode."""
    checks = []
    if backend is not None:
        checks.append(
            f"refuses a server whose tag_name is older than {backend.version}, "
            "warns where it is not a release version"
        )
    if not namespace:
        checks.append("refuses a multi-user server: no namespace given")
    return [PlannedRequest("GET", _p("/healthz"), checks="; ".join(checks) or None)]


def _plan_upload_and_experiment(spec: RunSpec, namespace: str | None) -> list[PlannedRequest]:
    up = spec.upload
    file = {"file": up.package.name, "bytes": up.package.stat().st_size, "sha256": up.digest}
    named = f"pipeline named '{up.pipeline_name}'"
    return [
        PlannedRequest(
            "GET",
            _p("/pipelines"),
            {
                **_ns(namespace),
                "page_size": "2",
                "filter": eq_filter("display_name", up.pipeline_name),
            },
        ),
        PlannedRequest(
            "POST",
            _p("/pipelines/upload"),
            {"name": up.pipeline_name, "description": up.description, **_ns(namespace)},
            {"uploadfile": file},
            when=f"no {named} exists",
        ),
        PlannedRequest(
            "GET",
            _p("/pipelines/{pipeline_id}/versions"),
            {"page_size": str(PAGE_SIZE)},
            when=f"looks up the version whose description holds {DIGEST_TAG}{up.digest[:12]}...",
        ),
        PlannedRequest(
            "POST",
            _p("/pipelines/upload_version"),
            {"name": up.version_name, "pipelineid": "{pipeline_id}", "description": up.description},
            {"uploadfile": file},
            when=f"a {named} exists without this package",
        ),
        PlannedRequest(
            "GET",
            _p("/experiments"),
            {
                # kfp.Client's own filter form (enum number, camelCase), sent as is.
                "filter": json.dumps(
                    {
                        "predicates": [
                            {"operation": 1, "key": "display_name", "stringValue": spec.experiment}
                        ]
                    }
                ),
                **_ns(namespace),
            },
        ),
        PlannedRequest(
            "POST",
            _p("/experiments"),
            body={"display_name": spec.experiment, "namespace": namespace or ""},
            when=f"no experiment named '{spec.experiment}' exists",
        ),
    ]


def _run_fields(spec: RunSpec) -> dict[str, Any]:
    out: dict[str, Any] = {
        "experiment_id": "{experiment_id}",
        "display_name": spec.name,
        "pipeline_version_reference": {
            "pipeline_id": "{pipeline_id}",
            "pipeline_version_id": "{pipeline_version_id}",
        },
        "runtime_config": {"parameters": spec.parameters},
    }
    if spec.service_account:
        out["service_account"] = spec.service_account
    return out


def plan_submit(spec: RunSpec, namespace: str | None) -> list[PlannedRequest]:
    """Every request `start_run` may send for `spec`, in order."""
    return [
        *_plan_prelude(namespace, spec.backend),
        *_plan_upload_and_experiment(spec, namespace),
        PlannedRequest("POST", _p("/runs"), body=_run_fields(spec)),
    ]


def plan_schedule(spec: RunSpec, namespace: str | None) -> list[PlannedRequest]:
    """Every request `create_schedule` may send for `spec`, in order."""
    body = {
        **_run_fields(spec),
        "description": spec.upload.description,
        "max_concurrency": spec.max_concurrency,
        "trigger": {"cron_schedule": {"cron": spec.cron}},
        "mode": "ENABLE",
        "no_catchup": spec.no_catchup,
    }
    return [
        *_plan_prelude(namespace, spec.backend),
        *_plan_upload_and_experiment(spec, namespace),
        _list_recurring_runs(namespace, f"refuses if a recurring run is named '{spec.name}'"),
        PlannedRequest("POST", _p("/recurringruns"), body=body),
    ]


def _list_recurring_runs(namespace: str | None, when: str) -> PlannedRequest:
    """The look-up of the namespace's recurring runs by name, before creating or acting."""
    return PlannedRequest(
        "GET", _p("/recurringruns"), {"page_size": str(PAGE_SIZE), **_ns(namespace)}, when=when
    )


_ACTIONS = {
    "pause": ("POST", "/recurringruns/{recurring_run_id}:disable"),
    "resume": ("POST", "/recurringruns/{recurring_run_id}:enable"),
    "delete": ("DELETE", "/recurringruns/{recurring_run_id}"),
}


def plan_recurring_action(
    action: str, name_or_id: str, namespace: str | None
) -> list[PlannedRequest]:
    """The requests `KfpSession.pause/resume/delete(name_or_id)` send."""
    method, path = _ACTIONS[action]
    return [
        *_plan_prelude(namespace, None),
        _list_recurring_runs(
            namespace,
            f"finds {{recurring_run_id}}: the recurring run named or with id '{name_or_id}'",
        ),
        PlannedRequest(method, _p(path)),
    ]


def plan_document(
    requests: list[PlannedRequest], *, host: str, namespace: str | None, authorized: bool
) -> dict[str, Any]:
    """The JSON a dry run prints: where, as whom (masked), and the requests."""
    return {
        "dry_run": True,
        "host": host,
        "namespace": namespace,
        "authorization": "Bearer ***" if authorized else None,
        "requests": [r.to_json() for r in requests],
        "note": "nothing was sent; names in braces are ids the server assigns",
    }
