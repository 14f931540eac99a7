"""A control pipeline for the pod harness (tests/fixtures_pod.py): it must fail in pods and
pass under plain kfp.local. No `from __future__ import annotations` here: KFP reads the
components' annotations as types, not strings."""

from kfp import dsl


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def write_here() -> str:
    import os
    from pathlib import Path

    Path("left-behind.txt").write_text("outside the artifacts")
    return os.getcwd()


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def read_neighbour(path: str) -> str:
    from pathlib import Path

    return (Path(path) / "left-behind.txt").read_text()


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def where() -> str:
    import json
    import os

    import flywheel

    return json.dumps([flywheel.__file__, os.environ.get("HOME"), sorted(os.environ)])


@dsl.pipeline(name="isolation-control")
def control():
    # `where` first: kfp.local stops scheduling tasks once one fails.
    seen = where()
    read_neighbour(path=write_here().after(seen).output)
