"""`ray.mode: kuberay`: a Ray stage's step creates a Ray cluster of its own, runs the stage
there, streams its log, and deletes it.

The choice: one **RayJob with `submissionMode: HTTPMode`** per step, not a RayCluster plus
a submission of our own. The RayJob carries what a RayCluster cannot: the operator enforces
`activeDeadlineSeconds`, tears the cluster down after the job (`deletionStrategy` rules, or
the legacy `shutdownAfterJobFinishes`: `kuberay_manifest.cleanup`) even when the step that
created it was killed, and records the
job's fate in `status`. HTTPMode has the operator submit the entrypoint over the Ray Jobs
API under a submission id we choose (`spec.jobId`), with no submitter pod to schedule, so
the step reads the job's log and state through the same Jobs API by that id. The step
itself never `ray.init`s: it is a Kubernetes and HTTP client (as in IBM data-prep-kit's
`kfp_ray_components`: create, run while tailing logs, delete from the exit handler).

What crosses into the cluster is a storage URI (`storage.root`), never a pod-local path:
the step uploads its inputs and a spec under `<storage.root>/kuberay/<run id>/<task>/`, the
entrypoint (`python -m flywheel.runtime.kuberay_entry <spec URI>`) runs the same library
stage function the local mode runs, and uploads its outputs and result there for the step
to collect.

Cleanup is twice: in a `finally` of the step, and by run-id label from the retrain
pipeline's exit handler (`cleanup_run`), so a step killed mid-job leaves nothing running.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.config import Profile
from flywheel.errors import ConfigError, FlywheelError
from flywheel.runtime.kuberay_manifest import (  # the manifest side, re-exported
    DRIVER_ENV,
    GROUP,
    MAX_NAME,
    RAY_STAGES,
    RAYCLUSTERS,
    RAYJOBS,
    RBAC_FILE,
    REQUIRED_ACCESS,
    RUN_LABEL,
    TASK_LABEL,
    VERSION,
    fit_problems,
    handoff_run_uri,
    handoff_uri,
    job_name,
    label_value,
    labels,
    namespace,
    namespace_problem,
    render,
    run_selector,
)

log = logging.getLogger(__name__)


__all__ = [
    "DRIVER_ENV",
    "GROUP",
    "MAX_NAME",
    "RAYCLUSTERS",
    "RAYJOBS",
    "RAY_STAGES",
    "RBAC_FILE",
    "REQUIRED_ACCESS",
    "RUN_LABEL",
    "TASK_LABEL",
    "VERSION",
    "Cluster",
    "cleanup_after",
    "cleanup_run",
    "fit_problems",
    "handoff_run_uri",
    "handoff_uri",
    "job_name",
    "label_value",
    "labels",
    "last_error",
    "launches",
    "missing_access",
    "namespace",
    "namespace_problem",
    "prune_handoff",
    "read_text",
    "render",
    "run",
    "run_selector",
    "submit_access_problem",
    "watch",
    "write_text",
]

TERMINAL_OK = {"Complete"}
TERMINAL_BAD = {"Failed", "ValidationFailed"}
JOB_BAD = {"FAILED", "STOPPED"}
# Before these end the operator is bringing the RayJob's cluster up (HTTPMode submits once
# the RayCluster is Ready); "" is a RayJob the operator has not looked at yet.
NOT_READY = {"", "New", "Initializing"}
# The longest status message a failure line carries: Ray's own for a failed entrypoint holds
# the last 20,000 characters of the driver's log.
MAX_DETAIL = 500
# How long a retried step waits for its predecessor's RayJob to be gone.
REPLACE_WAIT_S = 120


# ------------------------------------------------------------------------- the cluster


def api_client(kubeconfig: str | None = None) -> Any:
    """The official client: in-cluster config inside a pod, kubeconfig ($KUBECONFIG or
    ~/.kube/config) elsewhere. A fresh ApiClient, so nothing global is changed."""
    from kubernetes import client, config

    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        return client.ApiClient(cfg)
    # Read now, not at import: the client's own default froze $KUBECONFIG when imported.
    path = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    try:
        return config.new_client_from_config(config_file=path)
    except Exception as exc:  # ConfigException, FileNotFoundError: no usable kubeconfig
        raise FlywheelError(
            f"no Kubernetes API to talk to: {' '.join(str(exc).split())} (outside a pod, "
            "set KUBECONFIG or ~/.kube/config)"
        ) from None


def _api_error(exc: Any, doing: str, ns: str) -> FlywheelError:
    """One line from a kubernetes ApiException; a 403 says which RBAC is missing."""
    try:
        message = json.loads(exc.body).get("message", "")
    except (TypeError, ValueError, AttributeError):
        message = ""
    message = " ".join((message or str(exc.reason or exc)).split())
    if exc.status == 403:
        return FlywheelError(
            f"{doing} in namespace {ns}: forbidden: {message}; grant the run's service "
            f"account the Role in {RBAC_FILE} (`flywheel kuberay check` lists what is missing)"
        )
    if exc.status == 404 and "the server could not find the requested resource" in message:
        return FlywheelError(
            f"{doing} in namespace {ns}: the API has no {RAYJOBS}.{GROUP}/{VERSION}: is the "
            "KubeRay operator (its CRDs) installed?"
        )
    return FlywheelError(f"{doing} in namespace {ns}: HTTP {exc.status}: {message}")


@dataclass
class Cluster:
    """The RayJob/RayCluster calls a step makes, with errors turned into one line."""

    namespace: str
    api: Any = None
    _objects: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from kubernetes import client

        self.api = self.api or api_client()
        self._objects = client.CustomObjectsApi(self.api)

    def _call(
        self, doing: str, fn: Callable[..., Any], *args: Any, keep: tuple[int, ...] = (), **kw: Any
    ) -> Any:
        """fn(group, version, namespace, *args): API errors become one line, except the
        statuses in `keep`, which the caller handles (404 on a read, 409 on a create)."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(GROUP, VERSION, self.namespace, *args, **kw)
        except ApiException as exc:
            if exc.status in keep:
                raise
            raise _api_error(exc, doing, self.namespace) from None
        except HTTPError as exc:
            raise FlywheelError(
                f"{doing}: cannot reach the Kubernetes API: {' '.join(str(exc).split())}"
            ) from None

    def create(self, body: dict[str, Any], *, replace: bool = False) -> dict[str, Any]:
        """Create a RayJob. replace=True: one of the same name (an earlier attempt of this
        step: same run, same task; that attempt is dead, or KFP would not retry) is deleted
        first."""
        from kubernetes.client.exceptions import ApiException

        name = body["metadata"]["name"]
        doing = f"cannot create RayJob {name}"
        create = self._objects.create_namespaced_custom_object
        try:
            return self._call(doing, create, RAYJOBS, body, keep=(409,) if replace else ())
        except ApiException:
            pass  # 409: it exists
        log.warning("RayJob %s exists (an earlier attempt of this step): deleting it", name)
        self.delete(name)
        deadline = time.monotonic() + REPLACE_WAIT_S
        while self.get(name) is not None and time.monotonic() < deadline:
            time.sleep(1)
        return self._call(doing, self._objects.create_namespaced_custom_object, RAYJOBS, body)

    def get(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        read = self._objects.get_namespaced_custom_object
        try:
            return self._call(f"cannot read RayJob {name}", read, RAYJOBS, name, keep=(404,))
        except ApiException:
            return None

    def delete(self, name: str) -> bool:
        """Delete a RayJob (Kubernetes then deletes its RayCluster, which it owns). Returns
        False when it was already gone."""
        from kubernetes.client.exceptions import ApiException

        delete = self._objects.delete_namespaced_custom_object
        try:
            self._call(
                f"cannot delete RayJob {name}", delete, RAYJOBS, name,
                keep=(404,), propagation_policy="Background",
            )  # fmt: skip
            return True
        except ApiException:
            return False

    def names(self, plural: str, selector: str) -> list[str]:
        items = self._call(
            f"cannot list {plural}", self._objects.list_namespaced_custom_object,
            plural, label_selector=selector,
        )["items"]  # fmt: skip
        return sorted(i["metadata"]["name"] for i in items)

    def delete_selected(self, plural: str, selector: str) -> list[str]:
        names = self.names(plural, selector)
        if names:
            self._call(
                f"cannot delete {plural} with {selector}",
                self._objects.delete_collection_namespaced_custom_object,
                plural, label_selector=selector,
            )  # fmt: skip
        return names


def cleanup_run(profile: Profile, run_id: str, cluster: Cluster | None = None) -> list[str]:
    """Delete every RayJob and RayCluster of a run, by its label (the exit handler's step).
    A no-op unless `ray.mode` is kuberay. Returns what it deleted, as `kind/name`."""
    if profile.ray.mode != "kuberay":
        return []
    cluster = cluster or Cluster(namespace(profile))
    selector = run_selector(run_id)
    gone = [f"rayjob/{n}" for n in cluster.delete_selected(RAYJOBS, selector)]
    # Normally gone with their RayJob (owner references); one left by an operator that
    # had not yet set its owner, or created by hand with our labels, goes too.
    gone += [f"raycluster/{n}" for n in cluster.delete_selected(RAYCLUSTERS, selector)]
    for item in gone:
        log.warning("deleted %s of run %s", item, run_id)
    # The run's hand-off place (specs, results, what a killed step left): ours, all of it.
    from flywheel import storage

    if storage.is_uri(profile.storage.root):  # else no step could have written one
        run_dir = handoff_run_uri(profile, run_id)
        if storage.remove_tree(run_dir, "storage.root", profile.storage.endpoint_url):
            gone.append(f"handoff {run_dir}")
    return gone


def prune_handoff(profile: Profile) -> list[str]:
    """The hand-off uploads (`runtime.crossing`) unused for storage.handoff_retention_hours,
    deleted; a no-op where Ray runs on this machine only. A failure is a warning: the run's
    own work is done, and the next run's exit handler tries again."""
    from flywheel.runtime.crossing import crosses_nodes, prune_uploads

    if not crosses_nodes(profile.ray):
        return []
    try:
        gone = prune_uploads(profile)
    except FlywheelError as exc:
        log.warning("hand-off uploads not pruned: %s", exc)
        return []
    hours = profile.storage.handoff_retention_hours
    for uri in gone:
        log.warning("deleted hand-off upload %s (unused for over %g h)", uri, hours)
    return gone


@contextmanager
def cleanup_after(profile: dict[str, Any] | Profile, run_id: str) -> Iterator[None]:
    """The exit handler's block, then `cleanup_run` and `prune_handoff` whatever the block
    did (no API call and no storage listing unless Ray runs beyond this machine)."""
    from flywheel.profiles import load

    try:
        yield
    finally:
        p = load(profile)
        cleanup_run(p, run_id)
        prune_handoff(p)


def missing_access(profile: Profile, api: Any = None, ns: str | None = None) -> list[str]:
    """What the current identity may not do in the RayJobs' namespace (`ns`, else the
    profile's), asked through SelfSubjectAccessReview (the API server answers for the
    caller; no RBAC read needed)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    ns = ns or namespace(profile)
    authz = client.AuthorizationV1Api(api or api_client())
    missing = []
    for group, resource, verb, sub in REQUIRED_ACCESS:
        attrs = client.V1ResourceAttributes(
            namespace=ns, group=group, resource=resource, verb=verb, subresource=sub or None
        )
        review = client.V1SelfSubjectAccessReview(
            spec=client.V1SelfSubjectAccessReviewSpec(resource_attributes=attrs)
        )
        try:
            allowed = authz.create_self_subject_access_review(review).status.allowed
        except ApiException as exc:
            raise _api_error(exc, "cannot ask the API what we may do", ns) from None
        if not allowed:
            what = f"{resource}/{sub}" if sub else resource
            missing.append(f"{verb} {what}{'.' + group if group else ''}")
    return missing


# Seconds `submit_access_problem` waits for the API's port before saying it is not reachable.
REACH_TIMEOUT_S = 3.0


def submit_access_problem(profile: Profile) -> str | None:
    """For `flywheel submit`: one line on what the RayJobs' RBAC lacks, a line saying it
    could not be checked from here, or None when everything is allowed.

    Never raises: a submit goes on either way. The identity asked is whoever runs submit
    (kubeconfig, or a pod's service account), not necessarily the run's own account."""
    import socket
    from urllib.parse import urlsplit

    ns = namespace(profile)
    try:
        api = api_client()
        url = urlsplit(api.configuration.host)
        port = url.port or (443 if url.scheme == "https" else 80)
        # A bounded look first: the client would otherwise retry an unanswered host for minutes.
        with socket.create_connection((url.hostname or "", port), timeout=REACH_TIMEOUT_S):
            pass
    except FlywheelError as exc:
        return f"RayJob RBAC not checked: {exc}"
    except OSError as exc:
        return (
            f"RayJob RBAC not checked: the Kubernetes API at {api.configuration.host} is not "
            f"reachable from here ({exc.strerror or type(exc).__name__}); run `flywheel "
            "kuberay check` where it is"
        )
    try:
        missing = missing_access(profile, api)
    except FlywheelError as exc:
        return f"RayJob RBAC not checked: {exc}"
    except Exception as exc:  # urllib3 errors of a connection that broke after the probe
        return f"RayJob RBAC not checked: {' '.join(str(exc).split())}"
    if not missing:
        return None
    return (
        f"in namespace {ns} this identity may not: {', '.join(missing)}; the run's service "
        f"account needs them to run its RayJobs (apply {RBAC_FILE})"
    )


# ------------------------------------------------------------------------- watch


def _status(obj: dict[str, Any]) -> tuple[str, str]:
    st = obj.get("status") or {}
    return st.get("jobDeploymentStatus") or "", st.get("jobStatus") or ""


def _dashboard(obj: dict[str, Any]) -> str | None:
    url = (obj.get("status") or {}).get("dashboardURL")
    if not url:
        return None
    # KubeRay reports host:port (the head service); the Jobs client needs a URL.
    return url if "://" in url else f"http://{url}"


# The line Python prints last for an exception (traceback.format_exception_only): the
# class's qualified name, Ray's "(Cause)" when it wraps one, then ": message" or nothing.
_EXC_LINE = re.compile(r"(?:[A-Za-z_]\w*\.)*(?P<cls>[A-Za-z_]\w*)(?:\([\w.]+\))?(?::\s.*|:)?")
# A class named like one. Others (pyarrow's ArrowInvalid) count where a traceback shows them.
_EXC_NAME = re.compile(r"\w*(?:Error|Exception|Exit|Interrupt)")
_TRACEBACK = "Traceback (most recent call last):"
# Ray colours task names in its tracebacks, and prefixes what a worker printed with
# "(RayTrainWorker pid=123, ip=10.0.0.5) ".
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_PREFIX = re.compile(r"^\(.*?\bpid=\d+[^)]*\)\s+")


def last_error(text: str) -> str:
    """The last Python exception line in a driver's log (or in Ray's job message, which
    quotes the log's tail), as `Type: message`; "" when there is none. A traceback's
    exception line is the unindented line after its indented frames, whatever the class is
    called; a RayTaskError quotes its cause's frames and line after its own, so the cause's
    line comes last and wins. Elsewhere a line counts when its class is named like an error
    (the entrypoint prints `FlywheelError: ...` without a traceback)."""
    found = ""
    in_traceback = after_frame = False
    for raw in text.splitlines():
        line = _RAY_PREFIX.sub("", _ANSI.sub("", raw)).rstrip()
        if not line.strip():
            continue
        if line.strip() == _TRACEBACK:
            in_traceback, after_frame = True, False
            continue
        if line[0].isspace():
            after_frame = in_traceback
            continue
        m = _EXC_LINE.fullmatch(line)
        if m and (after_frame or _EXC_NAME.fullmatch(m["cls"])):
            found = line
        after_frame = False
    return found


class LogTail:
    """The driver's log through the Ray Jobs API, printed line by line as it grows."""

    def __init__(self, job_id: str, emit: Callable[[str], None]):
        self.job_id, self.emit = job_id, emit
        self.client: Any = None
        self.url: str | None = None
        self.seen = 0
        self.text = ""
        self.problem = ""  # why the last read failed, for a failure line without a log

    def poll(self, url: str | None) -> None:
        if url is None:
            return
        try:
            if self.client is None or url != self.url:
                from ray.job_submission import JobSubmissionClient

                self.client, self.url = JobSubmissionClient(url), url
            self.text = self.client.get_job_logs(self.job_id)
        except Exception as exc:  # not submitted yet, or the head is going away
            self.problem = f"{url}: {' '.join(str(exc).split())[:MAX_DETAIL]}"
            log.debug("no log yet for %s at %s: %s", self.job_id, url, exc)
            return
        self.problem = ""
        new, self.seen = self.text[self.seen :], len(self.text)
        for line in new.splitlines():
            self.emit(line)

    def last_error(self) -> str:
        return last_error(self.text)


def _fail_line(name: str, obj: dict[str, Any], tail: LogTail) -> str:
    """`RayJob <name> <state> (<reason>): <Ray's error>`, one line. Ray's error is the last
    exception line of the driver's log; else of the status message (Ray's own for a failed
    entrypoint quotes the log's tail, which outlives the head); else the message itself."""
    deployment, job = _status(obj)
    st = obj.get("status") or {}
    reason = st.get("reason") or ""
    message = str(st.get("message") or "")
    what = (
        "passed its deadline (ray.kuberay.active_deadline_seconds)"
        if (reason == "DeadlineExceeded")
        else f"{deployment}" + (f", job {job}" if job else "") + (f" ({reason})" if reason else "")
    )
    parts = [f"RayJob {name} {what}"]
    error = tail.last_error() or last_error(message)
    message = " ".join(message.split())
    if error:
        parts.append(error)
    elif message:
        parts.append(message if len(message) <= MAX_DETAIL else message[:MAX_DETAIL] + "...")
    elif tail.problem:
        parts.append(f"the driver's log could not be read ({tail.problem})")
    return ": ".join(parts)


def _not_ready(name: str, obj: dict[str, Any], waited: float, ns: str) -> str:
    """The line for a RayJob whose cluster did not come up within ray.resource_wait_s,
    with what the operator copied of the RayCluster's status."""
    deployment, _ = _status(obj)
    if not deployment:
        return (
            f"RayJob {name} has no status after {waited:g} s (ray.resource_wait_s): is the "
            f"KubeRay operator running and watching namespace {ns}?"
        )
    cl = (obj.get("status") or {}).get("rayClusterStatus") or {}
    seen = [f"state {cl['state']}"] if cl.get("state") else []
    seen += [
        f"{c.get('type')} {c.get('status')}"
        + (f" ({c['reason']})" if c.get("reason") else "")
        + (f": {' '.join(str(c['message']).split())}" if c.get("message") else "")
        for c in cl.get("conditions") or []
        if c.get("status") != "True"
    ]
    if "desiredWorkerReplicas" in cl:
        seen.append(
            f"workers ready {cl.get('readyWorkerReplicas', 0)}/{cl['desiredWorkerReplicas']}"
        )
    return (
        f"RayJob {name}: its Ray cluster was not ready within {waited:g} s "
        f"(ray.resource_wait_s), still {deployment}" + (f": {'; '.join(seen)}" if seen else "")
    )


def watch(
    cluster: Cluster,
    name: str,
    *,
    poll_s: float,
    timeout_s: float,
    ready_s: float | None = None,
    emit: Callable[[str], None] = print,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Wait for RayJob `name` to finish; stream its driver's log through `emit` and log each
    state change. Returns the finished object; raises FlywheelError (one line with the Ray
    error) when it fails, passes its deadline, is stopped or deleted, or outlives timeout_s
    (the operator's deadline plus a margin: a missing operator must not hang the step), or
    when its cluster is not up within ready_s (ray.resource_wait_s; None: no such limit)."""
    tail = LogTail(name, emit)
    start = clock()
    deadline = start + timeout_s
    last: tuple[str, str] | None = None
    while True:
        obj = cluster.get(name)
        if obj is None:
            raise FlywheelError(
                f"RayJob {name} was deleted while the step waited for it (its Ray job died "
                "with its cluster)"
            )
        state = _status(obj)
        if state != last:
            log.warning(
                "RayJob %s: %s%s", name, state[0] or "(no status yet)",
                f", job {state[1]}" if state[1] else "",
            )  # fmt: skip
            last = state
        tail.poll(_dashboard(obj))
        deployment, job = state
        if deployment in TERMINAL_OK and job == "SUCCEEDED":
            return obj
        if deployment in TERMINAL_BAD or job in JOB_BAD:
            raise FlywheelError(_fail_line(name, obj, tail))
        if ready_s is not None and deployment in NOT_READY and clock() - start >= ready_s:
            raise FlywheelError(_not_ready(name, obj, ready_s, cluster.namespace))
        if clock() > deadline:
            raise FlywheelError(
                f"RayJob {name} still {deployment or 'without status'} after {timeout_s:g}s: "
                "is the KubeRay operator running in namespace "
                f"{cluster.namespace}?"
            )
        sleep(poll_s)


# ------------------------------------------------------------------------- one step


def launches(profile: dict[str, Any] | Profile) -> bool:
    """Whether a Ray stage's step should launch a RayJob: ray.mode kuberay, and not already
    inside one (the entrypoint runs the stage function itself)."""
    mode = (
        profile.ray.mode
        if isinstance(profile, Profile)
        else (profile.get("ray") or {}).get("mode", "local")
    )
    return mode == "kuberay" and not os.environ.get(DRIVER_ENV)


def run(
    profile: Profile,
    task: str,
    run_id: str,
    spec: dict[str, Any],
    *,
    cluster: Cluster | None = None,
    emit: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run one stage as a RayJob: write `spec` (stage arguments, input and output URIs) to
    the hand-off place, create the RayJob, watch it, delete it. Returns the finished RayJob."""
    problems = fit_problems(profile, task)
    problem = namespace_problem(profile)
    if problems or problem:
        raise ConfigError("; ".join([*problems, *([problem] if problem else [])]))
    base = handoff_uri(profile, run_id, task)
    spec_uri = f"{base}/spec.json"
    write_text(spec_uri, json.dumps(spec), profile.storage.endpoint_url)
    body = render(profile, task, run_id, spec_uri)
    name = body["metadata"]["name"]
    cluster = cluster or Cluster(namespace(profile))
    _check_access(profile, cluster)
    kr = profile.ray.kuberay
    finished = False
    with _sigterm_as_exit():
        try:
            cluster.create(body, replace=True)
            log.warning("created RayJob %s in namespace %s (%s)", name, cluster.namespace, base)
            done = watch(
                cluster, name, poll_s=kr.poll_s, timeout_s=kr.active_deadline_seconds + 300,
                ready_s=profile.ray.resource_wait_s, emit=emit,
            )  # fmt: skip
            finished = True
            return done
        finally:
            # Also when the create did not return: a SIGTERM mid-request leaves the API
            # server holding a RayJob whose answer never came back. The name is the run's
            # and the task's, so deleting it by name deletes nothing of anyone else's.
            try:
                if cluster.delete(name):
                    log.warning("deleted RayJob %s", name)
            except FlywheelError as exc:
                if finished:
                    raise
                # The step's own error (a failed job, RBAC, the API down) is the one to
                # show; the exit handler deletes by label what is left.
                log.warning("%s", exc)


def _check_access(profile: Profile, cluster: Cluster) -> None:
    """Before creating anything: what this identity may not do with RayJobs, asked through
    SelfSubjectAccessReview; one line naming each missing permission. A step that may
    create but not read or delete would leave a RayJob it cannot watch or clean up. When
    the API cannot answer the question, the create will say what is wrong."""
    try:
        missing = missing_access(profile, cluster.api, cluster.namespace)
    except FlywheelError as exc:
        log.warning("RayJob RBAC not checked before creating: %s", exc)
        return
    if missing:
        raise FlywheelError(
            f"in namespace {cluster.namespace} this step may not: {', '.join(missing)}; grant "
            f"the run's service account the Role in {RBAC_FILE} (nothing was created)"
        )


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Kubernetes stops a pod (a cancelled run, a deleted pod) with SIGTERM, whose default
    action ends Python without running `finally`; as SystemExit it runs, and the RayJob is
    deleted within the grace period. SIGKILL leaves it to the exit handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_text(uri: str, text: str, endpoint_url: str | None) -> None:
    from flywheel import storage

    loc = storage.parse(uri, "storage.root")
    fs = storage.filesystem(loc, endpoint_url)
    if not loc.remote:
        Path(loc.path).parent.mkdir(parents=True, exist_ok=True)
    with fs.open_output_stream(loc.path) as out:
        out.write(text.encode())


def read_text(uri: str, endpoint_url: str | None) -> str:
    from flywheel import storage

    loc = storage.parse(uri, "storage.root")
    fs = storage.filesystem(loc, endpoint_url)
    with fs.open_input_stream(loc.path) as fin:
        return fin.read().decode()
