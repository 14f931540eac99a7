"""Storage URIs: the one place that turns ``s3://``, ``gs://`` or ``file://`` into a filesystem.

On Kubeflow each step is a fresh pod: the corpus, the monitor's window and Ray's checkpoints
must live in object storage, not on a neighbour's disk. Everything here goes through
``pyarrow.fs`` (the filesystem layer Ray Train and Ray Data use themselves), so one
`filesystem` call serves the checkpoint store and the readers alike. Credentials come from
the environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, Google's application
default credentials), which a cluster fills from Kubernetes Secrets; the profile holds only
where the data is (``storage.root``, ``storage.endpoint_url``).

The readers of the data and drift stages read local files. Rather than teach each of them a
second I/O path, a URI is *staged*: copied into a temporary directory at the step's start,
read there unchanged, and removed afterwards (`staged`). Error messages that name the
temporary copy are rewritten to name the URI a person would open.

    with staged("s3://corpus/2026-11/", field="data.source.path", endpoint_url=None) as local:
        read(local)

Failures of the store (no bucket, bad credentials, endpoint down) raise `StorageError`: one
line naming the profile field and the service, after pyarrow's bounded retries (a few
seconds), never a page of SDK traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from flywheel.errors import ConfigError, FlywheelError, StorageError

if TYPE_CHECKING:
    import pyarrow.fs

    from flywheel.config import Profile

# Scheme -> the service named in messages.
SERVICES = {"s3": "S3", "gs": "Google Cloud Storage", "file": "the local filesystem"}
REMOTE = ("s3", "gs")

# Bounded, so an endpoint that is down fails a step in seconds rather than minutes: a
# refused connection fails at once, a black-holed one after 3 x CONNECT_TIMEOUT_S.
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 3
GCS_RETRY_LIMIT_S = 15

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Bucket names of S3 and GCS: lower-case letters, digits, dots, dashes (and _ for GCS).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def is_uri(value: str | None) -> bool:
    """True for anything of the form scheme://..., known scheme or not."""
    return bool(value) and bool(_SCHEME.match(str(value)))


def is_remote(value: str | None) -> bool:
    m = _SCHEME.match(str(value or ""))
    return m is not None and m.group(1).lower() in REMOTE


@dataclass(frozen=True)
class Location:
    """A parsed URI or path. `path` is what a pyarrow filesystem takes: bucket/key for object
    stores (no scheme), an absolute path for local files."""

    uri: str
    scheme: str  # s3 | gs | file ("file" also for a plain path)
    path: str

    @property
    def remote(self) -> bool:
        return self.scheme in REMOTE

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0] if self.remote else ""

    @property
    def service(self) -> str:
        return SERVICES[self.scheme]

    def child(self, *parts: str) -> Location:
        path = "/".join([self.path.rstrip("/"), *(p.strip("/") for p in parts)])
        uri = f"{self.scheme}://{path}" if self.remote else path
        return Location(uri, self.scheme, path)

    def display(self) -> str:
        return f"{self.scheme}://{self.path}" if self.remote else self.path

    def as_uri(self) -> str:
        """The location as a URI: file:///abs/path for local files (so a Ray worker tells it
        from a path of its own)."""
        return self.display() if self.remote else f"file://{self.path}"


def parse(value: str, field: str) -> Location:
    """A URI or a path -> Location. A malformed URI is a ConfigError naming `field`."""
    value = str(value).strip()
    if not value:
        raise ConfigError(f"{field}: empty")
    m = _SCHEME.match(value)
    if not m:  # a plain path: local, relative to the working directory
        return Location(value, "file", str(Path(value).expanduser().absolute()))
    scheme = m.group(1).lower()
    if scheme == "gcs":  # a common spelling; pyarrow and gsutil say gs://
        scheme = "gs"
    if scheme not in SERVICES:
        raise ConfigError(
            f"{field}: unknown scheme '{m.group(1)}://' in {value!r}; use s3://, gs:// or file://"
        )
    if any(c.isspace() for c in value):
        raise ConfigError(f"{field}: {value!r} contains whitespace")
    parts = urlsplit(value)
    if parts.query or parts.fragment:
        raise ConfigError(f"{field}: {value!r} has a query or fragment; give bucket and path only")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(
                f"{field}: {value!r} is not an absolute file URI; write file:///absolute/path"
            )
        return Location(value, "file", parts.path or "/")
    bucket = parts.netloc
    if not bucket:
        raise ConfigError(f"{field}: {value!r} names no bucket; write {scheme}://bucket/prefix")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ConfigError(f"{field}: {bucket!r} in {value!r} is not a valid bucket name")
    key = re.sub("/+", "/", parts.path).strip("/")
    return Location(value, scheme, f"{bucket}/{key}" if key else bucket)


