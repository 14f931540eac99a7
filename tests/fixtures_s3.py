"""An S3-compatible server on loopback (moto in server mode) for tests that need object storage.

A real HTTP server in its own process, so everything that talks to it (pyarrow in the test,
Ray workers, kfp.local task subprocesses) goes through the network stack exactly as a pod
talks to S3 or MinIO. moto keeps objects in memory: nothing outlives the server.

    from fixtures_s3 import s3_server, make_bucket, upload_dir, S3_CREDENTIALS

    with s3_server() as endpoint:                  # "http://127.0.0.1:<free port>"
        make_bucket(endpoint, "corpus")
        upload_dir(endpoint, local_dir, "s3://corpus/docs")

`s3_endpoint` is a session fixture over the same: it also puts the credentials and
AWS_ENDPOINT_URL into os.environ for the session (before any Ray starts, so its workers
inherit them). A test module imports it (`from fixtures_s3 import s3_endpoint`); to share
one server across modules, import it in a conftest instead.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_services import free_port, stop

# moto accepts any credentials unless told otherwise; these are the AWS SDKs' test values.
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
START_TIMEOUT_S = 60.0


def _answering(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def s3_server(*, require_auth: bool = False) -> Iterator[str]:
    """Start `python -m moto.server` on 127.0.0.1 and a free port; yield its endpoint URL.

    require_auth=True makes moto check credentials (INITIAL_NO_AUTH_ACTION_COUNT=0): every
    request with keys it never issued is refused, which is how a test sees bad credentials.
    """
    port = free_port()
    env = {**os.environ, **S3_CREDENTIALS}
    if require_auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answering(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"moto server did not start on 127.0.0.1:{port}: "
                    + Path(log.name).read_text()[-2000:]
                )
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
        log.close()
        Path(log.name).unlink(missing_ok=True)


def s3_filesystem(endpoint: str):
    """A pyarrow S3FileSystem on the test server that may create buckets (the code under
    test gets its own, which may not)."""
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(
        endpoint_override=endpoint,
        access_key=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        secret_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
        allow_bucket_creation=True,
        allow_bucket_deletion=True,
    )


def make_bucket(endpoint: str, bucket: str) -> str:
    s3_filesystem(endpoint).create_dir(bucket)
    return f"s3://{bucket}"


def upload_dir(endpoint: str, local: Path, uri: str) -> str:
    """Copy a local directory (or one file) to s3://bucket/prefix, creating the bucket."""
    import pyarrow.fs as pafs

    assert uri.startswith("s3://"), uri
    path = uri.removeprefix("s3://").rstrip("/")
    fs = s3_filesystem(endpoint)
    fs.create_dir(path.split("/", 1)[0])
    pafs.copy_files(
        str(Path(local).absolute()),
        path,
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=fs,
    )
    return uri


def list_keys(endpoint: str, uri: str) -> list[str]:
    """Every object under s3://bucket/prefix, as bucket/key paths."""
    import pyarrow.fs as pafs

    fs = s3_filesystem(endpoint)
    path = uri.removeprefix("s3://").rstrip("/")
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    return sorted(i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """One moto server for the session; credentials and endpoint in the environment."""
    with s3_server() as endpoint:
        mp = pytest.MonkeyPatch()
        for key, value in S3_CREDENTIALS.items():
            mp.setenv(key, value)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        try:
            yield endpoint
        finally:
            mp.undo()
