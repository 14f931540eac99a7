"""`flywheel kuberay render | check`: the RayJobs of `ray.mode: kuberay`, for review and RBAC."""

from __future__ import annotations

from typing import Annotated

import typer

from flywheel.cli.common import OverridesArg, ProfileOpt, console, err_console, profile_from

kuberay_app = typer.Typer(
    help="RayJobs per Ray stage on Kubernetes (ray.mode: kuberay).", no_args_is_help=True
)

RunIdOpt = Annotated[
    str,
    typer.Option(
        "--run-id",
        help="the pipeline run id the names and labels derive from (on Kubeflow: the run's UUID)",
    ),
]


@kuberay_app.command("render")
def render(
    stage: Annotated[str, typer.Argument(help="prepare-data, tune or train")],
    overrides: OverridesArg = None,
    profile: ProfileOpt = None,
    run_id: RunIdOpt = "RUN-ID",
) -> None:
    """Print, as YAML on stdout, the RayJob that STAGE's step would create (nothing is sent),
    for review or for keeping in GitOps."""
    import yaml

    from flywheel.errors import ConfigError
    from flywheel.runtime import kuberay

    p = profile_from(profile, overrides)
    if stage not in kuberay.RAY_STAGES:
        raise ConfigError(
            f"{stage!r} is not a Ray stage; give one of {', '.join(kuberay.RAY_STAGES)}"
        )
    if p.ray.mode != "kuberay":
        err_console.print(
            f"note: ray.mode is {p.ray.mode!r}; this is what ray.mode=kuberay would create",
            highlight=False,
        )
    spec_uri = f"{kuberay.handoff_uri(p, run_id, stage)}/spec.json"
    body = kuberay.render(p, stage, run_id, spec_uri)
    console.print(
        yaml.safe_dump(body, sort_keys=False), end="", highlight=False, markup=False, soft_wrap=True
    )


@kuberay_app.command("check")
def check(overrides: OverridesArg = None, profile: ProfileOpt = None) -> None:
    """Ask the Kubernetes API (SelfSubjectAccessReview) whether this identity may do what a
    step in ray.kuberay.namespace does; exit 1 listing what is missing."""
    from flywheel.errors import FlywheelError
    from flywheel.runtime import kuberay

    p = profile_from(profile, overrides)
    missing = kuberay.missing_access(p)
    ns = kuberay.namespace(p)
    if missing:
        raise FlywheelError(
            f"in namespace {ns} this identity may not: {', '.join(missing)}; apply "
            f"{kuberay.RBAC_FILE} (a Role and a RoleBinding for the run's service account)"
        )
    console.print(f"ok: everything a kuberay step needs is allowed in namespace {ns}")


def register(app: typer.Typer) -> None:
    app.add_typer(kuberay_app, name="kuberay")
