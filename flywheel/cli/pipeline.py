"""`flywheel run` and `flywheel compile`: the retraining DAG here, and its IR YAML for Kubeflow."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flywheel import contracts
from flywheel.cli.common import (
    OverridesArg,
    ProfileOpt,
    check_output,
    console,
    err_console,
    make_console,
    profile_from,
    styled,
)
from flywheel.config import Profile
from flywheel.errors import ConfigError, FlywheelError


def _progress_printer(stream=None):
    # Bound to the stdout of now: while the pipeline runs, sys.stdout is redirected to the
    # log file (kfp.local's task logs), and progress must still reach the terminal.
    out = make_console(file=stream or sys.stdout, highlight=False)

    def on_event(task: str, status: str, seconds: float) -> None:
        if status == "start":
            out.print(styled("  ", (">", "cyan"), f" {task} ..."))
        elif status == "SUCCESS":
            out.print(styled("  ", ("ok", "green"), f" {task} ", (f"{seconds:.1f}s", "dim")))
        else:
            out.print(
                styled("  ", (status.lower(), "red"), f" {task} ", (f"{seconds:.1f}s", "dim"))
            )

    return on_event


def run_and_report(name: str, profile: Profile, arguments: dict, *, json_out: bool = False) -> dict:
    """Run a pipeline locally, then print the summary table; non-zero exit on failure.

    `json_out`: the progress and the table go to stderr, and stdout gets one JSON document
    (`monitor_document`), also when a task failed, before the error line.
    """
    from flywheel.kfp.local import run_local, task_name
    from flywheel.summary import run_facts
    from flywheel.tracking import tracking_uri

    show = err_console if json_out else console
    show.print(styled((name, "bold"), f" on this machine (kfp.local, profile '{profile.name}')"))
    on_event = _progress_printer(sys.stderr if json_out else None)
    run = run_local(name, profile, arguments=arguments, on_event=on_event)
    facts = run_facts(profile, run.run_id)
    t = Table(title=f"{name}: {run.run_id}", show_header=True, header_style="bold")
    t.add_column("what")
    t.add_column("value", overflow="fold")
    t.add_row(
        "state",
        styled(("succeeded", "green"))
        if run.succeeded
        else styled(("failed", "red"), f" in {run.failed_task}"),
    )
    labels = {
        "docs_read": "documents read",
        "docs_kept": "documents kept",
        "docs_rejected": "documents rejected",
        "final_loss": "final training loss",
        "challenger_bits_per_byte": "challenger bits per byte",
        "champion_bits_per_byte": "champion bits per byte",
        "bits_per_byte_paired_abs": "paired difference (bits/byte)",
        "challenger_perplexity": "challenger perplexity",
        "champion_perplexity": "champion perplexity",
        "verdict": "gate verdict",
        "version": "registered version",
        "alias": "its alias",
    }
    for key, label in labels.items():
        if key in facts:
            t.add_row(label, str(facts[key]))
    if contracts.VERSION in facts and contracts.CHAMPION_PERPLEXITY not in facts:
        t.add_row("champion perplexity", "(no champion before this run)")
    for task, artifact, label in [
        ("train", "loss_curve", "loss curve (HTML)"),
        ("tune", "plots", "tuning plots (HTML)"),
        ("gate", "decision", "gate decision (Markdown)"),
        ("gate", "model_card", "model card (Markdown)"),
        (contracts.DRIFT_CHECK, "report", "drift report (HTML)"),
        ("summary", "report", "run summary (Markdown)"),
    ]:
        path = run.artifact(task, artifact)
        if path:
            t.add_row(label, str(path))
    t.add_row("wall time", f"{run.wall_s:.1f}s")
    t.add_row("full log", str(run.log_file))
    uri = tracking_uri(profile)
    t.add_row(
        "MLflow UI", f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else uri
    )
    drift: dict = {}
    if contracts.DRIFT_CHECK in facts.get(contracts.STAGE_SECONDS, {}) or name == "monitor":
        from flywheel import ledger

        drift = ledger.collect(profile, run.run_id).get(contracts.DRIFT_CHECK, {})
        facts["retrain"] = bool(drift.get("metrics", {}).get("retrain"))
        if drift:
            t.add_row("monitor decision", drift["tags"].get("decision", ""))
    show.print(t)
    if json_out:
        failed = task_name(run.failed_task)  # the task itself, unquoted, for machines
        doc = monitor_document(facts, drift, run.succeeded, failed, run.error)
        sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        sys.stdout.flush()
    if not run.succeeded:
        raise pipeline_error(name, run.failed_task, run.error, run.log_file)
    return facts


def monitor_document(
    facts: dict, drift: dict, succeeded: bool, failed_task: str | None, error: str | None
) -> dict:
    """`flywheel monitor --json`: the decision and what it rests on, for automation.

    `drift` is the drift check's ledger entry (empty when the run failed before it): its
    numbers go under "drift" as recorded, so a new descriptor needs no change here. The
    retrain's own facts (verdict, version) are at the top level when one ran.
    """
    tags = drift.get("tags", {})
    metrics = {k: v for k, v in drift.get("metrics", {}).items() if k != "retrain"}
    return {
        **{k: v for k, v in facts.items() if k not in ("retrain", "stage_seconds")},
        "state": "succeeded" if succeeded else "failed",
        "failed_task": failed_task,
        "error": error,
        "retrain": bool(facts.get("retrain")),
        "decision": tags.get("decision"),
        "window": tags.get("window"),
        "drift": metrics,
        "stage_seconds": facts.get("stage_seconds", {}),
    }


def pipeline_error(
    name: str, failed_task: str | None, error: str | None, log_file: Path | None
) -> FlywheelError:
    """One line: which task failed and its own error (from its traceback), then the log.

    A task that failed on a bad profile (ConfigError) exits 2, as the same error would
    outside a pipeline.
    """
    where = f" in task {failed_task}" if failed_task else ""
    why = f": {error}" if error else ""
    message = f"pipeline {name} failed{where}{why}; see {log_file}"
    if error and error.startswith(f"{ConfigError.__name__}:"):
        return ConfigError(message)
    return FlywheelError(message)


def check_window(profile: Profile, window: str) -> str:
    """The monitor's window, checked before the pipeline starts (a usage error, exit 2).

    Only existence, and only for a local path: what is inside is the drift check's to judge,
    and a URI (s3://, gs://) is read by the task where it runs.
    """
    source = "--window" if window else "drift.window"
    window = window or profile.drift.window or ""
    if not window:
        raise ConfigError("no production window: pass --window or set drift.window in the profile")
    if "://" not in window and not Path(window).expanduser().exists():
        raise ConfigError(f"{source} {window}: no such file or directory")
    return window


def check_resources(profile: Profile) -> None:
    """The retraining DAG's Ray requests against this machine, before any task runs.

    kfp.local runs each task here, so a local Ray in a task has exactly what
    `expected_resources` predicts; train and tune check again themselves (and on a cluster).
    """
    from flywheel.runtime import check_before_start
    from flywheel.train.plan import train_resources, tune_resources

    needs = [train_resources(profile)]
    if profile.tune.enabled:
        needs.append(tune_resources(profile))
    check_before_start(profile.ray, needs)


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        overrides: OverridesArg = None,
        profile: ProfileOpt = None,
        trigger_reason: Annotated[
            str, typer.Option(help="recorded on the model's lineage")
        ] = "manual",
        data_location: Annotated[
            str,
            typer.Option(
                help="a directory/file of documents or a datasets path, replacing the profile's source"
            ),
        ] = "",
    ) -> None:
        """Run the retraining DAG on this machine (kfp.local, local Ray, MLflow + Optuna on SQLite)."""
        p = profile_from(profile, overrides)
        check_resources(p)
        run_and_report(
            "retrain", p, {"trigger_reason": trigger_reason, "data_location": data_location}
        )

    @app.command("monitor")
    def monitor_cmd(
        overrides: OverridesArg = None,
        profile: ProfileOpt = None,
        window: Annotated[
            str,
            typer.Option(
                help="production records: a JSONL/parquet file or a directory (default: drift.window)"
            ),
        ] = "",
        json_out: Annotated[
            bool,
            typer.Option(
                "--json",
                help="print the decision as one JSON document on stdout (progress on stderr)",
            ),
        ] = False,
    ) -> None:
        """One drift check on this machine and, if drifted outside the cooldown, one retrain.

        Exit codes (for cron): 0 no retrain (no drift, cooldown, or a retrain in flight),
        3 drift detected and the retrain ran, 1 error (bad window, unreachable registry, failed step).
        With --json the exit codes are the same; stdout holds only the JSON document.
        """
        p = profile_from(profile, overrides)
        arguments = {"window": check_window(p, window)}
        facts = run_and_report("monitor", p, arguments, json_out=json_out)
        if facts.get("retrain"):
            raise typer.Exit(3)

    @app.command("compile")
    def compile_cmd(
        overrides: OverridesArg = None,
        profile: ProfileOpt = None,
        out: Annotated[Path, typer.Option(help="output directory")] = Path("build/pipelines"),
    ) -> None:
        """Write KFP IR YAML for every pipeline (and load each back to prove it parses)."""
        from flywheel.kfp.compile import compile_all
        from flywheel.kfp.guard import pod_state_problems
        from flywheel.runtime.kuberay_manifest import idle_accelerators

        p = profile_from(profile, overrides)
        check_output(out, "--out")  # a file there, or no permission: one line, before compiling
        idle = idle_accelerators(p)  # a GPU pod that only watches a RayJob: a warning only
        for problem in [*pod_state_problems(p), *([idle] if idle else [])]:
            err_console.print(
                styled(("warning:", "yellow"), " ", problem), highlight=False, soft_wrap=True
            )
        for path in compile_all(p, out):
            console.print(styled(("compiled", "green"), f" {path}"))
