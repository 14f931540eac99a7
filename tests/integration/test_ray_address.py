"""`ray.mode: address` against a real `ray start --head`, and local mode kept apart from it.

The module starts one real head node (2 CPUs, dashboard on, token auth on, every port
chosen free, its own temp dir) and always stops it by signalling the `ray start --block`
process it launched, which tears down exactly its own children. Never a bare `ray stop`:
that kills every Ray on the machine, other tests' included.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from flywheel.config import RayConfig, load_profile
from flywheel.errors import FlywheelError
from flywheel.runtime import ensure_ray, submit_job, wait_job

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).with_name("ray"))
TINY_DATA = [
    "data.source.max_docs=200",
    "data.tokenizer.vocab_size=300",
    "data.block_size=32",
    "model.context=32",
]


@dataclass(frozen=True)
class Cluster:
    base: Path  # RAY_TMPDIR under which Ray's discovery file names this cluster
    port: int
    gcs: str
    dashboard: str
    client: str


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:  # held open together, so the n ports differ
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_ready(proc: subprocess.Popen, base: Path, dashboard: str, log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        if (base / "ray" / "ray_current_cluster").exists():
            try:  # the Jobs API answers last (401 without a token is an answer)
                urllib.request.urlopen(f"{dashboard}/api/version", timeout=2).close()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                pass
        time.sleep(0.5)
    pytest.fail(f"ray start not ready after 90 s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen, base: Path, keep_logs: Path) -> None:
    # SIGTERM makes `ray start --block` kill the processes it started (its Node's
    # shutdown hook). Backstops that cannot reach another test's Ray: SIGKILL to the
    # session `start_new_session` gave it (workers keep it), then to anything whose
    # command line names our temp dir.
    import psutil

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for p in psutil.process_iter(["cmdline"]):
        try:
            if os.getsid(p.pid) == proc.pid or str(base) in " ".join(p.info["cmdline"] or []):
                p.kill()
        except (psutil.Error, OSError):
            pass
    # Keep the cluster's logs where pytest keeps its tmp dirs, for a failure's post-mortem.
    for log in (base / "ray").glob("session_*/logs/*.*"):
        if log.is_file() and log.stat().st_size < 2**20:
            dest = keep_logs / log.parent.parent.name / log.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(log, dest)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # A short path: Ray's unix sockets live under it and must fit in 107 bytes.
    base = Path(tempfile.mkdtemp(prefix="fwray-"))
    port, dash, client, agent = _free_ports(4)
    # Drain on SIGTERM waits (~30 s) for Serve proxies to quiesce; there are none here.
    env = {
        **os.environ,
        "RAY_TMPDIR": str(base),
        "RAY_AUTH_MODE": "token",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    env.pop("RAY_ADDRESS", None)
    # Token auth is explicit here, so the test does not depend on whether this machine
    # already has ~/.ray/auth_token; --generate only writes one if there is none.
    try:
        subprocess.run(  # prints the token: keep it out of test output
            [RAY, "get-auth-token", "--generate"],
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    log = base / "ray-start.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--disable-usage-stats",
             "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
             "--object-store-memory", str(256 * 1024 * 1024), "--temp-dir", str(base / "ray"),
             "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
             "--dashboard-agent-listen-port", str(agent)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        dashboard = f"http://127.0.0.1:{dash}"
        _wait_ready(proc, base, dashboard, log)
        yield Cluster(base, port, f"127.0.0.1:{port}", dashboard, f"ray://127.0.0.1:{client}")
    finally:
        _stop(proc, base, tmp_path_factory.mktemp("ray-cluster-logs"))


@pytest.fixture
def token_auth(monkeypatch):
    """This process speaks token auth, as a user of an authenticated cluster must."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _run_py(code: str, env: dict[str, str], timeout: int = 90) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line last."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_data_stage_runs_on_the_cluster_at_the_address(cluster, state_dir, token_auth, tmp_path):
    import ray
    from ray.util.state import list_tasks

    from flywheel.data import prepare
    from flywheel.progress import DataStepDone

    assert not ray.is_initialized()
    profile = load_profile(None, [*TINY_DATA, "ray.mode=address", f"ray.address={cluster.gcs}"])
    seen: dict = {}

    def progress(event) -> None:
        if isinstance(event, DataStepDone):
            ctx = ray.get_runtime_context()
            seen.setdefault(event.step, (ctx.gcs_address, ctx.get_job_id()))

    try:
        stats = prepare(profile, tmp_path / "dataset", progress)
    finally:
        ray.shutdown()

    assert stats.docs_kept > 0 and stats.sequences["train"] > 0
    # Every step ran as a driver of that cluster (Ray reports 127.0.0.1 as the node IP).
    assert {gcs.rsplit(":", 1)[1] for gcs, _ in seen.values()} == {str(cluster.port)}
    job_id = seen["write"][1]
    # ...and its tasks ran there: the cluster's own state API lists them under our job.
    tasks = list_tasks(
        address=cluster.dashboard, filters=[("job_id", "=", job_id)], limit=10_000,
        raise_on_missing_output=False,
    )  # fmt: skip
    assert len(tasks) >= 10, [t.name for t in tasks]
    # None failed. The state API lags: a finished task may still read RUNNING or
    # SUBMITTED_TO_WORKER when it answers, so only a failure is asserted absent.
    states = {t.state for t in tasks}
    assert "FINISHED" in states and "FAILED" not in states, states


