"""Submit and schedule compiled pipelines on Kubeflow Pipelines (API v2beta1).

A thin layer over the real `kfp.Client`, adding what a repeatable submit needs:

- **Idempotent upload.** The compiled YAML's sha256 names the pipeline version
  (``<pipeline>-<sha12>``) and is tagged in its description (``sha256:<hex>``); a
  package already on the server is reused, never uploaded twice.
- **What is sent is decided first.** `flywheel.kfp.plan` builds the `RunSpec` (names,
  only the parameters the pipeline declares, the service account); this module sends it.
- **Auth without leaks.** Namespace and bearer token come from the profile (``kfp.*``)
  or flags; the token is read from a file or an environment variable, goes only into
  the Authorization header, and is masked everywhere we print.
- **Readable failures.** HTTP errors and unreachable hosts become one `FlywheelError`
  line (status + the server's own message); kfp's healthz retry loop (5 tries, 5 s
  apart) is cut to one attempt, with a timeout, so a dead host fails in milliseconds.
- **The right backend.** Every session starts with one healthz request; its `tag_name` (the
  server's release) is held against what the package needs (`flywheel.kfp.backend`) before
  anything is uploaded: an older server is refused in one line naming both versions.
- **The page a person opens.** On a full Kubeflow deployment the API is served at
  ``<host>/pipeline`` and the UI at ``<host>/_/pipeline``; run links use ``kfp.ui_url``
  or that derivation (`ui_base`).
- **Dry runs are plans.** ``--dry-run`` prints `flywheel.kfp.plan`'s list of the
  requests a spec makes and connects to nothing; no fake server in production code.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.config import KfpConfig, Profile
from flywheel.errors import ConfigError, FlywheelError
from flywheel.kfp.backend import Requirement, check_backend
from flywheel.kfp.plan import (
    DIGEST_TAG,
    PAGE_SIZE,
    RunSpec,
    Upload,
    declared_parameters,
    eq_filter,
    schedule_spec,
    submit_spec,
)

log = logging.getLogger(__name__)

TERMINAL_OK = {"SUCCEEDED", "SKIPPED"}
TERMINAL_BAD = {"FAILED", "CANCELED", "ERROR"}
# The health check's (connect, read) timeouts in seconds: a host that accepts and never
# answers (a stuck proxy) fails here instead of hanging the command.
HEALTHZ_TIMEOUT_S = (5.0, 15.0)
# Every other API call ends within this many seconds. kfp.Client sets no request timeout and
# has no public way to set one (its generated client hands urllib3 timeout=None), so a server
# that answers healthz and then stalls (a stuck ingress) hung submit and schedule list for
# good. Generous: an upload of a large pipeline spec is one call.
CALL_TIMEOUT_S = 120.0


# ------------------------------------------------------------------------ values


@dataclass(frozen=True)
class KfpTarget:
    """Where to talk to, and as whom. `token` never appears in repr or messages."""

    host: str
    namespace: str | None = None
    token: str | None = field(default=None, repr=False)
    ui_host: str | None = None

    def run_url(self, run_id: str) -> str:
        return f"{(self.ui_host or self.host).rstrip('/')}/#/runs/details/{run_id}"


def ui_base(host: str, ui_url: str | None = None) -> str:
    """The Kubeflow Pipelines UI for an API host: `ui_url` when set; else, for a full
    Kubeflow deployment whose API lives at <host>/pipeline, <host>/_/pipeline (the central
    dashboard's frame around the pipelines UI); else the host itself (standalone KFP serves
    API and UI at one address)."""
    if ui_url:
        return ui_url.rstrip("/")
    host = host.rstrip("/")
    if host.endswith("/pipeline"):
        return host.removesuffix("/pipeline") + "/_/pipeline"
    return host


@dataclass(frozen=True)
class PipelineRef:
    pipeline_id: str
    version_id: str
    pipeline_name: str
    version_name: str
    digest: str
    uploaded: bool  # False: the same package was already on the server


@dataclass(frozen=True)
class SubmittedRun:
    run_id: str
    url: str
    experiment_id: str
    pipeline: PipelineRef
    parameters: dict[str, Any]
    state: str | None = None  # final state when waited for


@dataclass(frozen=True)
class RecurringRunInfo:
    recurring_run_id: str
    name: str
    status: str
    cron: str | None
    experiment_id: str | None
    pipeline_version_id: str | None
    max_concurrency: int | None
    no_catchup: bool | None
    created_at: str | None


# ------------------------------------------------------------------ pure helpers


def check_http_url(url: str, field: str) -> None:
    """An http(s) URL with a host, no blanks or control characters and a valid port, or a
    ConfigError naming the field: urllib3 otherwise failed at the first request with its own
    class name (LocationParseError, ProtocolError)."""
    from urllib.parse import urlsplit

    problem = ""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError as exc:
        problem = str(exc)
    else:
        if parts.scheme not in ("http", "https"):
            problem = "not http:// or https://"
        elif not parts.hostname:
            problem = "no host"
        elif any(c.isspace() or ord(c) < 0x20 for c in url):
            problem = "a blank or control character in it"
    if problem:
        raise ConfigError(f"{field} {url!r}: expected http(s)://HOST[:PORT][/PATH] ({problem})")


def resolve_target(
    cfg: KfpConfig, *, host: str | None = None, namespace: str | None = None
) -> KfpTarget:
    """Flags win over the profile. Reads the token file / token env var named in `cfg`."""
    url = host or cfg.host
    if not url:
        raise ConfigError(
            "no Kubeflow Pipelines host: pass --host URL or set kfp.host in the profile"
        )
    check_http_url(url, "--host" if host else "kfp.host")
    token: str | None = None
    if cfg.token_file:
        path = Path(cfg.token_file).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"kfp.token_file '{path}': cannot read it ({exc.strerror})") from None
        if not token:
            raise ConfigError(f"kfp.token_file '{path}' is empty")
    elif cfg.token_env and os.environ.get(cfg.token_env):
        token = os.environ[cfg.token_env].strip()
    return KfpTarget(
        host=url.rstrip("/"),
        namespace=namespace or cfg.namespace,
        token=token,
        ui_host=ui_base(url, cfg.ui_url),
    )


def compiled_package(pipeline: str, profile: Profile, package: Path | None, out_dir: Path) -> Path:
    """An already-compiled YAML (`package`) or a fresh compile of the named pipeline."""
    if package is not None:
        if not Path(package).is_file():
            raise ConfigError(f"--package {package}: file not found")
        declared_parameters(package)  # not a compiled pipeline: fail before connecting
        return Path(package)
    try:
        from flywheel.kfp.compile import compile_pipeline
    except ImportError as exc:
        raise FlywheelError(
            f"cannot compile '{pipeline}' here ({exc}); pass --package PATH of a compiled YAML"
        ) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    return compile_pipeline(pipeline, profile, out_dir)


# ---------------------------------------------------------------- error handling


def _server_message(body: Any) -> str:
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if not body:
        return ""
    try:
        data = json.loads(body)
    except (TypeError, ValueError):
        return " ".join(str(body).split())[:300]
    if isinstance(data, dict):
        return str(data.get("message") or data.get("error") or data)[:300]
    return str(data)[:300]


def _unreachable_reason(exc: BaseException) -> str:
    text = str(getattr(exc, "reason", None) or exc)
    if "Connection refused" in text:
        return "connection refused"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "unknown host"
    if "timed out" in text.lower():
        return "timed out"
    return type(getattr(exc, "reason", None) or exc).__name__


@contextlib.contextmanager
def _translated(target: KfpTarget, action: str) -> Iterator[None]:
    """HTTP and transport errors -> one FlywheelError line, with the token masked."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except kfp_server_api.ApiException as exc:
        detail = _server_message(exc.body)
        status = (
            f"HTTP {exc.status} {exc.reason}" if exc.status else str(exc.reason).splitlines()[0]
        )
        msg = f"Kubeflow Pipelines at {target.host}: {action} failed: {status}"
        if detail:
            msg += f": {detail}"
        raise FlywheelError(_mask(msg, target)) from None
    except urllib3.exceptions.HTTPError as exc:
        raise FlywheelError(
            f"cannot reach Kubeflow Pipelines at {target.host} ({action}): {_unreachable_reason(exc)}"
        ) from None
    except _Stalled as exc:
        raise FlywheelError(
            f"Kubeflow Pipelines at {target.host}: {action}: no answer in {exc.seconds:g} s"
        ) from None
    except (ValueError, TimeoutError) as exc:  # kfp.Client's own checks (e.g. duplicate names)
        raise FlywheelError(_mask(f"Kubeflow Pipelines: {action} failed: {exc}", target)) from None


