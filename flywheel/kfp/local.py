"""Run a compiled pipeline on this machine with KFP's local runner.

`run_local` compiles the pipeline for the profile, loads the YAML back and executes
*that* with `kfp.local` and the SubprocessRunner: the file that would be uploaded to
Kubeflow is the file that runs here. kfp.local prints every task's full log to
stdout; we send it to a log file under the state directory and turn its task events
into a progress callback, so the terminal shows one line per task. A failed task's own
error (the last line of its traceback) is kept, so the caller can say why in one line
instead of pointing into a log where the reason sits hundreds of lines down.
"""

from __future__ import annotations

import io
import re
import time
import warnings
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel import ledger
from flywheel.config import Profile
from flywheel.kfp.compile import compile_pipeline

ANSI = re.compile(r"\x1b\[[0-9;]*m")
START = re.compile(r"Executing task '([^']+)'")
END = re.compile(r"Task '([^']+)' finished with status (\w+)")
PIPELINE_END = re.compile(
    r"Pipeline '([^']+)' finished with status (\w+)(?:\. Inner task failed: (.*)\.)?"
)

EXIT_HANDLER = re.compile(r" inside 'exit-handler-\d+'")
# kfp.local prints a task's own output indented by this much (logging_utils.indented_print).
TASK_INDENT = "    "
TRACEBACK = "Traceback (most recent call last):"
FRAME = re.compile(r'^  File "')
# A failing task's message in one line stays readable; longer ones are cut (the log has all).
MAX_ERROR_CHARS = 600

Event = Callable[[str, str, float], None]  # (task, "start" | SUCCESS | FAILURE, seconds)

# The run id the tasks resolved dsl.PIPELINE_JOB_ID_PLACEHOLDER to (kfp.local draws a random
# one per run), read from the executor input the first task logs: the run ledger is keyed
# by it, and kfp.local does not return it.
RUN_ID = re.compile(r'"run_id": "([^"]+)"')


def exception_line(traceback_lines: list[str]) -> str | None:
    """`SomeError: message` from a Python traceback's lines, in one line (pure).

    The exception is what follows the last frame; its class loses its module path
    (`flywheel.errors.DataError` -> `DataError`). An exception whose message carries a
    traceback of its own (Ray's RayTaskError quotes the remote one) gives that one's last line.
    """
    lines = [ln.rstrip() for ln in traceback_lines]
    frames = [i for i, ln in enumerate(lines) if FRAME.match(ln)]
    start = frames[-1] + 1 if frames else 0
    while start < len(lines) and lines[start].startswith("    "):  # the frame's source, carets
        start += 1
    body = [ln for ln in lines[start:] if ln.strip()]
    if not body:
        return None
    if any(ln.lstrip().startswith('File "') for ln in body[1:]):
        return exception_line([ln.removeprefix("  ") for ln in body[1:]])
    text = " ".join(" ".join(ln.split()) for ln in body)
    head, _, rest = text.partition(":")
    if re.fullmatch(r"[\w.]+(\([\w.]+\))?", head):
        text = re.sub(r"^(?:\w+\.)+", "", head) + (f":{rest}" if rest else "")
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 3] + "..."
    return text


def task_chain(failed: str | None) -> str | None:
    """kfp.local's failed-task chain without dsl.ExitHandler's group, which kfp.local counts
    as a task ("'train' inside 'exit-handler-1'") and a reader knows nothing of."""
    return EXIT_HANDLER.sub("", failed) if failed else failed


def task_name(failed: str | None) -> str | None:
    """The failing task itself from kfp.local's chain "'train' inside 'retrain'"."""
    if not failed:
        return None
    m = re.match(r"'([^']+)'", failed)
    return m.group(1) if m else failed


@dataclass
class LocalRun:
    pipeline: str
    run_id: str
    run_dir: Path
    succeeded: bool
    failed_task: str | None
    wall_s: float
    task_seconds: dict[str, float] = field(default_factory=dict)
    log_file: Path | None = None
    yaml: Path | None = None
    error: str | None = None
    """The failed task's own error, `SomeError: message` in one line (None if it left none)."""

    def artifact(self, task: str, name: str) -> Path | None:
        """The local path of one task's output artifact, if it exists."""
        path = self.run_dir / task / name
        return path if path.exists() else None