def test_local_mode_starts_its_own_instance_beside_a_running_cluster(cluster):
    # The trap: in a shell that ran `ray start`, RAY_ADDRESS and the discovery file
    # (<RAY_TMPDIR>/ray/ray_current_cluster) both name the cluster.
    env = {**os.environ, "RAY_TMPDIR": str(cluster.base), "RAY_ADDRESS": cluster.gcs}
    out = _run_py(
        """
        import json, os, ray
        from flywheel.config import RayConfig
        from flywheel.runtime import ensure_ray
        started = ensure_ray(RayConfig(mode="local", num_cpus=1))
        own = (ray.get_runtime_context().gcs_address, ray.cluster_resources()["CPU"])
        ray.shutdown()
        # Control: a bare ray.init() here joins the cluster, so the above was a real test.
        os.environ["RAY_ADDRESS"] = "auto"
        ray.init(log_to_driver=False)
        bare = ray.get_runtime_context().gcs_address
        ray.shutdown()
        print(json.dumps({"started": started, "own": own, "bare": bare}))
        """,
        env,
    )
    port = f":{cluster.port}"
    assert out["bare"].endswith(port)
    assert out["started"] is True
    assert not out["own"][0].endswith(port)
    assert out["own"][1] == 1.0  # its own num_cpus, not the cluster's 2


def test_a_stage_submitted_as_a_ray_job(cluster, token_auth):
    cfg = RayConfig(mode="address", address=cluster.dashboard)
    # Inside the job the stage reaches Ray with address=auto (the job's own cluster).
    code = textwrap.dedent(
        """
        import os, ray
        from flywheel.config import RayConfig
        from flywheel.runtime import ensure_ray
        ensure_ray(RayConfig(mode="address", address="auto"))
        print("GCS", ray.get_runtime_context().gcs_address, os.environ["FLYWHEEL_MARK"])
        """
    )
    job_id = submit_job(
        cfg,
        f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}",
        runtime_env={"env_vars": {"FLYWHEEL_MARK": "from-runtime-env"}},
    )
    result = wait_job(cfg, job_id, timeout_s=60)
    assert result.status == "SUCCEEDED"
    assert f":{cluster.port} from-runtime-env" in result.logs

    failing = submit_job(cfg, f"{shlex.quote(sys.executable)} -c 'raise SystemExit(\"boom\")'")
    with pytest.raises(FlywheelError, match=rf"Ray job {failing} at .* FAILED: boom"):
        wait_job(cfg, failing, timeout_s=60)


def test_a_client_without_the_token_is_told_what_to_set(cluster):
    # Ray sends a token to an explicitly named address only under RAY_AUTH_MODE=token;
    # without it the cluster refuses us. RAY_gcs_server_port_wait_time_s only shortens
    # Ray's connect retries (20 x 1 s by default) for the test.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_gcs_server_port_wait_time_s": "2"}
    env.pop("RAY_ADDRESS", None)
    out = _run_py(
        f"""
        import json
        from flywheel.config import RayConfig
        from flywheel.errors import FlywheelError
        from flywheel.runtime import ensure_ray
        try:
            ensure_ray(RayConfig(mode="address", address="{cluster.gcs}"))
            print(json.dumps({{"error": None}}))
        except FlywheelError as exc:
            print(json.dumps({{"error": str(exc)}}))
        """,
        env,
    )
    assert out["error"] is not None, "joined a token-auth cluster without a token"
    assert out["error"].startswith(f"cannot connect to Ray at {cluster.gcs}: ")
    assert "set RAY_AUTH_MODE=token" in out["error"]
    assert "\n" not in out["error"]


def test_unreachable_address_fails_fast_in_one_line(state_dir):
    import ray

    (port,) = _free_ports(1)  # nothing listens there
    address = f"127.0.0.1:{port}"
    t0 = time.monotonic()
    with pytest.raises(FlywheelError) as err:
        ensure_ray(RayConfig(mode="address", address=address))
    assert time.monotonic() - t0 < 5
    assert f"cannot reach Ray at {address}" in str(err.value)
    assert "\n" not in str(err.value)
    assert not ray.is_initialized()
