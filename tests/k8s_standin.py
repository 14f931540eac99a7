"""A STAND-IN for a Kubernetes API server with the KubeRay operator: tests only.

Not Kubernetes. It serves the few REST paths `flywheel.runtime.kuberay` uses, over HTTP on
127.0.0.1, to the real `kubernetes` client (through a kubeconfig it writes):

- RayJobs and RayClusters (ray.io/v1): create, get, list and delete-collection by label
  selector, delete (a RayJob's RayCluster goes with it, as Kubernetes' garbage collector
  does through owner references);
- every created object is validated against the CRD's openAPIV3Schema from
  ../shared/contracts/kuberay-crds/ with `jsonschema`, unknown fields refused (as a server
  with fieldValidation=Strict does); an invalid object is a 422, as from a real server;
- SelfSubjectAccessReview, and a 403 Forbidden for any (verb, resource) a test forbids;
- the operator's part, done when a RayJob is read: Initializing -> Running -> Complete or
  Failed. `behaviour="run"` submits the RayJob's entrypoint to a REAL Ray head over the Ray
  Jobs API under spec.jobId with its runtimeEnvYAML (what KubeRay does in HTTPMode) and
  mirrors the Ray job's status; `behaviour="pending"` never gets a cluster up (no node
  fits), so only the deadline or a test ends it. activeDeadlineSeconds is enforced;
  `fail(name, ...)` fails a RayJob as the operator would.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "contracts" / "kuberay-crds"
CRD_FILES = {"rayjobs": "ray.io_rayjobs.yaml", "rayclusters": "ray.io_rayclusters.yaml"}
KINDS = {"rayjobs": "RayJob", "rayclusters": "RayCluster"}
TOKEN = "standin-token"


def crds_present() -> bool:
    return all((CRD_DIR / f).is_file() for f in CRD_FILES.values())


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused where the CRD lists the fields."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def validator(plural: str) -> Any:
    import jsonschema

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRD_DIR / CRD_FILES[plural]).read_text(), Loader=loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(version["schema"]["openAPIV3Schema"])
    # metadata is checked by the API server itself, not the CRD (which types it as object).
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def schema_errors(obj: dict[str, Any]) -> list[str]:
    plural = {v: k for k, v in KINDS.items()}[obj.get("kind", "")]
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in sorted(validator(plural).iter_errors(obj), key=lambda e: list(e.absolute_path))
    ]


def operator_refusals(job: dict[str, Any]) -> list[str]:
    """What KubeRay v1.7.0's RayJob validation refuses in the deletion settings, in its own
    words: the CRD's CEL rules on spec.deletionStrategy (which jsonschema does not evaluate)
    and the controller's validateDeletionConfiguration
    (ray-operator/controllers/ray/utils/validation.go). The operator marks such a RayJob
    ValidationFailed; nothing runs."""
    spec = job.get("spec") or {}
    shutdown = bool(spec.get("shutdownAfterJobFinishes"))
    out = []
    if not shutdown and (spec.get("ttlSecondsAfterFinished") or 0) > 0:
        out.append(
            "The RayJob spec is invalid: a RayJob with shutdownAfterJobFinishes set to false "
            "cannot have TTLSecondsAfterFinished"
        )
    strategy = spec.get("deletionStrategy")
    if strategy is None:
        return out
    legacy = "onSuccess" in strategy or "onFailure" in strategy
    rules = bool(strategy.get("deletionRules"))
    if rules and shutdown:
        out.append(
            "The RayJob spec is invalid: spec.shutdownAfterJobFinishes and "
            "spec.deletionStrategy.deletionRules are mutually exclusive"
        )
    if rules and legacy:
        out.append(
            "legacy policies (onSuccess/onFailure) and deletionRules cannot be used together "
            "within the same deletionStrategy"
        )
    if not rules and not ("onSuccess" in strategy and "onFailure" in strategy):
        out.append(
            "deletionStrategy requires either BOTH onSuccess and onFailure, OR the "
            "deletionRules field (cannot be empty)"
        )
    for i, rule in enumerate(strategy.get("deletionRules") or []):
        cond = rule.get("condition") or {}
        if ("jobStatus" in cond) == ("jobDeploymentStatus" in cond):
            out.append(f"deletionRules[{i}]: exactly one of JobStatus and JobDeploymentStatus")
    return out


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _selected(obj: dict[str, Any], selector: str) -> bool:
    labels = obj["metadata"].get("labels") or {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class StandIn:
    def __init__(self, dashboard: str | None = None, behaviour: str = "run"):
        self.dashboard = dashboard  # a real Ray head's Jobs API, for behaviour "run"
        self.behaviour = behaviour
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.forbidden: set[tuple[str, str]] = set()  # (verb, resource)
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str]] = []
        self._started: dict[str, float] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # -- lifecycle
    def __enter__(self) -> StandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
                    "users": [{"name": "tester", "user": {"token": TOKEN}}],
                    "contexts": [
                        {
                            "name": "standin",
                            "context": {
                                "cluster": "standin",
                                "user": "tester",
                                "namespace": namespace,
                            },
                        }
                    ],
                    "current-context": "standin",
                }
            )
        )
        return path

    # -- what tests look at and do
    def names(self, plural: str, selector: str = "") -> list[str]:
        with self.lock:
            return sorted(
                n
                for (p, _ns, n), o in self.objects.items()
                if p == plural and _selected(o, selector)
            )

    def get(self, plural: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
        with self.lock:
            obj = self.objects.get((plural, namespace, name))
            return copy.deepcopy(obj) if obj else None

    def fail(self, name: str, reason: str, message: str, namespace: str = "default") -> None:
        with self.lock:
            obj = self.objects[("rayjobs", namespace, name)]
            obj["status"].update(
                jobDeploymentStatus="Failed", reason=reason, message=message, endTime=_now()
            )

    def add(self, obj: dict[str, Any]) -> None:
        """An object put there directly (another run's, say)."""
        with self.lock:
            plural = {v: k for k, v in KINDS.items()}[obj["kind"]]
            md = obj["metadata"]
            md.setdefault("uid", str(uuid.uuid4()))
            self.objects[(plural, md.get("namespace", "default"), md["name"])] = obj

    # -- the operator's part
    def reconcile(self, ns: str, name: str) -> None:
        with self.lock:
            job = self.objects.get(("rayjobs", ns, name))
            if job is None:
                return
            st = job.setdefault("status", {})
            state = st.get("jobDeploymentStatus")
            if state in ("Complete", "Failed", "ValidationFailed"):
                return
            deadline = job["spec"].get("activeDeadlineSeconds")
            if deadline and time.monotonic() - self._started[name] > deadline:
                self._stop_ray(job)
                st.update(
                    jobDeploymentStatus="Failed",
                    reason="DeadlineExceeded",
                    message=f"The RayJob has passed the activeDeadlineSeconds. "
                    f"StartTime: {st.get('startTime')}. ActiveDeadlineSeconds: {deadline}",
                    endTime=_now(),
                )
                return
            if state == "Initializing":
                if self.behaviour == "run":
                    self._submit(job)
                return
            if state == "Running":
                self._mirror(job)

    def _client(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        assert self.dashboard, "behaviour 'run' needs a Ray head's dashboard URL"
        return JobSubmissionClient(self.dashboard)

    def _submit(self, job: dict[str, Any]) -> None:
        spec, st = job["spec"], job["status"]
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or None
        self._client().submit_job(
            entrypoint=spec["entrypoint"], submission_id=spec["jobId"], runtime_env=runtime_env
        )
        # KubeRay reports the head service as host:port, no scheme.
        st.update(
            jobDeploymentStatus="Running",
            jobStatus="PENDING",
            dashboardURL=self.dashboard.split("://", 1)[1],
            rayClusterStatus={"state": "ready"},
        )

    def _mirror(self, job: dict[str, Any]) -> None:
        st = job["status"]
        info = self._client().get_job_info(job["spec"]["jobId"])
        st["jobStatus"] = info.status.value
        if info.status.is_terminal():
            ok = info.status.value == "SUCCEEDED"
            st.update(
                jobDeploymentStatus="Complete" if ok else "Failed",
                reason="" if ok else "AppFailed",
                message=info.message or "",
                endTime=_now(),
            )

    def _stop_ray(self, job: dict[str, Any]) -> None:
        if (job.get("status") or {}).get("jobDeploymentStatus") == "Running":
            with contextlib.suppress(Exception):  # already finished: nothing to stop
                self._client().stop_job(job["spec"]["jobId"])

    # -- the API
    def create(self, plural: str, ns: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        errors = schema_errors(body)
        if errors:
            return 422, _status(
                422, "Invalid", f"{KINDS[plural]} is invalid: " + "; ".join(errors[:5])
            )
        name = body["metadata"]["name"]
        with self.lock:
            if (plural, ns, name) in self.objects:
                return 409, _status(
                    409, "AlreadyExists", f'{plural}.ray.io "{name}" already exists'
                )
            obj = copy.deepcopy(body)
            md = obj["metadata"]
            md.update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=_now())
            self.objects[(plural, ns, name)] = obj
            if plural == "rayjobs":
                self._started[name] = time.monotonic()
                cluster_name = f"{name}-{uuid.uuid4().hex[:5]}"
                refusals = operator_refusals(obj)
                if refusals:  # the operator's verdict, read at the next get
                    obj["status"] = {
                        "jobDeploymentStatus": "ValidationFailed",
                        "reason": "ValidationFailed",
                        "message": "; ".join(refusals),
                    }
                    return 201, obj
                obj["status"] = {
                    "jobDeploymentStatus": "Initializing",
                    "jobId": obj["spec"].get("jobId", name),
                    "rayClusterName": cluster_name,
                    "startTime": _now(),
                    # KubeRay copies the RayCluster's status here while it is not ready.
                    "rayClusterStatus": {
                        "desiredWorkerReplicas": sum(
                            g.get("replicas", 0)
                            for g in obj["spec"]["rayClusterSpec"].get("workerGroupSpecs", [])
                        ),
                        "readyWorkerReplicas": 0,
                        "conditions": [
                            {
                                "type": "RayClusterProvisioned",
                                "status": "False",
                                "reason": "RayClusterPodsProvisioning",
                                "message": "RayCluster Pods are being provisioned for first time",
                                "lastTransitionTime": _now(),
                            }
                        ],
                    },
                }
                # KubeRay's RayCluster for a RayJob: the RayJob's labels, owned by it.
                cluster = {
                    "apiVersion": "ray.io/v1",
                    "kind": "RayCluster",
                    "metadata": {
                        "name": cluster_name,
                        "namespace": ns,
                        "labels": dict(md.get("labels") or {}),
                        "ownerReferences": [
                            {
                                "apiVersion": "ray.io/v1",
                                "kind": "RayJob",
                                "name": name,
                                "uid": md["uid"],
                            }
                        ],
                    },
                    "spec": copy.deepcopy(obj["spec"]["rayClusterSpec"]),
                }
                cluster_errors = schema_errors(cluster)
                assert not cluster_errors, cluster_errors
                self.add(cluster)
            return 201, obj

    def delete(self, plural: str, ns: str, name: str) -> bool:
        with self.lock:
            obj = self.objects.pop((plural, ns, name), None)
            if obj is None:
                return False
            if plural == "rayjobs":
                self._stop_ray(obj)  # the cluster goes, and its Ray job with it
                for key, other in list(self.objects.items()):
                    owners = other["metadata"].get("ownerReferences") or []
                    if any(o.get("uid") == obj["metadata"]["uid"] for o in owners):
                        del self.objects[key]
            return True


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    }  # fmt: skip


def _handler(s: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet test output
            pass

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict[str, Any]:
            n = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(n) or b"{}")

        def _route(self, verb: str) -> None:
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            s.requests.append((verb, url.path))
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._send(401, _status(401, "Unauthorized", "Unauthorized"))
            parts = url.path.strip("/").split("/")
            if url.path == "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews":
                review = self._body()
                attrs = review["spec"]["resourceAttributes"]
                resource = attrs["resource"] + (
                    f"/{attrs['subresource']}" if attrs.get("subresource") else ""
                )
                allowed = (attrs["verb"], resource) not in s.forbidden
                return self._send(201, {**review, "status": {"allowed": allowed}})
            # /apis/ray.io/v1/namespaces/{ns}/{plural}[/{name}[/status]]
            if parts[:3] != ["apis", "ray.io", "v1"] or len(parts) < 5 or parts[3] != "namespaces":
                return self._send(
                    404,
                    _status(404, "NotFound", "the server could not find the requested resource"),
                )
            ns, plural, rest = parts[4], parts[5], parts[6:]
            if plural not in KINDS:
                return self._send(
                    404,
                    _status(404, "NotFound", "the server could not find the requested resource"),
                )
            k8s_verb = {
                ("GET", False): "list", ("GET", True): "get", ("POST", False): "create",
                ("DELETE", True): "delete", ("DELETE", False): "deletecollection",
            }.get((verb, bool(rest)), verb.lower())  # fmt: skip
            if (k8s_verb, plural) in s.forbidden:
                return self._send(403, _status(403, "Forbidden", (
                    f'{plural}.ray.io is forbidden: User "system:serviceaccount:{ns}:flywheel-runner" '
                    f'cannot {k8s_verb} resource "{plural}" in API group "ray.io" in the namespace "{ns}"'
                )))  # fmt: skip
            selector = query.get("labelSelector", "")
            if verb == "POST" and not rest:
                code, body = s.create(plural, ns, self._body())
                return self._send(code, body)
            if verb == "GET" and not rest:
                with s.lock:
                    for name in s.names(plural, selector):
                        if plural == "rayjobs":
                            s.reconcile(ns, name)
                    items = [s.get(plural, n, ns) for n in s.names(plural, selector)]
                return self._send(200, {"apiVersion": "ray.io/v1", "kind": f"{KINDS[plural]}List",
                                        "metadata": {}, "items": items})  # fmt: skip
            if verb == "DELETE" and not rest:
                for name in s.names(plural, selector):
                    s.delete(plural, ns, name)
                return self._send(200, _status(200, "", "") | {"status": "Success"})
            name = rest[0]
            if verb == "GET":
                if plural == "rayjobs":
                    s.reconcile(ns, name)
                obj = s.get(plural, name, ns)
                if obj is None:
                    return self._send(
                        404, _status(404, "NotFound", f'{plural}.ray.io "{name}" not found')
                    )
                return self._send(200, obj)
            if verb == "DELETE":
                self._body()
                if not s.delete(plural, ns, name):
                    return self._send(
                        404, _status(404, "NotFound", f'{plural}.ray.io "{name}" not found')
                    )
                return self._send(200, _status(200, "", "") | {"status": "Success"})
            return self._send(405, _status(405, "MethodNotAllowed", verb))

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_DELETE(self) -> None:
            self._route("DELETE")

    return Handler
