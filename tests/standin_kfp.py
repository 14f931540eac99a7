"""A STAND-IN for the Kubeflow Pipelines API server (v2beta1), for tests only.

No Kubeflow cluster runs here, so the real `kfp.Client` is pointed at this small
threaded HTTP server on 127.0.0.1. It implements only the endpoints Flywheel's client
uses (healthz; pipeline upload / upload_version / list / get; pipeline versions list;
experiments create / list; runs create / get; recurring runs create / list / get /
enable / disable / delete) and keeps its state in memory.

What makes it worth testing against: every request is checked against the official
OpenAPI document in ``shared/contracts/kfp-api-v2beta1/kfp_api_single_file.swagger.json``
- the operation must exist, query parameters must be declared with the right type,
JSON bodies must validate against the swagger definition ($refs resolved) with unknown
fields rejected (the real gateway rejects them too), and fields the spec documents as
"Required input" must be present. A request that breaks the contract is answered 400
and listed in `violations`, so a test can assert the client spoke the spec exactly.

Responses are the real server's shapes; healthz's is checked against the spec too
(`HEALTHZ_EXTRA` names the two fields the real handler adds beyond it).

It is not a Kubeflow: no Argo, no scheduling; runs move through scripted states on
each GET (`run_states`), recurring runs never fire.
"""

from __future__ import annotations

import email
import email.policy
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import yaml

SPEC_FILE = "kfp_api_single_file.swagger.json"
# The API server's healthz is a hand-written handler (backend/src/apiserver/main.go), not the
# gateway's: beside the two fields the swagger's v2beta1GetHealthzResponse documents it writes
# these, from the server's COMMIT_SHA and TAG_NAME settings ("unknown" when unset).
HEALTHZ_EXTRA = ("commit_sha", "tag_name")
# The release whose SDK the project locks (kfp 2.17): what a current server reports.
DEFAULT_TAG_NAME = "2.17.0"
_REQUIRED_DESC = re.compile(r"^\s*(Required input|Input\. Required)")


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any  # parsed JSON, a dict of multipart fields, or None


