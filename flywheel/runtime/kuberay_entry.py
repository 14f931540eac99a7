"""Both sides of a Ray stage run as a RayJob (`flywheel.runtime.kuberay`), and the spec
between them.

The step side (`train`) uploads the stage's inputs to the hand-off URI, writes the spec,
runs the RayJob and collects the outputs and the result. The job side (`main`, the
RayJob's entrypoint: `python -m flywheel.runtime.kuberay_entry SPEC_URI`) stages the inputs
in, runs the very library stage function the local mode runs (`flywheel.stages`), and
uploads what it wrote. Only URIs cross: the job's pods never see the step's disk.

The spec (JSON):
    {"stage": "train", "run_id": ..., "profile": {...},
     "args": {...},                      # the stage function's other arguments
     "inputs": {"dataset": URI},         # directories, staged in before the call
     "outputs": {"model": URI},          # directories, uploaded after it
     "result": URI}                      # the stage's typed result, as JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from flywheel.errors import FlywheelError

log = logging.getLogger(__name__)

STAGE_TRAIN = "train"


# ------------------------------------------------------------------------- step side


def _profile_param(profile: Any) -> dict[str, Any]:
    from flywheel.config import Profile

    return profile.to_param() if isinstance(profile, Profile) else dict(profile)


def train(
    profile: dict[str, Any],
    dataset_dir: Path,
    params: dict[str, Any] | None,
    out_dir: Path,
    trigger_reason: str,
    run_id: str,
):
    """`flywheel.stages.train` with the same arguments and result, run in a RayJob."""
    from flywheel import storage
    from flywheel.profiles import load
    from flywheel.runtime import kuberay
    from flywheel.train.report import TrainResult

    p = load(profile)
    url = p.storage.endpoint_url
    base = kuberay.handoff_uri(p, run_id, STAGE_TRAIN)
    inputs = {"dataset": f"{base}/in/dataset"}
    outputs = {"model": f"{base}/out/model"}
    result_uri = f"{base}/out/result.json"
    spec = {
        "stage": STAGE_TRAIN,
        "run_id": run_id,
        "profile": _profile_param(profile),
        "args": {"params": params or {}, "trigger_reason": trigger_reason},
        "inputs": inputs,
        "outputs": outputs,
        "result": result_uri,
    }
    storage.upload_dir(Path(dataset_dir), inputs["dataset"], "storage.root", url)
    kuberay.run(p, STAGE_TRAIN, run_id, spec)
    data = json.loads(kuberay.read_text(result_uri, url))
    out_dir = Path(out_dir)
    loc = storage.parse(outputs["model"], "storage.root")
    storage.download(storage.filesystem(loc, url), loc.path, out_dir)
    # Paths in the result are the job's; the same files now lie under out_dir.
    data["model_dir"] = str(out_dir)
    data["loss_curve_html"] = str(out_dir / Path(data["loss_curve_html"]).name)
    return TrainResult.model_validate(data)


# ------------------------------------------------------------------------- job side


def _run_train(spec: dict[str, Any], inputs: dict[str, Path], out: dict[str, Path]) -> Any:
    from flywheel.stages import train as run

    args = spec["args"]
    return run(
        spec["profile"], inputs["dataset"], args["params"], out["model"],
        args["trigger_reason"], spec["run_id"],
    )  # fmt: skip


STAGES = {STAGE_TRAIN: _run_train}


def execute(spec: dict[str, Any], endpoint_url: str | None, work: Path) -> None:
    from flywheel import storage

    if spec["stage"] not in STAGES:
        raise FlywheelError(f"unknown stage {spec['stage']!r}; known: {', '.join(STAGES)}")
    inputs = {
        name: storage.stage_in(uri, work / "in" / name, "storage.root", endpoint_url)
        for name, uri in spec["inputs"].items()
    }
    outputs = {name: work / "out" / name for name in spec["outputs"]}
    for path in outputs.values():
        path.mkdir(parents=True, exist_ok=True)
    result = STAGES[spec["stage"]](spec, inputs, outputs)
    for name, uri in spec["outputs"].items():
        storage.upload_dir(outputs[name], uri, "storage.root", endpoint_url)
    from flywheel.runtime.kuberay import write_text

    write_text(spec["result"], result.model_dump_json(), endpoint_url)


def main(argv: list[str] | None = None) -> int:
    from flywheel.runtime.kuberay import read_text

    parser = argparse.ArgumentParser(prog=f"python -m {__name__}")
    parser.add_argument("spec", help="URI of the spec the step wrote")
    parser.add_argument("--endpoint-url", default=None, help="the store's endpoint (S3-compatible)")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        spec = json.loads(read_text(ns.spec, ns.endpoint_url))
        print(f"flywheel: stage {spec['stage']} of run {spec['run_id']} in this RayJob", flush=True)
        with tempfile.TemporaryDirectory(prefix="flywheel-job-") as tmp:
            execute(spec, ns.endpoint_url, Path(tmp))
    except FlywheelError as exc:
        # One line, last in the log: the step reports it as the RayJob's error.
        print(f"FlywheelError: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return 1
    print(f"flywheel: stage {spec['stage']} done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
