"""Real services on loopback for the integration tier: an `mlflow server` and PostgreSQL.

Each is a context manager that starts the service on 127.0.0.1 on a free port, waits until
it answers, yields where to reach it, and stops it. Modules wrap them in fixtures of the
scope they need. Nothing here is a stand-in: these are the servers a cluster profile names.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_until_up(
    proc: subprocess.Popen, url: str, log_path: Path, what: str, timeout_s: float
) -> None:
    """Poll `url` until it answers 200. If `proc` exits or `timeout_s` passes first, kill it
    and fail the test with the tail of its log."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what} did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.5)


@contextmanager
def mlflow_server(
    root: Path,
    artifacts_destination: str | None = None,
    *,
    default_artifact_root: str | None = None,
) -> Iterator[str]:
    """`mlflow server` with its own SQLite backend and proxied artifacts; yields its URL.

    The server's disk is the service's own (as a tracking server's volume is on a cluster):
    clients reach runs, models and artifacts only over HTTP.

    `default_artifact_root` (e.g. s3://bucket/mlflow) starts it the other way a cluster runs
    one: `--no-serve-artifacts`, so clients read and write artifacts there themselves (boto3
    for s3://, reading MLFLOW_S3_ENDPOINT_URL) and the server only records where they are.
    """
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    if default_artifact_root:
        artifacts = ["--no-serve-artifacts", "--default-artifact-root", default_artifact_root]
    else:
        artifacts = ["--artifacts-destination", artifacts_destination or str(root / "artifacts")]
    cmd = [
        str(mlflow_bin) if mlflow_bin.exists() else shutil.which("mlflow"),
        "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'backend.db'}",
        *artifacts,
    ]  # fmt: skip
    log_path = root / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        # Startup is slow on a busy 2-core box (imports, migrations): tens of seconds.
        wait_until_up(proc, f"{url}/health", log_path, "mlflow server", timeout_s=180)
        try:
            yield url
        finally:
            stop(proc)


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str
    database: str

    def url(self, with_password: bool = False) -> str:
        """A SQLAlchemy URL; without the password, libpq takes it from $PGPASSWORD."""
        auth = f"{self.user}:{self.password}" if with_password else self.user
        return f"postgresql+psycopg2://{auth}@{self.host}:{self.port}/{self.database}"


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@contextmanager
def postgres_server(database: str = "optuna", user: str = "flywheel") -> Iterator[Postgres]:
    """A PostgreSQL cluster from Debian's `postgresql` package (`.ci/run` installs it), with
    password (scram) authentication over TCP on 127.0.0.1, as a real database server has.

    PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres` user.
    """
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries not found (apt-get install postgresql; .ci/run does)"
        )
    as_root = os.geteuid() == 0
    owner = "postgres" if as_root else pwd.getpwuid(os.geteuid()).pw_name
    # Not under pytest's tmp (mode 0700 and owned by root): the server user must reach it.
    root = Path(tempfile.mkdtemp(prefix="fw-pg-"))
    root.chmod(0o755)
    data = root / "data"
    pwfile = root / "pw"
    password = "pg-" + os.urandom(6).hex()
    pwfile.write_text(password + "\n")
    if as_root:
        shutil.chown(root, owner)
        shutil.chown(pwfile, owner)

    def run(*args: str) -> subprocess.CompletedProcess:
        cmd = ["runuser", "-u", owner, "--", *args] if as_root else list(args)
        return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)

    port = free_port()
    steps = [
        [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}",
         "--auth-local=trust", "--auth-host=scram-sha-256"],
        [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
         "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"],
    ]  # fmt: skip
    for step in steps:
        out = run(*step)
        if out.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            pytest.fail(f"postgres: {' '.join(step[:1])} failed: {out.stderr[-1500:]}")
    psql = [str(bindir.parent / "bin" / "psql"), "-h", str(root), "-p", str(port), "-U", "postgres"]
    if not Path(psql[0]).exists():
        psql[0] = shutil.which("psql") or "psql"
    for sql in (
        f"CREATE USER {user} CREATEDB PASSWORD '{password}'",
        f"CREATE DATABASE {database} OWNER {user}",
    ):
        out = run(*psql, "-v", "ON_ERROR_STOP=1", "-c", sql)
        if out.returncode != 0:
            pytest.fail(f"postgres: {sql!r} failed: {out.stderr[-1000:]}")
    try:
        yield Postgres("127.0.0.1", port, user, password, database)
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def create_database(pg: Postgres, name: str) -> Postgres:
    """Another database owned by the same user (e.g. MLflow's backend beside Optuna's)."""
    import psycopg2

    conn = psycopg2.connect(
        host=pg.host, port=pg.port, user=pg.user, password=pg.password, dbname=pg.database
    )
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    conn.close()
    return Postgres(pg.host, pg.port, pg.user, pg.password, name)