@dataclass
class _Injected:
    method: str
    path_re: re.Pattern[str]
    status: int
    message: str
    times: int


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: int = 3):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _strict(schema: Any) -> Any:
    """The swagger schema as the real gateway applies it (proto3 JSON mapping)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if out.get("type") == "string" and out.get("format") in ("int64", "uint64"):
            # proto3 JSON accepts 64-bit integers as numbers or strings.
            out["type"] = ["string", "integer"]
        if "properties" in out:
            out.setdefault("additionalProperties", False)
            required = [
                name
                for name, prop in schema["properties"].items()
                if _REQUIRED_DESC.match(prop.get("description") or "")
                and "package_url" not in name  # only for create-by-URL, which we don't serve
            ]
            if required:
                out["required"] = required
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class ContractChecker:
    """Matches a request to an operation of the spec and validates it."""

    def __init__(self, contracts_dir: Path):
        spec = json.loads((Path(contracts_dir) / "kfp-api-v2beta1" / SPEC_FILE).read_text())
        self.definitions = _strict(spec["definitions"])
        self.ops: list[tuple[str, re.Pattern[str], str, dict[str, Any]]] = []
        for template, methods in spec["paths"].items():
            regex = re.sub(
                r"\{([^}]+)\}", lambda m: f"(?P<{m.group(1).replace('.', '__')}>[^/:]+)", template
            )
            for method, op in methods.items():
                self.ops.append((method.upper(), re.compile(f"^{regex}$"), template, op))
        # Literal paths (`/pipelines/upload`) win over templated ones (`/pipelines/{id}`).
        self.ops.sort(key=lambda o: o[2].count("{"))
        self.enums = {name: d["enum"] for name, d in spec["definitions"].items() if "enum" in d}

    def match(self, method: str, path: str) -> tuple[dict[str, Any], dict[str, str]]:
        for op_method, regex, _template, op in self.ops:
            m = regex.match(path)
            if m and op_method == method:
                return op, {k.replace("__", "."): v for k, v in m.groupdict().items()}
        raise HttpError(404, f"{method} {path} is not an operation of the v2beta1 spec", 5)

    def validate_schema(self, instance: Any, ref: str, where: str) -> None:
        schema = {"$ref": ref, "definitions": self.definitions}
        errors = sorted(
            jsonschema.Draft4Validator(schema).iter_errors(instance), key=lambda e: list(e.path)
        )
        if errors:
            e = errors[0]
            loc = ".".join(str(p) for p in e.absolute_path) or "(body)"
            raise HttpError(400, f"{where} violates {ref.rsplit('/', 1)[-1]} at {loc}: {e.message}")

    def check_query(self, op: dict[str, Any], query: dict[str, str]) -> None:
        declared = {p["name"]: p for p in op.get("parameters", []) if p["in"] == "query"}
        for name, value in query.items():
            if name not in declared:
                raise HttpError(
                    400, f"query parameter '{name}' is not declared for {op['operationId']}"
                )
            kind = declared[name].get("type")
            if kind == "integer" and not re.fullmatch(r"-?\d+", value):
                raise HttpError(400, f"query parameter '{name}' must be an integer, got {value!r}")
            if kind == "boolean" and value not in ("true", "false"):
                raise HttpError(400, f"query parameter '{name}' must be true or false")
        if query.get("filter"):
            self.check_filter(query["filter"])

    def check_filter(self, text: str) -> None:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HttpError(400, f"filter is not JSON: {exc}") from None

        def normalise(node: Any) -> Any:  # protojson accepts json_name (camelCase) and enum numbers
            if isinstance(node, dict):
                out = {_snake(k): normalise(v) for k, v in node.items()}
                if isinstance(out.get("operation"), int):
                    ops = self.enums["v2beta1PredicateOperation"]
                    if not 0 <= out["operation"] < len(ops):
                        raise HttpError(
                            400, f"filter operation {out['operation']} is not a known enum value"
                        )
                    out["operation"] = ops[out["operation"]]
                return out
            if isinstance(node, list):
                return [normalise(v) for v in node]
            return node

        self.validate_schema(normalise(raw), "#/definitions/v2beta1Filter", "filter")

    def check_body(self, op: dict[str, Any], body: Any) -> None:
        for p in op.get("parameters", []):
            if p["in"] == "body":
                schema = p.get("schema", {})
                if "$ref" in schema:
                    self.validate_schema(body, schema["$ref"], "request body")
                return
        if body not in (None, {}, b""):
            raise HttpError(400, f"{op['operationId']} takes no request body")


class KfpStandIn:
    """Start with `with KfpStandIn(contracts_dir) as kfp:`; `kfp.url` is the host."""

    def __init__(
        self,
        contracts_dir: Path,
        *,
        multi_user: bool = False,
        token: str | None = None,
        run_states: tuple[str, ...] = ("RUNNING", "SUCCEEDED"),
        tag_name: str | None = DEFAULT_TAG_NAME,
    ):
        """`tag_name`: the release healthz reports (None: the field is left out)."""
        self.checker = ContractChecker(contracts_dir)
        self.multi_user = multi_user
        self.tag_name = tag_name
        self.token = token
        self.run_states = run_states
        self.requests: list[Recorded] = []
        self.violations: list[str] = []
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, dict[str, Any]] = {}
        self.packages: dict[str, bytes] = {}  # version id -> uploaded file
        self.experiments: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.recurring: dict[str, dict[str, Any]] = {}
        self._injected: list[_Injected] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> KfpStandIn:
        handler = _handler_for(self)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fail(self, method: str, path_regex: str, status: int, message: str, times: int = 1) -> None:
        """Answer the next `times` matching requests with an error (googleRpcStatus body)."""
        self._injected.append(_Injected(method, re.compile(path_regex), status, message, times))

    def calls(self, method: str | None = None, path_regex: str = "") -> list[Recorded]:
        return [
            r
            for r in self.requests
            if (method is None or r.method == method) and re.search(path_regex, r.path)
        ]

    # ------------------------------------------------------------------ dispatch
    def handle(
        self, method: str, raw_path: str, headers: dict[str, str], payload: bytes
    ) -> tuple[int, Any]:
        parts = urlsplit(raw_path)
        path = parts.path
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        body: Any = None
        content_type = headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            body = _parse_multipart(content_type, payload)
        elif payload:
            try:
                body = json.loads(payload)
            except json.JSONDecodeError:
                body = payload
        with self._lock:
            self.requests.append(Recorded(method, path, query, dict(headers), body))
            try:
                for inj in self._injected:
                    if inj.times > 0 and inj.method == method and inj.path_re.search(path):
                        inj.times -= 1
                        raise HttpError(inj.status, inj.message, 13 if inj.status >= 500 else 3)
                if self.token is not None:
                    auth = headers.get("authorization")
                    if auth != f"Bearer {self.token}":
                        raise HttpError(401, "Unauthenticated: missing or invalid bearer token", 16)
                op, path_params = self.checker.match(method, path)
                try:
                    self.checker.check_query(op, query)
                    if content_type.startswith("multipart/form-data"):
                        if "uploadfile" not in (body or {}):
                            raise HttpError(400, "multipart field 'uploadfile' is required")
                    else:
                        self.checker.check_body(op, body)
                except HttpError as exc:
                    self.violations.append(f"{method} {path}: {exc.message}")
                    raise
                return 200, getattr(self, "_op_" + op["operationId"])(path_params, query, body)
            except HttpError as exc:
                return exc.status, {"code": exc.code, "message": exc.message, "details": []}

    def _new_id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids):04d}"

    @staticmethod
    def _now() -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    # ----------------------------------------------------------------- operations
    def _op_HealthzService_GetHealthz(self, p, q, b):
        body = {
            "commit_sha": "0123abc",
            "tag_name": self.tag_name,
            "multi_user": self.multi_user,
            "pipeline_store": "database",
        }
        body = {k: v for k, v in body.items() if v is not None}
        # What the spec documents keeps to it, like every request the stand-in takes.
        documented = {k: v for k, v in body.items() if k not in HEALTHZ_EXTRA}
        self.checker.validate_schema(
            documented, "#/definitions/v2beta1GetHealthzResponse", "healthz response"
        )
        return body

    @staticmethod
    def _spec(data: bytes) -> Any:
        """The package as the server stores it: a pipeline spec, followed by a platform spec
        (kfp-kubernetes settings) when the YAML has a second document."""
        docs = list(yaml.safe_load_all(data))
        if len(docs) > 1:
            return {"pipeline_spec": docs[0], "platform_spec": docs[1]}
        return docs[0] if docs else None

    def _check_package(self, data: bytes) -> None:
        try:
            doc = self._spec(data)
        except yaml.YAMLError as exc:
            raise HttpError(400, f"uploaded file is not YAML: {exc}") from None
        spec = doc.get("pipeline_spec", doc) if isinstance(doc, dict) else None
        if not isinstance(spec, dict) or "pipelineInfo" not in spec or "root" not in spec:
            raise HttpError(400, "uploaded file is not a compiled pipeline (no pipelineInfo/root)")

    def _op_UploadPipeline(self, p, q, b):
        name = q.get("name") or q.get("display_name")
        if not name:
            raise HttpError(400, "pipeline name is required")
        namespace = q.get("namespace", "")
        data = b["uploadfile"]
        self._check_package(data)
        if any(
            x["name"] == name and x.get("namespace", "") == namespace
            for x in self.pipelines.values()
        ):
            raise HttpError(
                409,
                f"Failed to create a new pipeline. The name {name} already exists. Please specify a new name",
                6,
            )
        pid = self._new_id("pipeline")
        pipeline = {
            "pipeline_id": pid,
            "name": name,
            "display_name": name,
            "description": q.get("description", ""),
            "created_at": self._now(),
            "namespace": namespace,
        }
        self.pipelines[pid] = pipeline
        # Like the real server: the upload also creates the first version, named after the
        # pipeline and carrying its description.
        self._add_version(pid, name, q.get("description", ""), data)
        return pipeline

    def _add_version(self, pid: str, name: str, description: str, data: bytes) -> dict[str, Any]:
        if any(v["pipeline_id"] == pid and v["name"] == name for v in self.versions.values()):
            raise HttpError(
                409, f"Failed to create a new pipeline version. The name {name} already exists", 6
            )
        vid = self._new_id("version")
        version = {
            "pipeline_id": pid,
            "pipeline_version_id": vid,
            "name": name,
            "display_name": name,
            "description": description,
            "created_at": self._now(),
            "pipeline_spec": self._spec(data),
        }
        self.versions[vid] = version
        self.packages[vid] = data
        return version

    def _op_UploadPipelineVersion(self, p, q, b):
        pid = q.get("pipelineid")
        if not pid or pid not in self.pipelines:
            raise HttpError(404, f"pipeline {pid!r} not found", 5)
        if not q.get("name"):
            raise HttpError(400, "pipeline version name is required")
        self._check_package(b["uploadfile"])
        return self._add_version(pid, q["name"], q.get("description", ""), b["uploadfile"])

    @staticmethod
    def _filtered(items: list[dict[str, Any]], q: dict[str, str], key: str) -> dict[str, Any]:
        if q.get("filter"):
            for pred in json.loads(q["filter"]).get("predicates", []):
                field_name = pred.get("key")
                value = pred.get("string_value", pred.get("stringValue"))
                items = [i for i in items if str(i.get(field_name)) == str(value)]
        start = int(q.get("page_token") or 0)
        size = int(q.get("page_size") or 10)
        page = items[start : start + size]
        out: dict[str, Any] = {"total_size": len(items)}
        if page:
            out[key] = page
        if start + size < len(items):
            out["next_page_token"] = str(start + size)
        return out

    def _op_PipelineService_ListPipelines(self, p, q, b):
        ns = q.get("namespace", "")
        items = [x for x in self.pipelines.values() if x.get("namespace", "") == ns]
        return self._filtered(items, q, "pipelines")

    def _op_PipelineService_GetPipeline(self, p, q, b):
        if p["pipeline_id"] not in self.pipelines:
            raise HttpError(404, f"pipeline {p['pipeline_id']} not found", 5)
        return self.pipelines[p["pipeline_id"]]

    def _op_PipelineService_ListPipelineVersions(self, p, q, b):
        items = [
            {k: v for k, v in x.items() if k != "pipeline_spec"}
            for x in self.versions.values()
            if x["pipeline_id"] == p["pipeline_id"]
        ]
        return self._filtered(items, q, "pipeline_versions")

    def _op_ExperimentService_CreateExperiment(self, p, q, b):
        ns = b.get("namespace", "")
        if self.multi_user and not ns:
            raise HttpError(
                400, "Invalid input error: In multi-user mode, experiment namespace is required"
            )
        if any(
            e["display_name"] == b["display_name"] and e["namespace"] == ns
            for e in self.experiments.values()
        ):
            raise HttpError(409, f"experiment {b['display_name']} already exists", 6)
        eid = self._new_id("experiment")
        exp = {
            **b,
            "experiment_id": eid,
            "namespace": ns,
            "created_at": self._now(),
            "storage_state": "AVAILABLE",
        }
        self.experiments[eid] = exp
        return exp

    def _op_ExperimentService_ListExperiments(self, p, q, b):
        ns = q.get("namespace", "")
        items = [e for e in self.experiments.values() if e["namespace"] == ns]
        return self._filtered(items, q, "experiments")

    def _version_of(self, body: dict[str, Any]) -> dict[str, Any]:
        ref = body.get("pipeline_version_reference") or {}
        vid = ref.get("pipeline_version_id")
        if vid not in self.versions or self.versions[vid]["pipeline_id"] != ref.get("pipeline_id"):
            raise HttpError(
                404, f"pipeline version {vid!r} of pipeline {ref.get('pipeline_id')!r} not found", 5
            )
        if body.get("experiment_id") and body["experiment_id"] not in self.experiments:
            raise HttpError(404, f"experiment {body['experiment_id']} not found", 5)
        version = self.versions[vid]
        # The real server resolves parameters against the pipeline's root inputs.
        spec = version["pipeline_spec"]
        spec = spec.get("pipeline_spec", spec)
        declared = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
        for name in (body.get("runtime_config") or {}).get("parameters") or {}:
            if name not in declared:
                raise HttpError(400, f"parameter '{name}' is not an input of the pipeline", 3)
        return version

    def _op_RunService_CreateRun(self, p, q, b):
        self._version_of(b)
        rid = self._new_id("run")
        run = {**b, "run_id": rid, "state": "PENDING", "created_at": self._now(), "_polls": 0}
        self.runs[rid] = run
        return {k: v for k, v in run.items() if not k.startswith("_")}

    def _op_RunService_GetRun(self, p, q, b):
        run = self.runs.get(p["run_id"])
        if run is None:
            raise HttpError(404, f"run {p['run_id']} not found", 5)
        run["state"] = self.run_states[min(run["_polls"], len(self.run_states) - 1)]
        run["_polls"] += 1
        out = {k: v for k, v in run.items() if not k.startswith("_")}
        if run["state"] == "FAILED":
            out["error"] = {"code": 2, "message": "task 'train' failed: exit code 1", "details": []}
        return out

    def _op_RecurringRunService_CreateRecurringRun(self, p, q, b):
        self._version_of(b)
        trigger = b["trigger"]
        if bool(trigger.get("cron_schedule")) == bool(trigger.get("periodic_schedule")):
            raise HttpError(
                400,
                "exactly one of trigger.cron_schedule and trigger.periodic_schedule is required",
            )
        cron = (trigger.get("cron_schedule") or {}).get("cron")
        if cron is not None and len(cron.split()) != 6:
            raise HttpError(
                400, f"invalid cron '{cron}': robfig/cron expects 6 fields (seconds first)"
            )
        if not 1 <= int(b["max_concurrency"]) <= 10:
            raise HttpError(400, "max_concurrency must be in [1, 10]")
        rid = self._new_id("recurring")
        status = "ENABLED" if b.get("mode", "ENABLE") == "ENABLE" else "DISABLED"
        rec = {**b, "recurring_run_id": rid, "status": status, "created_at": self._now()}
        self.recurring[rid] = rec
        return rec

    def _op_RecurringRunService_ListRecurringRuns(self, p, q, b):
        items = list(self.recurring.values())
        if q.get("experiment_id"):
            items = [r for r in items if r.get("experiment_id") == q["experiment_id"]]
        if q.get("namespace"):
            exp_ns = {e["experiment_id"]: e["namespace"] for e in self.experiments.values()}
            items = [r for r in items if exp_ns.get(r.get("experiment_id")) == q["namespace"]]
        return self._filtered(items, q, "recurringRuns")

    def _recurring(self, rid: str) -> dict[str, Any]:
        if rid not in self.recurring:
            raise HttpError(404, f"recurring run {rid} not found", 5)
        return self.recurring[rid]

    def _op_RecurringRunService_GetRecurringRun(self, p, q, b):
        return self._recurring(p["recurring_run_id"])

    def _op_RecurringRunService_EnableRecurringRun(self, p, q, b):
        self._recurring(p["recurring_run_id"])["status"] = "ENABLED"
        return {}

    def _op_RecurringRunService_DisableRecurringRun(self, p, q, b):
        self._recurring(p["recurring_run_id"])["status"] = "DISABLED"
        return {}

    def _op_RecurringRunService_DeleteRecurringRun(self, p, q, b):
        self._recurring(p["recurring_run_id"])
        del self.recurring[p["recurring_run_id"]]
        return {}


def _parse_multipart(content_type: str, payload: bytes) -> dict[str, Any]:
    msg = email.message_from_bytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + payload, policy=email.policy.HTTP
    )
    fields: dict[str, Any] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        fields[name] = part.get_payload(decode=True)
    return fields


def _handler_for(standin: KfpStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            payload = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, body = standin.handle(self.command, self.path, headers, payload)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PATCH = _serve

        def log_message(self, *args: object) -> None:
            pass

    return Handler