def check_uri(value: str | None, field: str) -> None:
    """Profile-load check (no network): only URIs are checked; a plain path passes."""
    if value and is_uri(value):
        parse(value, field)


def check_endpoint(url: str | None, field: str = "storage.endpoint_url") -> None:
    if url is None:
        return
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{field}: {url!r} is not an http(s):// address (e.g. http://minio.storage:9000)"
        )
    try:
        parts.port  # noqa: B018 (raises on a non-numeric port)
    except ValueError:
        raise ConfigError(f"{field}: {url!r} has an invalid port") from None


def endpoint(endpoint_url: str | None) -> str | None:
    """The S3 endpoint: the profile's, else the AWS SDKs' environment variables (read when a
    step runs, in the pod, never at compile time). pyarrow's S3FileSystem constructor does
    not read them itself."""
    return (
        endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )


# ------------------------------------------------------------------------- filesystems


def filesystem(loc: Location, endpoint_url: str | None = None) -> pyarrow.fs.FileSystem:
    """The pyarrow filesystem for a location; `loc.path` is the path to use on it."""
    import pyarrow.fs as pafs

    if loc.scheme == "s3":
        url = endpoint(endpoint_url)
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not region and not url:
            # Real AWS: a bucket answers only in its own region. One bounded lookup; a
            # failure here resurfaces, explained, at the first real request.
            with contextlib.suppress(Exception):
                region = pafs.resolve_s3_region(loc.bucket)
        return pafs.S3FileSystem(
            endpoint_override=url,
            region=region or "us-east-1",
            connect_timeout=CONNECT_TIMEOUT_S,
            request_timeout=REQUEST_TIMEOUT_S,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
        )
    if loc.scheme == "gs":
        from datetime import timedelta

        return pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=GCS_RETRY_LIMIT_S))
    return pafs.LocalFileSystem()


def explain(exc: BaseException, loc: Location, field: str, endpoint_url: str | None) -> str:
    """One line for a failed storage call: the field, the service, what to check."""
    text = str(exc)
    where = loc.service
    if loc.scheme == "s3":
        where += f" at {endpoint(endpoint_url) or 'AWS'}"
    upper = text.upper()
    if "NETWORK_CONNECTION" in upper or "COULD NOT CONNECT" in upper or "RESOLVE" in upper:
        why = "cannot connect (endpoint down or unreachable; check storage.endpoint_url)"
    elif "NO_SUCH_BUCKET" in upper or ("BUCKET" in upper and "NOT FOUND" in upper):
        why = f"bucket '{loc.bucket}' does not exist"
    elif any(
        k in upper
        for k in (
            "ACCESS_DENIED",
            "ACCESSDENIED",
            "INVALID_ACCESS_KEY",
            "INVALIDACCESSKEY",
            "SIGNATURE_DOES_NOT_MATCH",
            "SIGNATUREDOESNOTMATCH",
            "UNRECOGNIZED_CLIENT",
            "FORBIDDEN",
            "HTTP STATUS 403",
            "PERMISSION",
            "UNAUTHENTICATED",
        )
    ):
        why = "access denied (check the credentials in the environment: " + (
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
            if loc.scheme == "s3"
            else "GOOGLE_APPLICATION_CREDENTIALS)"
        )
    else:
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        why = first[:300]
    return f"{field}: cannot access {loc.display()} on {where}: {why}"


def _fail(exc: BaseException, loc: Location, field: str, endpoint_url: str | None) -> StorageError:
    return StorageError(explain(exc, loc, field, endpoint_url))


def _info(fs: pyarrow.fs.FileSystem, loc: Location, field: str, endpoint_url: str | None):
    """FileInfo of the location, and of its bucket first (a missing bucket is its own error,
    where pyarrow would report only 'not found')."""
    import pyarrow.fs as pafs

    try:
        if loc.remote:
            bucket = fs.get_file_info(loc.bucket)
            if bucket.type == pafs.FileType.NotFound:
                raise StorageError(
                    f"{field}: cannot access {loc.display()} on {loc.service}"
                    + (f" at {endpoint(endpoint_url) or 'AWS'}" if loc.scheme == "s3" else "")
                    + f": bucket '{loc.bucket}' does not exist"
                )
        return fs.get_file_info(loc.path)
    except StorageError:
        raise
    except Exception as exc:
        raise _fail(exc, loc, field, endpoint_url) from None


