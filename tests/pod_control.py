"""A control pipeline for the container tier (tests/fixtures_containers.py): it must fail
there, where each task is its own container, and would pass where tasks share a disk. No
`from __future__ import annotations` here: KFP reads the components' annotations as types."""

from kfp import dsl


def control_pipeline(image: str, checkout: str):
    """The control pipeline, its components on `image`; `checkout` is a host path no pod has."""

    @dsl.component(base_image=image, install_kfp_package=False)
    def write_here() -> str:
        import os
        from pathlib import Path

        Path("left-behind.txt").write_text("outside the artifacts")
        return os.getcwd()

    @dsl.component(base_image=image, install_kfp_package=False)
    def read_neighbour(path: str) -> str:
        from pathlib import Path

        return (Path(path) / "left-behind.txt").read_text()

    @dsl.component(base_image=image, install_kfp_package=False)
    def where(checkout: str) -> str:
        import json
        import os
        from pathlib import Path

        import flywheel

        return json.dumps(
            {
                "package": flywheel.__file__,
                "home": os.environ.get("HOME"),
                "uid": os.getuid(),
                "env": sorted(os.environ),
                "checkout_visible": Path(checkout, "pyproject.toml").exists(),
            }
        )

    @dsl.pipeline(name="isolation-control")
    def control():
        # `where` first: kfp.local stops scheduling tasks once one fails.
        seen = where(checkout=checkout)
        read_neighbour(path=write_here().after(seen).output)

    return control
