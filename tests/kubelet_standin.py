"""A STAND-IN for the kubelet, between kfp.local's DockerRunner and podman's Docker API.

kfp.local's DockerRunner starts every task as a container from the task's image, with the
environment the YAML's `env:` gives the task, and nothing of the YAML's `platforms: kubernetes:`
section: on a cluster the kubelet turns a task's `secretAsEnv` entries into its pod's
variables, and only that task's. This proxy listens on the socket kfp.local is pointed at
(`DOCKER_HOST`) and relays every Docker API request to podman's socket byte for byte, except
one: the container create. There it does for that one container what the kubelet does for the
task's pod, and nothing more:

- the environment is exactly the task's YAML `env:` (what kfp.local sent) plus the variables
  its own `secretAsEnv` entries map, filled from a Secret store the test holds; a task that
  names no Secret gets none, and any other variable the request carried is refused (the
  test fails: kfp.local must not leak the driver's environment into a pod);
- `emptyDir` mounts the task's platform config declares become anonymous volumes;
- the container runs as the image's own user (the request may not override it), on the host
  network (the services are on 127.0.0.1), with a `/dev/shm` of `shm_bytes`.

Every container it created is recorded (task, image, user, variable names, mounts) for the
tests to check. The task is found from the executor input in the command: kfp.local writes a
task's outputs under `<pipeline root>/<run>/<component name without comp->/`.

It is not the kubelet: image pulls, resource limits, probes, eviction and the pod's own
network are not played. It only applies what the YAML says to each container, so a task that
needs something the YAML does not give fails here as it would in a pod.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CREATE_SUFFIX = "/containers/create"
STANDIN_LABEL = "flywheel.kubelet-standin"


@dataclass
class TaskPlatform:
    """What one executor's Kubernetes platform config asks of its pod."""

    secret_env: dict[str, tuple[str, str]] = field(default_factory=dict)  # var -> (secret, key)
    empty_dirs: dict[str, str | None] = field(default_factory=dict)  # mount path -> medium
    env: dict[str, str] = field(default_factory=dict)  # the executor's container env


def task_platforms(compiled_yaml: Path) -> dict[str, TaskPlatform]:
    """Task directory name (component name without `comp-`) -> its pod's platform config."""
    docs = [d for d in yaml.safe_load_all(compiled_yaml.read_text()) if d]
    spec = docs[0]
    containers = {
        label: ex.get("container", {})
        for label, ex in spec.get("deploymentSpec", {}).get("executors", {}).items()
    }
    executors = {}
    for doc in docs[1:]:
        executors.update(
            doc.get("platforms", {})
            .get("kubernetes", {})
            .get("deploymentSpec", {})
            .get("executors", {})
        )
    out: dict[str, TaskPlatform] = {}
    for comp_name, comp in spec.get("components", {}).items():
        label = comp.get("executorLabel")
        if not label:
            continue
        platform = TaskPlatform()
        config = executors.get(label, {})
        for item in config.get("secretAsEnv", []):
            secret = (
                item.get("secretName") or item["secretNameParameter"]["runtimeValue"]["constant"]
            )
            for pair in item.get("keyToEnv", []):
                platform.secret_env[pair["envVar"]] = (secret, pair["secretKey"])
        for item in config.get("emptyDirMounts", []):
            platform.empty_dirs[item["mountPath"]] = item.get("medium")
        platform.env = {e["name"]: e["value"] for e in containers.get(label, {}).get("env", [])}
        out[comp_name.removeprefix("comp-")] = platform
    return out


def task_of(cmd: list[str]) -> str | None:
    """The task directory name from a kfp.local command's `--executor_input`."""
    for i, arg in enumerate(cmd[:-1]):
        if arg == "--executor_input":
            out_file = json.loads(cmd[i + 1])["outputs"]["outputFile"]
            return Path(out_file).parent.name
    return None