class _Stalled(Exception):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"no answer in {seconds:g} s")
        self.seconds = seconds


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise _Stalled in the block once `seconds` have passed, wherever it waits (a
    blocking socket read included: the alarm's handler raises, so the read is not resumed).
    Only the main thread receives signals; elsewhere the block runs unbounded, and the CLI,
    the one caller that talks to Kubeflow, calls from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(_signum: int, _frame: Any) -> None:
        raise _Stalled(seconds)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _mask(text: str, target: KfpTarget) -> str:
    return text.replace(target.token, "***") if target.token else text


# ----------------------------------------------------------------- the client


@dataclass(frozen=True)
class ServerInfo:
    """What the API server says about itself in healthz."""

    multi_user: bool
    tag_name: str | None  # the release it was built from; "unknown" on a dev build


def _healthz(target: KfpTarget) -> ServerInfo:
    """One healthz request through kfp_server_api's generated client (the one kfp.Client
    wraps), with the same bearer token, a timeout and no retries. kfp.Client's own check
    retries 5 times, 5 s apart, which turns a wrong --host or a 5xx into half a minute of
    silence before the same error.

    Read as raw JSON: the API server's healthz handler is hand-written (backend/src/apiserver/
    main.go) and adds `commit_sha` and `tag_name` to the fields the v2beta1 swagger documents;
    the generated response model would drop them."""
    import kfp_server_api

    config = kfp_server_api.Configuration(host=target.host)
    config.retries = 0
    if target.token:
        config.api_key["authorization"] = target.token
        config.api_key_prefix["authorization"] = "Bearer"
    api = kfp_server_api.HealthzServiceApi(kfp_server_api.ApiClient(config))
    response = api.healthz_service_get_healthz(
        _preload_content=False, _request_timeout=HEALTHZ_TIMEOUT_S
    )
    try:
        body = json.loads(response.data)
    except ValueError:
        body = None
    finally:
        response.release_conn()
    if not isinstance(body, dict):
        # A login page of the gateway in front of Kubeflow answers 200 too.
        raise FlywheelError(
            f"Kubeflow Pipelines at {target.host}: the health check did not answer JSON "
            "(a login page? check --host and the token)"
        )
    tag = body.get("tag_name")
    return ServerInfo(bool(body.get("multi_user")), tag if isinstance(tag, str) else None)


def _make_client(target: KfpTarget, server: ServerInfo) -> Any:
    import kfp
    import kfp_server_api

    healthz = kfp_server_api.V2beta1GetHealthzResponse(multi_user=server.multi_user)

    class _Client(kfp.Client):
        def get_kfp_healthz(self, sleep_duration: int = 5) -> Any:
            # kfp.Client asks when it needs to; the answer is already here.
            return healthz

    # A namespace given here becomes the client's default without writing
    # ~/.config/kfp/context.json (set_user_namespace would); every call below passes it too.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return _Client(
            host=target.host,
            namespace=target.namespace or "kubeflow",
            existing_token=target.token,
            ui_host=target.ui_host,
        )


