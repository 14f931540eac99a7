"""`flywheel submit` and `flywheel schedule ...`: runs and recurring runs on Kubeflow Pipelines."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from flywheel.cli.common import (
    OverridesArg,
    ProfileOpt,
    console,
    err_console,
    number_range,
    profile_from,
)

# Kubeflow's API accepts a recurring run's max_concurrency in this range.
MAX_CONCURRENCY = (1, 10)

HostOpt = Annotated[str | None, typer.Option("--host", help="KFP API URL (default: kfp.host)")]
NamespaceOpt = Annotated[
    str | None,
    typer.Option("--namespace", "-n", help="multi-user namespace (default: kfp.namespace)"),
]
ExperimentOpt = Annotated[
    str | None, typer.Option("--experiment", help="experiment name (default: kfp.experiment)")
]
PackageOpt = Annotated[
    Path | None,
    typer.Option(
        "--package", help="an already-compiled pipeline YAML instead of compiling PIPELINE"
    ),
]
DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run", help="print the HTTP requests it would send (JSON); connect to nothing"
    ),
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data-location",
        help="where the data is: the data_location (retrain) or window (monitor) parameter",
    ),
]


def _target(profile, host, namespace):
    from flywheel.kfp.client import resolve_target

    return resolve_target(profile.kfp, host=host, namespace=namespace)


def _warn(line: str) -> None:
    err_console.print(f"warning: {line}", highlight=False, markup=False, soft_wrap=True)


def _session(profile, host, namespace):
    from flywheel.kfp.client import KfpSession

    return KfpSession(_target(profile, host, namespace), warn=_warn)


def _print_json(doc: dict[str, Any]) -> None:
    # Plain stdout, not the rich console: no wrapping or markup inside the document.
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


def _print_plan(requests, target) -> None:
    from flywheel.kfp.plan import plan_document

    doc = plan_document(
        requests, host=target.host, namespace=target.namespace, authorized=bool(target.token)
    )
    _print_json(doc)


def refuse_pod_state(profile, source: Path | None, data_location: str | None) -> None:
    """Exit 2, before compiling or connecting, if the run's state would live inside a pod."""
    from flywheel.config import DEFAULT_PROFILE
    from flywheel.errors import ConfigError
    from flywheel.kfp.guard import pod_state_problems

    problems = pod_state_problems(profile, data_location)
    if problems:
        raise ConfigError(
            f"{source or DEFAULT_PROFILE}: not ready for Kubeflow (each task is its own pod): "
            + "; ".join(problems)
        )


def _package(pipeline: str, profile, package: Path | None) -> Path:
    from flywheel.kfp.client import compiled_package

    # The state directory only when compiling here: a given --package needs none.
    out_dir = profile.state_path("compiled") if package is None else Path()
    return compiled_package(pipeline, profile, package, out_dir)


def _kuberay_access(prof) -> None:
    """The RBAC the run's RayJobs need, asked of the Kubernetes API where it answers: a
    warning, not a refusal, because the identity asked is whoever runs submit (a laptop's
    kubeconfig, CI), not the run's service account, which alone the steps act as."""
    from flywheel.runtime.kuberay import submit_access_problem

    problem = submit_access_problem(prof)
    if problem:
        _warn(problem)


def _plan_or_session(prof, host, namespace, dry_run: bool, plan: Callable[[str], Any]):
    """With --dry-run, print the requests `plan(namespace)` would send and return None;
    else a session to the cluster, after the KubeRay access warning where it applies."""
    if dry_run:
        target = _target(prof, host, namespace)
        _print_plan(plan(target.namespace), target)
        return None
    if prof.ray.mode == "kuberay":
        _kuberay_access(prof)
    return _session(prof, host, namespace)


def submit_cmd(
    pipeline: Annotated[str, typer.Argument(help="pipeline name, e.g. retrain or monitor")],
    overrides: OverridesArg = None,
    profile: ProfileOpt = None,
    host: HostOpt = None,
    namespace: NamespaceOpt = None,
    experiment: ExperimentOpt = None,
    package: PackageOpt = None,
    trigger_reason: Annotated[str, typer.Option(help="recorded with the run")] = "manual",
    data_location: DataOpt = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="follow the run; exit 1 if it fails")
    ] = False,
    timeout: Annotated[
        float,
        typer.Option(
            help="--wait gives up after this many seconds", callback=number_range(0, above=True)
        ),
    ] = 6 * 3600,
    poll: Annotated[
        float,
        typer.Option(
            help="--wait polls every this many seconds", callback=number_range(0, above=True)
        ),
    ] = 10.0,
    dry_run: DryRunOpt = False,
) -> None:
    """Compile PIPELINE, upload it as a version (once per content) and start a run; print its URL."""
    from flywheel.kfp.client import start_run
    from flywheel.kfp.plan import plan_submit, submit_spec

    prof = profile_from(profile, overrides)
    refuse_pod_state(prof, profile, data_location)
    pkg = _package(pipeline, prof, package)
    spec = submit_spec(
        prof,
        pipeline,
        pkg,
        experiment=experiment,
        trigger_reason=trigger_reason,
        data_location=data_location,
    )
    session = _plan_or_session(prof, host, namespace, dry_run, lambda ns: plan_submit(spec, ns))
    if session is None:
        return
    run = start_run(session, spec)
    ref = run.pipeline
    verb = "uploaded" if ref.uploaded else "reused"
    err_console.print(
        f"pipeline {ref.pipeline_name}: {verb} version '{ref.version_name}' "
        f"(sha256:{ref.digest[:12]})",
        highlight=False,
        soft_wrap=True,
    )
    # The run's page in the Kubeflow UI (kfp.ui_url, or derived from the host).
    console.print(run.url, highlight=False, soft_wrap=True)
    if wait:
        state = session.wait(
            run.run_id,
            timeout_s=timeout,
            poll_s=poll,
            on_state=lambda s: err_console.print(f"run {run.run_id}: {s}"),
        )
        err_console.print(f"run {run.run_id} {state}")


