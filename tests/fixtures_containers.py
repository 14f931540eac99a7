"""Kubeflow pods, as far as one machine can make them: every task in a container of the
component image, built here.

- `component_image()`: the CPU image `make image` builds (scripts/image.sh: podman, a Debian
  base made with debootstrap). Built at most once per test session, and only when no image
  carries the current sources' hash (its `flywheel.source` label).
- `docker_api()`: podman's Docker-compatible API on a unix socket (`podman system service`),
  which the `docker` SDK, and so kfp.local's DockerRunner, drive.
- `ContainerLauncher`: runs a compiled pipeline with kfp.local's DockerRunner, the driver in a
  subprocess with an empty environment and working directory, pointed at the kubelet
  stand-in (tests/kubelet_standin.py), which relays to podman and gives each container what
  the YAML gives its pod: the task's env, its own Secrets, its emptyDirs, the image's user.
  State passes only through the pipeline root (KFP's artifacts, mounted into each container
  at the same path as kfp.local does) and the services on the host's loopback.

A task runs as the image's user (uid 1000), with the image's own HOME, no checkout, no host
path but the pipeline root, and no disk shared with another task. The container tier skips in
one line when podman is missing or cannot build the base; `make test` installs it as root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from kubelet_standin import STANDIN_LABEL, KubeletStandin

CHECKOUT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("FLYWHEEL_TEST_IMAGE", "localhost/flywheel:cpu")
CONTAINERS_CONF = CHECKOUT / "containers" / "podman" / "containers.conf"
IMAGE_UID = 1000  # containers/Dockerfile `USER 1000:1000`
IMAGE_VENV = "/opt/flywheel"

DRIVER = """
import json, sys
from kfp import local
from kfp.components import load_component_from_file

yaml_path, root, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
local.init(runner=local.DockerRunner(), pipeline_root=root, raise_on_error=False)
load_component_from_file(yaml_path)(**args)
"""


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=check,
        env=podman_env(),
    )  # fmt: skip


def _image_source(tag: str) -> str | None:
    out = podman("image", "inspect", tag, "--format", '{{index .Labels "flywheel.source"}}',
                 check=False)  # fmt: skip
    return out.stdout.strip() if out.returncode == 0 else None


def component_image() -> str:
    """The current CPU image's tag, building it (scripts/image.sh) when it is missing or stale."""
    if shutil.which("podman") is None:
        pytest.skip("container tier: podman is not installed (make image installs it as root)")
    want = subprocess.run(
        [str(CHECKOUT / "scripts" / "source_hash.sh")], capture_output=True, text=True, check=True
    ).stdout.strip()
    if _image_source(IMAGE) != want:
        log = Path(tempfile.gettempdir()) / "flywheel-image-build.log"
        with log.open("w") as out:
            built = subprocess.run(
                [str(CHECKOUT / "scripts" / "image.sh"), "--tag", IMAGE],
                stdout=out, stderr=subprocess.STDOUT, timeout=3000, check=False,
            )  # fmt: skip
        if built.returncode != 0:
            tail = log.read_text()[-1500:]
            pytest.fail(f"scripts/image.sh failed (log {log}):\n{tail}")
    return IMAGE