def check_readable(
    value: str, field: str, endpoint_url: str | None = None, *, must_exist: bool = True
) -> Location:
    """Reach the store once, at a step's start: a missing bucket, bad credentials or an
    endpoint that is down fail here in seconds. must_exist=False for a place a step will
    write to (a checkpoint root): its bucket must exist, the prefix may not yet."""
    import pyarrow.fs as pafs

    loc = parse(value, field)
    fs = filesystem(loc, endpoint_url)
    info = _info(fs, loc, field, endpoint_url)
    if must_exist and info.type == pafs.FileType.NotFound:
        raise StorageError(f"{field}: {loc.display()}: no such object or prefix on {loc.service}")
    if loc.remote and not must_exist:
        # Listing proves the credentials, which a HEAD on a public bucket would not.
        try:
            fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
        except Exception as exc:
            raise _fail(exc, loc, field, endpoint_url) from None
    return loc


# ------------------------------------------------------------------------ copy in/out


def stage_in(value: str, dest: Path, field: str, endpoint_url: str | None = None) -> Path:
    """Copy a remote file or prefix into `dest` (a directory); return the local path that
    stands for it: dest/<file name> for an object, dest itself for a prefix."""
    import pyarrow.fs as pafs

    loc = parse(value, field)
    if not loc.remote:
        return Path(loc.path)
    fs = filesystem(loc, endpoint_url)
    info = _info(fs, loc, field, endpoint_url)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if info.type == pafs.FileType.File:
            target = dest / Path(loc.path).name
            _copy_tree(fs, loc.path, target)
            return target
        if info.type == pafs.FileType.Directory:
            _copy_tree(fs, loc.path, dest)
            return dest
    except Exception as exc:
        raise _fail(exc, loc, field, endpoint_url) from None
    raise StorageError(f"{field}: {loc.display()}: no such object or prefix on {loc.service}")


def has_entry(value: str, name: str, field: str, endpoint_url: str | None = None) -> bool:
    """Whether `name` exists directly under the directory or prefix `value`."""
    import pyarrow.fs as pafs

    loc = parse(value, field)
    if not loc.remote:
        return (Path(loc.path) / name).exists()
    fs = filesystem(loc, endpoint_url)
    try:
        return fs.get_file_info(loc.child(name).path).type != pafs.FileType.NotFound
    except Exception as exc:
        raise _fail(exc, loc, field, endpoint_url) from None


def list_files(
    loc: Location, field: str, endpoint_url: str | None = None, *, recursive: bool = False
) -> list[pyarrow.fs.FileInfo]:
    """What is under a directory or prefix (nothing when it does not exist); errors name
    `field`."""
    import pyarrow.fs as pafs

    fs = filesystem(loc, endpoint_url)
    try:
        return fs.get_file_info(
            pafs.FileSelector(loc.path, recursive=recursive, allow_not_found=True)
        )
    except Exception as exc:
        raise _fail(exc, loc, field, endpoint_url) from None


def upload_dir(
    local: Path, value: str, field: str = "storage.root", endpoint_url: str | None = None
) -> Location:
    """Copy a local directory's files to a URI prefix (or a local path)."""
    import pyarrow.fs as pafs

    loc = parse(value, field)
    fs = filesystem(loc, endpoint_url)
    try:
        if not loc.remote:
            Path(loc.path).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            str(Path(local).absolute()),
            loc.path,
            source_filesystem=_local(),
            destination_filesystem=fs,
        )
    except Exception as exc:
        raise _fail(exc, loc, field, endpoint_url) from None
    return loc


def remove_tree(value: str, field: str = "storage.root", endpoint_url: str | None = None) -> bool:
    """Delete a directory or prefix and everything under it; False when nothing was there.
    Only for what the caller itself wrote (hand-off copies): never a user's data."""
    import pyarrow.fs as pafs

    loc = parse(value, field)
    fs = filesystem(loc, endpoint_url)
    try:
        if fs.get_file_info(loc.path).type == pafs.FileType.NotFound:
            return False
        fs.delete_dir(loc.path)
    except Exception as exc:
        raise _fail(exc, loc, field, endpoint_url) from None
    return True