class KubeletStandin:
    """Serve a Docker API socket at `listen`, relaying to `upstream` (podman's socket)."""

    def __init__(
        self,
        listen: Path,
        upstream: Path,
        secrets: dict[str, dict[str, str]],
        volumes: Path,
        pipeline_root: Path,
        shm_bytes: int = 1 << 30,
    ):
        self.listen, self.upstream, self.secrets, self.shm_bytes = (
            listen,
            upstream,
            secrets,
            shm_bytes,
        )
        self.volumes = volumes  # where disk-backed emptyDirs live on the host
        self.pipeline_root = str(pipeline_root)
        self.label = f"{os.getpid()}-{id(self)}"  # this kubelet's containers
        self.platforms: dict[str, TaskPlatform] = {}
        self.pods: list[dict[str, Any]] = []
        self.refused: list[str] = []
        self._server: socket.socket | None = None

    # -------------------------------------------------------------- what the kubelet does

    def use(self, *compiled: Path) -> None:
        """The pipelines (and their nested ones) whose tasks this kubelet will start."""
        self.platforms = {}
        for path in compiled:
            self.platforms.update(task_platforms(path))

    def admit(self, body: dict[str, Any]) -> dict[str, Any]:
        cmd = body.get("Cmd") or []
        task = task_of(cmd)
        platform = self.platforms.get(task or "")
        if platform is None:
            self.refused.append(f"no compiled task for container command {cmd[:3]}...")
            platform = TaskPlatform()
        given = dict(e.split("=", 1) for e in body.get("Env") or [])
        if given != platform.env:
            self.refused.append(
                f"{task}: env {sorted(given)} is not the YAML's {sorted(platform.env)}"
            )
        env = dict(given)
        for var, (secret, key) in platform.secret_env.items():
            env[var] = self.secrets[secret][key]
        if body.get("User"):
            self.refused.append(f"{task}: the request sets User={body['User']}")
            body.pop("User")
        host = body.setdefault("HostConfig", {})
        host["NetworkMode"] = "host"
        host["ShmSize"] = self.shm_bytes
        # kfp.local asks podman to remove the container at exit, then asks for its exit code;
        # when the removal wins, DockerRunner reads the missing container as a success (and
        # its logs as empty). A pod's status outlives its container: keep it, remove it later.
        host["AutoRemove"] = False
        body["Labels"] = {**(body.get("Labels") or {}), STANDIN_LABEL: self.label}
        # Only KFP's pipeline root (a pod's artifacts) is mounted; kfp.local also binds one
        # host workspace into every task, a disk tasks would share, which no pipeline here
        # declares (dsl.PipelineConfig workspace).
        binds = [b for b in host.get("Binds") or [] if b.split(":", 1)[0] == self.pipeline_root]
        for path, medium in platform.empty_dirs.items():
            if path == "/dev/shm":
                continue  # the shm size above
            if medium == "Memory":
                host.setdefault("Tmpfs", {})[path] = "mode=1777"
                continue
            # A pod's emptyDir is a fresh, world-writable directory on the node's disk.
            vol = Path(tempfile.mkdtemp(prefix="emptydir-", dir=self.volumes))
            vol.chmod(0o777)
            binds.append(f"{vol}:{path}:rw")
        host["Binds"] = binds
        body["Env"] = [f"{k}={v}" for k, v in env.items()]
        self.pods.append(
            {
                "task": task,
                "image": body.get("Image"),
                "env": sorted(env),
                "task_env": sorted(given),
                "secret_env": sorted(platform.secret_env),
                "binds": binds,
                "empty_dirs": sorted(platform.empty_dirs),
                "user": body.get("User") or "image",
            }
        )
        return body

    # ------------------------------------------------------------------ the relay

    def __enter__(self) -> KubeletStandin:
        self.listen.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self.listen))
        os.chmod(self.listen, 0o600)
        server.listen(16)
        self._server = server
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        self.listen.unlink(missing_ok=True)

    def _accept(self) -> None:
        assert self._server is not None
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(str(self.upstream))
        except OSError:
            client.close()
            return
        # Responses (log streams included) flow back untouched.
        threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
        reader = client.makefile("rb")
        try:
            while True:
                head = _read_head(reader)
                if head is None:
                    break
                request_line, headers = head
                method, path = request_line.split(" ")[:2]
                if headers.get("transfer-encoding", "").lower() == "chunked":
                    upstream.sendall(_raw_head(request_line, headers))
                    _relay_chunked(reader, upstream)
                    continue
                body = reader.read(int(headers.get("content-length", "0") or 0))
                if method == "POST" and path.split("?")[0].endswith(CREATE_SUFFIX) and body:
                    body = json.dumps(self.admit(json.loads(body))).encode()
                    headers["content-length"] = str(len(body))
                upstream.sendall(_raw_head(request_line, headers) + body)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                upstream.shutdown(socket.SHUT_WR)


def _read_head(reader: Any) -> tuple[str, dict[str, str]] | None:
    request_line = reader.readline()
    if not request_line:
        return None
    headers: dict[str, str] = {}
    while True:
        line = reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return request_line.decode("latin-1").rstrip("\r\n"), headers


def _raw_head(request_line: str, headers: dict[str, str]) -> bytes:
    lines = [request_line, *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _relay_chunked(reader: Any, upstream: socket.socket) -> None:
    while True:
        size_line = reader.readline()
        upstream.sendall(size_line)
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        upstream.sendall(reader.read(size + 2))  # the chunk and its CRLF
        if size == 0:
            return


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