# ------------------------------------------------------------------- the session


class KfpSession:
    """One connection to a Kubeflow Pipelines API; every call goes through kfp.Client.
    `warn` receives one-line warnings (default: this module's logger)."""

    def __init__(self, target: KfpTarget, *, warn: Callable[[str], None] | None = None):
        self.target = target
        self.warn = warn or log.warning
        with _translated(target, "health check"):
            self.server = _healthz(target)
            self.client = _make_client(target, self.server)
        # With a namespace the server's mode does not matter (it is sent with every call);
        # without one, a multi-user server must be refused before any work.
        if self.server.multi_user and not target.namespace:
            raise ConfigError(
                f"Kubeflow Pipelines at {target.host} is multi-user: set kfp.namespace in the "
                "profile or pass --namespace"
            )

    def require_backend(self, need: Requirement) -> None:
        """Refuse a server older than `need` (FlywheelError, one line naming both versions);
        warn and go on where its version is not a release (a dev build)."""
        verdict = check_backend(self.target.host, self.server.tag_name, need)
        if verdict.refusal:
            raise FlywheelError(verdict.refusal)
        if verdict.warning:
            self.warn(verdict.warning)

    @contextlib.contextmanager
    def _call(self, action: str) -> Iterator[None]:
        # kfp.Client prints "Run details: ..." links itself; we print our own.
        with (
            _translated(self.target, action),
            contextlib.redirect_stdout(io.StringIO()),
            _deadline(CALL_TIMEOUT_S),
        ):
            yield

    # --------------------------------------------------------------- pipelines
    def _find_pipeline(self, name: str) -> str | None:
        with self._call(f"looking up pipeline '{name}'"):
            result = self.client.list_pipelines(
                filter=eq_filter("display_name", name),
                namespace=self.target.namespace,
                page_size=2,
            )
        matches = [p for p in result.pipelines or [] if p.display_name == name]
        if len(matches) > 1:
            raise FlywheelError(f"several pipelines are named '{name}' on {self.target.host}")
        return matches[0].pipeline_id if matches else None

    def _find_version(self, pipeline_id: str, version_name: str, digest: str) -> Any | None:
        token = ""
        while True:
            with self._call("listing pipeline versions"):
                page = self.client.list_pipeline_versions(
                    pipeline_id, page_token=token, page_size=PAGE_SIZE
                )
            for v in page.pipeline_versions or []:
                if v.name == version_name or f"{DIGEST_TAG}{digest}" in (v.description or ""):
                    return v
            token = page.next_page_token or ""
            if not token:
                return None

    def ensure_pipeline_version(self, upload: Upload) -> PipelineRef:
        """Upload the package as a version of its pipeline unless the same bytes are there."""
        name, version_name, digest = upload.pipeline_name, upload.version_name, upload.digest
        pipeline_id = self._find_pipeline(name)
        if pipeline_id is None:
            with self._call(f"uploading pipeline '{name}'"):
                pipeline = self.client.upload_pipeline(
                    str(upload.package),
                    name,
                    description=upload.description,
                    namespace=self.target.namespace,
                )
            pipeline_id = pipeline.pipeline_id
            # The upload created the first version from the same bytes and description; the
            # server names it (after the pipeline), so it is found by the digest it carries.
            found = self._find_version(pipeline_id, version_name, digest)
            if found is None:
                raise FlywheelError(f"pipeline '{name}' was uploaded but has no version")
            label = _version_label(found, version_name)
            return PipelineRef(pipeline_id, found.pipeline_version_id, name, label, digest, True)
        found = self._find_version(pipeline_id, version_name, digest)
        if found is not None:
            label = _version_label(found, version_name)
            log.info("pipeline %s: version %s already uploaded", name, label)
            return PipelineRef(pipeline_id, found.pipeline_version_id, name, label, digest, False)
        with self._call(f"uploading version '{version_name}'"):
            version = self.client.upload_pipeline_version(
                str(upload.package),
                version_name,
                pipeline_id=pipeline_id,
                description=upload.description,
            )
        return PipelineRef(
            pipeline_id, version.pipeline_version_id, name, version_name, digest, True
        )

    def ensure_experiment(self, name: str) -> str:
        with self._call(f"getting or creating experiment '{name}'"):
            exp = self.client.create_experiment(name, namespace=self.target.namespace)
        return exp.experiment_id

    # -------------------------------------------------------------------- runs
    def create_run(self, spec: RunSpec, ref: PipelineRef, experiment_id: str) -> SubmittedRun:
        with self._call("creating a run"):
            run = self.client.run_pipeline(
                experiment_id,
                spec.name,
                params=spec.parameters,
                pipeline_id=ref.pipeline_id,
                version_id=ref.version_id,
                service_account=spec.service_account,
            )
        return SubmittedRun(
            run.run_id, self.target.run_url(run.run_id), experiment_id, ref, spec.parameters
        )

    def wait(
        self,
        run_id: str,
        *,
        timeout_s: float,
        poll_s: float = 5.0,
        on_state: Callable[[str], None] | None = None,
    ) -> str:
        """Follow a run to a terminal state; FlywheelError when it fails or times out.

        Not `kfp.Client.wait_for_run_completion`: that loop does not treat CANCELED as
        final (it would wait out the timeout) and reports no intermediate states.
        """
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            with self._call(f"getting run {run_id}"):
                run = self.client.get_run(run_id)
            state = str(run.state or "PENDING").upper()
            if state != last and on_state:
                on_state(state)
            last = state
            if state in TERMINAL_OK:
                return state
            if state in TERMINAL_BAD:
                why = f": {run.error.message}" if run.error and run.error.message else ""
                raise FlywheelError(
                    f"run {run_id} ended {state}{why} ({self.target.run_url(run_id)})"
                )
            if time.monotonic() > deadline:
                raise FlywheelError(
                    f"run {run_id} still {state} after {timeout_s:.0f} s ({self.target.run_url(run_id)})"
                )
            time.sleep(poll_s)

    # ---------------------------------------------------------- recurring runs
    def create_recurring_run(
        self, spec: RunSpec, ref: PipelineRef, experiment_id: str
    ) -> RecurringRunInfo:
        clash = [r for r in self.list_recurring_runs() if r.name == spec.name]
        if clash:
            raise FlywheelError(
                f"a recurring run named '{spec.name}' exists ({clash[0].recurring_run_id}); "
                "delete it first or pass another --name"
            )
        with self._call(f"creating recurring run '{spec.name}'"):
            rec = self.client.create_recurring_run(
                experiment_id,
                spec.name,
                description=spec.upload.description,
                cron_expression=spec.cron,
                max_concurrency=spec.max_concurrency,
                no_catchup=spec.no_catchup,
                params=spec.parameters,
                pipeline_id=ref.pipeline_id,
                version_id=ref.version_id,
                service_account=spec.service_account,
            )
        return _info(rec)

    def list_recurring_runs(self) -> list[RecurringRunInfo]:
        out: list[RecurringRunInfo] = []
        token = ""
        while True:
            with self._call("listing recurring runs"):
                page = self.client.list_recurring_runs(
                    page_token=token, page_size=PAGE_SIZE, namespace=self.target.namespace
                )
            out.extend(_info(r) for r in page.recurring_runs or [])
            token = page.next_page_token or ""
            if not token:
                return out

    def find_recurring_run(self, name_or_id: str) -> str:
        """The id of the recurring run with this id or (unique) name."""
        runs = self.list_recurring_runs()
        by_id = [r for r in runs if r.recurring_run_id == name_or_id]
        if by_id:
            return by_id[0].recurring_run_id
        by_name = [r for r in runs if r.name == name_or_id]
        if not by_name:
            raise FlywheelError(
                f"no recurring run named or with id '{name_or_id}' on {self.target.host}"
            )
        if len(by_name) > 1:
            ids = ", ".join(r.recurring_run_id for r in by_name)
            raise FlywheelError(
                f"several recurring runs are named '{name_or_id}' ({ids}); pass the id"
            )
        return by_name[0].recurring_run_id

    def pause(self, name_or_id: str) -> str:
        rid = self.find_recurring_run(name_or_id)
        with self._call(f"pausing recurring run {rid}"):
            self.client.disable_recurring_run(rid)
        return rid

    def resume(self, name_or_id: str) -> str:
        rid = self.find_recurring_run(name_or_id)
        with self._call(f"resuming recurring run {rid}"):
            self.client.enable_recurring_run(rid)
        return rid

    def delete(self, name_or_id: str) -> str:
        rid = self.find_recurring_run(name_or_id)
        with self._call(f"deleting recurring run {rid}"):
            self.client.delete_recurring_run(rid)
        return rid