def download(fs: pyarrow.fs.FileSystem, path: str, dest: Path, names: tuple[str, ...] = ()) -> Path:
    """Copy `path` (a directory on `fs`), or only its entries `names`, into `dest`."""
    import pyarrow.fs as pafs

    dest.mkdir(parents=True, exist_ok=True)
    for name in names or ("",):
        src = f"{path.rstrip('/')}/{name}" if name else path
        if fs.get_file_info(src).type != pafs.FileType.NotFound:
            _copy_tree(fs, src, dest / name if name else dest)
    return dest


COPY_CHUNK = 8 * 1024**2


def _copy_tree(fs: pyarrow.fs.FileSystem, src: str, dest: Path) -> None:
    """Copy one object, or every object under a prefix, to local disk. By hand rather than
    pyarrow.fs.copy_files, which expects the local directories of a prefix to exist (an
    object store has no directories to list)."""
    import pyarrow.fs as pafs

    if fs.get_file_info(src).type == pafs.FileType.File:
        files = [(src, dest)]
    else:
        selector = pafs.FileSelector(src, recursive=True)
        root = src.rstrip("/") + "/"
        files = [
            (i.path, dest / i.path.removeprefix(root))
            for i in fs.get_file_info(selector)
            if i.type == pafs.FileType.File
        ]
        dest.mkdir(parents=True, exist_ok=True)
    for source, target in files:
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(source) as fin, open(target, "wb") as fout:
            while chunk := fin.read(COPY_CHUNK):
                fout.write(chunk)


def _local() -> pyarrow.fs.FileSystem:
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem()


@contextlib.contextmanager
def staged(value: str, field: str, endpoint_url: str | None = None) -> Iterator[str]:
    """Yield a local path for `value`: itself for a path or file:// URI, else a temporary
    copy that is removed afterwards. A FlywheelError raised inside the block that names the
    temporary copy is re-raised naming the URI instead."""
    loc = parse(value, field)
    if not loc.remote:  # a plain path as given (messages keep naming it), file:// as its path
        yield loc.path if is_uri(value) else value
        return
    tmp = Path(tempfile.mkdtemp(prefix="flywheel-stage-"))
    try:
        local = stage_in(value, tmp / "in", field, endpoint_url)
        try:
            yield str(local)
        except FlywheelError as exc:
            text = str(exc)
            shown = loc.display().rstrip("/")
            for prefix in (str(local), str(tmp / "in")):
                text = text.replace(prefix, shown)
            if text == str(exc):
                raise
            raise type(exc)(text) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------- Ray run storage


@dataclass(frozen=True)
class RayStorage:
    """Where Ray Train/Tune keep a run: RunConfig(storage_path=path, storage_filesystem=fs)."""

    path: str
    filesystem: pyarrow.fs.FileSystem | None
    location: Location
    endpoint_url: str | None = None

    def run_uri(self, name: str) -> str:
        return self.location.child(name).display()

    def remove_run(self, name: str) -> None:
        """Delete a run directory (trial checkpoints no longer needed); best effort."""
        loc = self.location.child(name)
        if self.filesystem is None:
            shutil.rmtree(loc.path, ignore_errors=True)
            return
        with contextlib.suppress(Exception):
            self.filesystem.delete_dir(loc.path)

    def remove_runs(self, prefix: str) -> None:
        """Delete every run directory whose name starts with `prefix`; best effort."""
        import pyarrow.fs as pafs

        fs = self.filesystem or _local()
        with contextlib.suppress(Exception):
            for info in fs.get_file_info(
                pafs.FileSelector(self.location.path, allow_not_found=True)
            ):
                if info.type == pafs.FileType.Directory and info.base_name.startswith(prefix):
                    self.remove_run(info.base_name)


RAY_SUBDIR = "ray"


def ray_storage(profile: Profile, *, check: bool = False) -> RayStorage:
    """`storage.root`/ray when set (object storage: survives the pod), else <state_dir>/ray.

    check=True reaches the store first, so a missing bucket or bad credentials fail before
    Ray starts, in one line naming storage.root.
    """
    root = profile.storage.root
    if not root:
        path = str(profile.state_path(RAY_SUBDIR))
        return RayStorage(path, None, Location(path, "file", path))
    if check:
        check_readable(root, "storage.root", profile.storage.endpoint_url, must_exist=False)
    loc = parse(root, "storage.root").child(RAY_SUBDIR)
    if not loc.remote:
        Path(loc.path).mkdir(parents=True, exist_ok=True)
        return RayStorage(loc.path, None, loc)
    url = profile.storage.endpoint_url
    return RayStorage(loc.path, filesystem(loc, url), loc, url)