schedule_app = typer.Typer(
    help="Recurring runs on Kubeflow: create, list, pause, resume, delete.", no_args_is_help=True
)


@schedule_app.command("create")
def schedule_create(
    pipeline: Annotated[str, typer.Argument(help="pipeline name, e.g. monitor")],
    cron: Annotated[
        str,
        typer.Option(
            "--cron",
            help="standard 5-field cron or @daily etc., e.g. '0 3 * * *' (UTC on the cluster)",
        ),
    ],
    overrides: OverridesArg = None,
    name: Annotated[str | None, typer.Option("--name", help="default: flywheel-PIPELINE")] = None,
    profile: ProfileOpt = None,
    host: HostOpt = None,
    namespace: NamespaceOpt = None,
    experiment: ExperimentOpt = None,
    package: PackageOpt = None,
    data_location: DataOpt = None,
    max_concurrency: Annotated[
        int,
        typer.Option(
            help="runs at once (1: never overlap; Kubeflow accepts 1 to 10)",
            callback=number_range(*MAX_CONCURRENCY),
        ),
    ] = 1,
    catchup: Annotated[
        bool, typer.Option("--catchup", help="backfill runs missed while paused")
    ] = False,
    dry_run: DryRunOpt = False,
) -> None:
    """Upload PIPELINE (once per content) and create a recurring run on a cron schedule."""
    from flywheel.kfp.client import create_schedule
    from flywheel.kfp.cron import to_kfp_cron
    from flywheel.kfp.plan import plan_schedule, schedule_spec

    to_kfp_cron(cron)  # a bad expression fails before compiling or connecting
    prof = profile_from(profile, overrides)
    refuse_pod_state(prof, profile, data_location)
    pkg = _package(pipeline, prof, package)
    spec = schedule_spec(
        prof,
        pipeline,
        pkg,
        cron,
        name=name,
        experiment=experiment,
        data_location=data_location,
        max_concurrency=max_concurrency,
        catchup=catchup,
    )
    session = _plan_or_session(prof, host, namespace, dry_run, lambda ns: plan_schedule(spec, ns))
    if session is None:
        return
    rec = create_schedule(session, spec)
    console.print(
        f"recurring run {rec.name} ({rec.recurring_run_id}): cron '{rec.cron}', {rec.status}"
    )


@schedule_app.command("list")
def schedule_list(
    profile: ProfileOpt = None,
    host: HostOpt = None,
    namespace: NamespaceOpt = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="one JSON document on stdout instead of the table")
    ] = False,
) -> None:
    """List recurring runs (in the namespace, if set)."""
    from rich.table import Table

    session = _session(profile_from(profile, []), host, namespace)
    runs = session.list_recurring_runs()
    if json_out:
        recurring = [dataclasses.asdict(r) for r in runs]
        _print_json({"host": session.target.host, "recurring_runs": recurring})
        return
    t = Table(show_header=True, header_style="bold")
    for col in ("id", "name", "status", "cron (KFP)", "max concurrency", "catch-up", "created"):
        # ids and names are what people copy into pause/resume/delete: never wrap them
        t.add_column(col, no_wrap=col in ("id", "name"))
    for r in runs:
        t.add_row(
            r.recurring_run_id,
            r.name,
            r.status,
            r.cron or "-",
            str(r.max_concurrency),
            "no" if r.no_catchup else "yes",
            r.created_at or "-",
        )
    console.print(t)


def _simple(action: str):
    def command(
        name_or_id: Annotated[str, typer.Argument(help="recurring run name or id")],
        profile: ProfileOpt = None,
        host: HostOpt = None,
        namespace: NamespaceOpt = None,
        dry_run: DryRunOpt = False,
    ) -> None:
        prof = profile_from(profile, [])
        if dry_run:
            from flywheel.kfp.plan import plan_recurring_action

            target = _target(prof, host, namespace)
            _print_plan(plan_recurring_action(action, name_or_id, target.namespace), target)
            return
        rid = getattr(_session(prof, host, namespace), action)(name_or_id)
        console.print(f"recurring run {rid}: {action}d")

    command.__doc__ = {
        "pause": "Pause (disable) a recurring run.",
        "resume": "Resume (enable) a paused recurring run.",
        "delete": "Delete a recurring run.",
    }[action]
    return command


for _action in ("pause", "resume", "delete"):
    schedule_app.command(_action)(_simple(_action))


def register(app: typer.Typer) -> None:
    app.command("submit")(submit_cmd)
    app.add_typer(schedule_app, name="schedule")