def _version_label(version: Any, fallback: str) -> str:
    """A version's name as the server shows it. Servers before KFP 2.14 return no `name`,
    only `display_name`; a dry run has no version at all."""
    if version is None:
        return fallback
    return version.display_name or version.name or version.pipeline_version_id


def _info(rec: Any) -> RecurringRunInfo:
    trigger = rec.trigger
    cron = trigger.cron_schedule.cron if trigger and trigger.cron_schedule else None
    ref = rec.pipeline_version_reference
    return RecurringRunInfo(
        recurring_run_id=rec.recurring_run_id,
        name=rec.display_name,
        status=str(rec.status or ("ENABLED" if rec.mode == "ENABLE" else "DISABLED")),
        cron=cron,
        experiment_id=rec.experiment_id,
        pipeline_version_id=ref.pipeline_version_id if ref else None,
        max_concurrency=int(rec.max_concurrency) if rec.max_concurrency is not None else None,
        no_catchup=rec.no_catchup,
        created_at=str(rec.created_at) if rec.created_at else None,
    )


# ------------------------------------------------------------- whole operations


def start_run(session: KfpSession, spec: RunSpec) -> SubmittedRun:
    if spec.backend is not None:
        session.require_backend(spec.backend)
    ref = session.ensure_pipeline_version(spec.upload)
    experiment_id = session.ensure_experiment(spec.experiment)
    return session.create_run(spec, ref, experiment_id)


def create_schedule(session: KfpSession, spec: RunSpec) -> RecurringRunInfo:
    if spec.backend is not None:
        session.require_backend(spec.backend)
    ref = session.ensure_pipeline_version(spec.upload)
    experiment_id = session.ensure_experiment(spec.experiment)
    return session.create_recurring_run(spec, ref, experiment_id)


def submit(
    session: KfpSession, profile: Profile, pipeline: str, package: Path, **kw: Any
) -> SubmittedRun:
    """Upload (if new) and start one run of a compiled pipeline; returns its UI URL."""
    return start_run(session, submit_spec(profile, pipeline, package, **kw))


def schedule(
    session: KfpSession, profile: Profile, pipeline: str, package: Path, cron: str, **kw: Any
) -> RecurringRunInfo:
    """A recurring run of a compiled pipeline on a standard 5-field cron schedule."""
    return create_schedule(session, schedule_spec(profile, pipeline, package, cron, **kw))