@contextmanager
def docker_api(root: Path) -> Iterator[Path]:
    """podman's Docker-compatible API on a socket under `root`; stopped on exit."""
    sock = root / "podman.sock"
    proc = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{sock}"],
        env=podman_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("podman system service did not start its socket")
            time.sleep(0.2)
        yield sock
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_in_image(
    image: str,
    *cmd: str,
    mounts: dict[Path, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """One command in a fresh container of the image, as its user, on the host network;
    `mounts`: host path -> "container path:ro|rw"."""
    volumes = [a for host, spec in (mounts or {}).items() for a in ("-v", f"{host}:{spec}")]
    return podman("run", "--rm", "--network", "host", *volumes, image, *cmd,
                  timeout=timeout, check=False)  # fmt: skip


class ContainerLauncher:
    """Runs compiled pipelines through kfp.local's DockerRunner, every task a container."""

    def __init__(self, root: Path, podman_socket: Path, secrets: dict[str, dict[str, str]]):
        self.root = root
        self.pipeline_root = root / "kfp-root"
        # The tasks write their outputs here as the image's user, as a pod writes its own.
        self.pipeline_root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.pipeline_root, 0o777)
        self.kubelet = KubeletStandin(
            root / "kubelet.sock", podman_socket, secrets, root, self.pipeline_root
        )

    def __enter__(self) -> ContainerLauncher:
        self.kubelet.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kubelet.__exit__(*exc)
        self.remove_containers()

    def remove_containers(self) -> None:
        """The exited containers of this kubelet's pods (it keeps them for their exit codes)."""
        podman("rm", "--force", "--filter", f"label={STANDIN_LABEL}={self.kubelet.label}",
               check=False)  # fmt: skip

    def run(self, compiled_yaml: Path, arguments: dict[str, Any], log: Path) -> PodRun:
        """Run one compiled pipeline; every task in its own container. Returns status and run dir."""
        self.kubelet.use(compiled_yaml)
        before = {p.name for p in self.pipeline_root.iterdir()}
        driver_dir = self.root / "driver"
        driver_dir.mkdir(exist_ok=True)
        start = len(self.kubelet.pods)
        with log.open("w") as out:
            proc = subprocess.run(
                [sys.executable, "-c", DRIVER, str(compiled_yaml), str(self.pipeline_root),
                 json.dumps(arguments)],
                cwd=driver_dir, stdout=out, stderr=subprocess.STDOUT, check=False,
                env={"PATH": os.environ["PATH"], "HOME": str(driver_dir), "LANG": "C.UTF-8",
                     "DOCKER_HOST": f"unix://{self.kubelet.listen}"},
                timeout=1800,
            )  # fmt: skip
        self.remove_containers()
        text = log.read_text()
        new = sorted(p for p in self.pipeline_root.iterdir() if p.name not in before)
        status = "SUCCESS" if "finished with status SUCCESS" in _pipeline_line(text) else "FAILURE"
        return PodRun(status, new[-1] if new else None, log, proc.returncode,
                      self.kubelet.pods[start:])  # fmt: skip


class PodRun:
    def __init__(self, status: str, run_dir: Path | None, log: Path, rc: int, pods: list):
        self.status, self.run_dir, self.log, self.rc, self.pods = status, run_dir, log, rc, pods

    @property
    def succeeded(self) -> bool:
        return self.status == "SUCCESS"

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text()[-n:]

    def output(self, task: str, name: str = "Output") -> Any:
        """A task's output parameter, read from its executor_output.json."""
        assert self.run_dir is not None
        data = json.loads((self.run_dir / task / "executor_output.json").read_text())
        return data.get("parameterValues", {}).get(name)


def _pipeline_line(text: str) -> str:
    """The last 'Pipeline ... finished with status' line kfp.local logs (ANSI codes removed)."""
    import re

    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [ln for ln in plain.splitlines() if "Pipeline '" in ln and "finished with status" in ln]
    return lines[-1] if lines else ""


# ---------------------------------------------------------------- a Ray cluster of containers


class RayCluster:
    """A Ray cluster laid out as KubeRay lays it out, each node a container of the image:
    a head with no CPUs (`num-cpus: 0`, KubeRay's recommended head) and workers with their
    own filesystems. Host network: every node binds its own ports on this machine, and the
    object managers move objects between nodes over TCP, as between pods."""

    def __init__(
        self,
        image: str,
        env: dict[str, str],
        workers: int = 1,
        worker_cpus: int = 2,
        head_cpus: int = 0,
    ):
        from fixtures_services import free_port

        self.image, self.env, self.workers, self.worker_cpus = image, env, workers, worker_cpus
        self.head_cpus = head_cpus  # 0: KubeRay's head, no tasks; >0: a one-node cluster
        self.port, self.dashboard = free_port(), free_port()
        self.tag = f"fwray-{os.getpid()}-{self.port}"
        self.head = f"{self.tag}-head"
        self.names = [self.head, *(f"{self.tag}-worker{i}" for i in range(workers))]

    @property
    def gcs(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, name: str, *ray_args: str) -> None:
        env_args = [a for k, v in self.env.items() for a in ("-e", f"{k}={v}")]
        podman("run", "-d", "--name", name, "--network", "host", "--shm-size", "1g", *env_args,
               self.image, "ray", "start", "--block", "--disable-usage-stats", *ray_args)  # fmt: skip

    def __enter__(self) -> RayCluster:
        self._start(self.head, "--head", "--num-cpus", str(self.head_cpus), "--port", str(self.port),
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard))  # fmt: skip
        for name in self.names[1:]:
            self._start(name, "--address", self.gcs, "--num-cpus", str(self.worker_cpus))
        want = 1 + self.workers
        deadline = time.monotonic() + 180
        while True:
            seen = self.on_head(
                "python", "-c",
                "import ray; ray.init(address='auto', logging_level='ERROR'); "
                "print(sum(n['Alive'] for n in ray.nodes()))",
                check=False, timeout=60,
            )  # fmt: skip
            if seen.returncode == 0 and seen.stdout.strip().endswith(str(want)):
                return self
            if time.monotonic() > deadline:
                logs = podman("logs", self.names[-1], check=False).stderr[-1500:]
                self.__exit__()
                pytest.fail(
                    f"the Ray cluster did not reach {want} nodes: {seen.stderr[-800:]}\n{logs}"
                )
            time.sleep(3)

    def __exit__(self, *exc: object) -> None:
        podman("rm", "--force", *self.names, check=False, timeout=120)

    def on_head(self, *cmd: str, check: bool = True, timeout: float = 900,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:  # fmt: skip
        """A process on the head node (as a RayJob's driver runs there), as the image's user."""
        env_args = [a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")]
        done = podman("exec", *env_args, self.head, *cmd, check=False, timeout=timeout)
        if check:
            assert done.returncode == 0, f"{' '.join(cmd[:4])}: {done.stderr[-3000:]}"
        return done

    def on_worker(self, *cmd: str) -> subprocess.CompletedProcess:
        return podman("exec", self.names[1], *cmd, check=False)