class _TaskStream(io.TextIOBase):
    """A stdout stand-in: everything to the log file, task events to a callback."""

    def __init__(self, log, on_event: Event | None):
        self.log, self.on_event = log, on_event
        self.buffer_ = ""
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.pipeline_status: tuple[str, str | None] | None = None
        self.traceback: list[str] | None = None  # the running task's last traceback so far
        self.task_errors: dict[str, str] = {}  # failed task -> its exception line
        self.run_id: str | None = None

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.log.write(s)
        self.buffer_ += s
        while "\n" in self.buffer_:
            line, self.buffer_ = self.buffer_.split("\n", 1)
            self._line(ANSI.sub("", line))
        return len(s)

    def flush(self) -> None:
        self.log.flush()

    def _line(self, line: str) -> None:
        if line.startswith(" "):  # a task's own (indented) output
            body = line.removeprefix(TASK_INDENT)
            if self.run_id is None and (m := RUN_ID.search(body)):
                self.run_id = m.group(1)
            if body.startswith(TRACEBACK):  # a chained exception starts over: the last counts
                self.traceback = []
            elif self.traceback is not None:
                self.traceback.append(body)
            return
        if m := START.search(line):
            self.traceback = None
            self.started[m.group(1)] = time.monotonic()
            if self.on_event:
                self.on_event(m.group(1), "start", 0.0)
        elif m := END.search(line):
            task, status = m.groups()
            if status != "SUCCESS" and self.traceback:
                error = exception_line(self.traceback)
                if error:
                    self.task_errors[task] = error
            self.traceback = None
            secs = time.monotonic() - self.started.get(task, time.monotonic())
            self.seconds[task] = self.seconds.get(task, 0.0) + secs
            if self.on_event:
                self.on_event(task, status, secs)
        elif m := PIPELINE_END.search(line):
            self.pipeline_status = (m.group(2), m.group(3))


def run_local(
    name: str,
    profile: Profile,
    *,
    arguments: dict[str, Any] | None = None,
    on_event: Event | None = None,
) -> LocalRun:
    """Compile `name` for `profile`, then run the compiled YAML with kfp.local."""
    from kfp import local
    from kfp.components import load_component_from_file

    root = profile.state_path("pipelines")
    yaml_path = compile_pipeline(name, profile, profile.state_path("build"))
    pipeline = load_component_from_file(str(yaml_path))
    # use_venv=False: tasks run in this interpreter's environment, where flywheel is
    # installed, exactly as they run in the project image on a cluster.
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        raise_on_error=False,
    )
    before = {p.name for p in root.iterdir()}
    logs = profile.state_path("logs")
    log_file = logs / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    args = {"profile": profile.to_param(), **(arguments or {})}
    t0 = time.monotonic()
    with open(log_file, "w") as log:
        stream = _TaskStream(log, on_event)
        # ledger.driving: the run's plan entry names this process, so a monitor can tell
        # this run from one whose driver was interrupted.
        with redirect_stdout(stream), warnings.catch_warnings(), ledger.driving():
            # kfp.local warns, per task, that resources and display names are cluster-only
            # and that the project image is not used locally: both by design here.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            # kfp.local binds its log handler to sys.stdout when it starts, so the
            # redirect must be in place before the call.
            pipeline(**args)
        stream.flush()
    wall = time.monotonic() - t0
    new = sorted(
        (p for p in root.iterdir() if p.name not in before), key=lambda p: p.stat().st_mtime
    )
    run_dir = new[-1] if new else root
    status, failed = stream.pipeline_status or ("FAILURE", None)
    failed = task_chain(failed)
    error = stream.task_errors.get(task_name(failed) or "") if status != "SUCCESS" else None
    if status != "SUCCESS" and error is None and stream.task_errors:
        error = list(stream.task_errors.values())[-1]
    return LocalRun(
        pipeline=name,
        run_id=stream.run_id or run_dir.name,
        run_dir=run_dir,
        succeeded=status == "SUCCESS",
        failed_task=failed,
        wall_s=wall,
        task_seconds=stream.seconds,
        log_file=log_file,
        yaml=yaml_path,
        error=error,
    )
