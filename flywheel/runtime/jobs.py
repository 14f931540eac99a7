"""A whole stage as a Ray Job: `ray.mode: address` with an http(s) dashboard URL.

The driver then runs on the cluster (its head node), so nothing but an HTTP client is
needed here; that is what a Kubeflow step uses when the Ray cluster is long-lived.
Ray's own `JobSubmissionClient` does the work (submission, status, logs, token header);
this module adds the address checks, a bounded wait and errors a user can act on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from flywheel.config import RayConfig
from flywheel.errors import ConfigError, FlywheelError
from flywheel.ray_address import auth_hint, one_line, parse_address, probe


@dataclass(frozen=True)
class JobResult:
    job_id: str
    status: str  # a ray.job_submission.JobStatus value: SUCCEEDED, FAILED, STOPPED
    logs: str


def _client(cfg: RayConfig) -> Any:
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    addr = parse_address(cfg.address or "") if cfg.mode == "address" else None
    if addr is None or addr.kind != "jobs":
        raise ConfigError(
            "submitting a Ray Job needs ray.mode=address and ray.address set to the "
            f"dashboard URL http(s)://host:8265 (got mode={cfg.mode!r}, address={cfg.address!r})"
        )
    # JobSubmissionClient's requests carry no timeout; a silent host would hang the step.
    probe(addr)
    try:
        return JobSubmissionClient(addr.raw)
    except AuthenticationError as exc:
        raise FlywheelError(
            f"Ray Jobs API at {addr.raw} refused us: {one_line(exc)}{auth_hint()}"
        ) from None
    except (ConnectionError, RuntimeError) as exc:
        raise FlywheelError(f"cannot use the Ray Jobs API at {addr.raw}: {one_line(exc)}") from None


def submit_job(
    cfg: RayConfig,
    entrypoint: str,
    runtime_env: dict[str, Any] | None = None,
    *,
    submission_id: str | None = None,
    metadata: dict[str, str] | None = None,
) -> str:
    """Submit `entrypoint` (a shell command run on the head node) and return the job id.

    Inside the job, Ray is reached with `ray.mode=address ray.address=auto`.
    """
    client = _client(cfg)
    return client.submit_job(
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        submission_id=submission_id,
        metadata=metadata,
    )


def wait_job(
    cfg: RayConfig, job_id: str, timeout_s: float = 3600.0, poll_s: float = 1.0
) -> JobResult:
    """Wait for a job to finish. Raises FlywheelError if it fails, stops or outlives `timeout_s`.

    A timed-out job is left running (the message names it): stopping someone's job is a
    decision for the caller, e.g. `ray job stop <id>`.
    """
    from ray.job_submission import JobStatus

    client = _client(cfg)
    deadline = time.monotonic() + timeout_s
    while not (status := client.get_job_status(job_id)).is_terminal():
        if time.monotonic() > deadline:
            raise FlywheelError(
                f"Ray job {job_id} at {cfg.address} still {status.value} after {timeout_s:g}s"
            )
        time.sleep(poll_s)
    logs = client.get_job_logs(job_id)
    if status != JobStatus.SUCCEEDED:
        last = next((ln for ln in reversed(logs.splitlines()) if ln.strip()), "no output")
        raise FlywheelError(f"Ray job {job_id} at {cfg.address} {status.value}: {last.strip()}")
    return JobResult(job_id, status.value, logs)
