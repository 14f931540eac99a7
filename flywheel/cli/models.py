"""`flywheel models list | history | promote | rollback`: the registry, with reasons."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.table import Table

from flywheel.cli.common import OverridesArg, ProfileOpt, console, profile_from, styled

models_app = typer.Typer(
    help="The model registry: versions, the champion's history, promotion and rollback.",
    no_args_is_help=True,
)

ReasonOpt = Annotated[
    str, typer.Option("--reason", "-r", help="why (recorded in the history; required)")
]
ActorOpt = Annotated[
    str | None, typer.Option("--actor", help="who (default: user@host)", show_default=False)
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="one JSON document on stdout instead of the table")
]


def _print_json(doc: dict[str, Any]) -> None:
    # Plain stdout, not the rich console: no wrapping or markup inside the document.
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _registry(profile, overrides):
    from flywheel.registry import Registry

    return Registry(profile_from(profile, overrides))


def _fmt(tags: dict[str, str], key: str) -> str:
    value = tags.get(key)
    if value is None:
        return ""
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


@models_app.command("list")
def list_versions(
    overrides: OverridesArg = None, profile: ProfileOpt = None, json_out: JsonOpt = False
) -> None:
    """Every version with its aliases, verdict, metrics and lineage."""
    from flywheel import contracts
    from flywheel.registry import CHAMPION, TAG_DATA_HASH, TAG_FLAVOR, TAG_TRIGGER, TAG_VERDICT

    reg = _registry(profile, overrides)
    rows = reg.versions()
    if json_out:
        versions = [v.model_dump(mode="json") for v in rows]
        _print_json({"model": reg.name, "tracking_uri": reg.uri, "versions": versions})
        return
    t = Table(title=f"{reg.name} @ {reg.uri}", header_style="bold")
    for col in ("ver", "aliases", "verdict", "bpb", "ppl", "acc", "data", "trigger", "created"):
        t.add_column(col, justify="right" if col in ("bpb", "ppl", "acc") else "left")
    for v in rows:
        aliases = ", ".join(v.aliases)
        if v.tags.get(TAG_FLAVOR) == "raw":
            aliases += " (raw files: not servable)"
        t.add_row(
            v.version,
            styled((aliases, "bold green")) if CHAMPION in v.aliases else aliases,
            v.tags.get(TAG_VERDICT, ""),
            _fmt(v.tags, contracts.CHALLENGER_BITS_PER_BYTE),
            _fmt(v.tags, contracts.CHALLENGER_PERPLEXITY),
            _fmt(v.tags, f"{contracts.CHALLENGER_PREFIX}accuracy"),
            v.tags.get(TAG_DATA_HASH, "")[:8],
            v.tags.get(TAG_TRIGGER, "")[:30],
            v.created_at.strftime("%m-%d %H:%M") if v.created_at else "",
        )
    console.print(t if rows else f"no versions of {reg.name} at {reg.uri}")


@models_app.command("history")
def history(
    overrides: OverridesArg = None, profile: ProfileOpt = None, json_out: JsonOpt = False
) -> None:
    """Every move of the champion alias, oldest first."""
    reg = _registry(profile, overrides)
    entries = reg.history()
    if json_out:
        moves = [e.model_dump(mode="json", by_alias=True) for e in entries]
        _print_json({"model": reg.name, "tracking_uri": reg.uri, "history": moves})
        return
    t = Table(title=f"{reg.name}: champion history", header_style="bold")
    for col in ("#", "time (UTC)", "kind", "from", "to", "actor", "reason"):
        t.add_column(col)
    for e in entries:
        t.add_row(
            str(e.seq),
            e.time.strftime("%Y-%m-%d %H:%M:%S"),
            e.kind,
            e.from_version or "-",
            e.to_version,
            e.actor,
            e.reason,
        )
    console.print(t if entries else f"no champion moves of {reg.name} yet")


@models_app.command("promote")
def promote(
    version: Annotated[str, typer.Argument(help="the version to make champion")],
    reason: ReasonOpt,
    actor: ActorOpt = None,
    overrides: OverridesArg = None,
    profile: ProfileOpt = None,
) -> None:
    """Make VERSION the champion by hand (recorded as a manual promotion). Already the
    champion: nothing changes and it exits 0, so automation can retry it."""
    from flywheel.registry import default_actor

    reg = _registry(profile, overrides)
    e = reg.promote(version, reason=reason, actor=actor or default_actor(), kind="manual")
    if e is None:
        # The number, not the word given ("champion", "latest"): what a script compares.
        champion = reg.champion()
        number = champion.version if champion else version
        console.print(f"{reg.name}: version {number} is already the champion; nothing changed")
        return
    console.print(f"{reg.name}: champion {e.from_version or '(none)'} -> {e.to_version} (#{e.seq})")


@models_app.command("rollback")
def rollback(
    reason: ReasonOpt,
    to: Annotated[
        str | None, typer.Option("--to", help="version (default: the previous champion)")
    ] = None,
    actor: ActorOpt = None,
    overrides: OverridesArg = None,
    profile: ProfileOpt = None,
) -> None:
    """Move the champion back (an alias move: instant, recorded)."""
    from flywheel.registry import default_actor

    reg = _registry(profile, overrides)
    e = reg.rollback(to=to, reason=reason, actor=actor or default_actor())
    console.print(f"{reg.name}: champion {e.from_version} -> {e.to_version} (rollback, #{e.seq})")


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
