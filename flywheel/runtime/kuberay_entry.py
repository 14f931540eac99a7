"""Both sides of a Ray stage run as a RayJob (`flywheel.runtime.kuberay`), and the spec
between them.

The step side (`prepare`, `tune`, `train`: the `flywheel.stages` runners' pipeline
arguments and results, through `launch`) uploads the stage's inputs to the hand-off URI,
writes the spec, runs the RayJob and collects the outputs and the result. The job side (`main`, the
RayJob's entrypoint: `python -m flywheel.runtime.kuberay_entry SPEC_URI`) stages the inputs
in, runs the very library stage function the local mode runs (`flywheel.stages`), and
uploads what it wrote. Only URIs cross: the job's pods never see the step's disk.

The spec (JSON; a stage is one of flywheel.contracts PREPARE_DATA, TUNE, TRAIN):
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flywheel.contracts import PREPARE_DATA, TRAIN, TUNE
from flywheel.errors import FlywheelError

log = logging.getLogger(__name__)

# An output directory's path inside the job, in the result JSON, becomes this marker; the
# step puts its own path for that output in its place.
OUT_MARK = "@flywheel-out/"


# ------------------------------------------------------------------------- step side


def _profile_param(profile: Any) -> dict[str, Any]:
    from flywheel.config import Profile

    return profile.to_param() if isinstance(profile, Profile) else dict(profile)


def launch(
    profile: dict[str, Any] | Any,
    stage: str,
    run_id: str,
    inputs: dict[str, Path],
    outputs: dict[str, Path],
    args: dict[str, Any],
) -> dict[str, Any]:
    """Upload `inputs` (directories), run `stage` in a RayJob, download its `outputs` into
    the given directories. Returns the stage's result as JSON data, paths made local."""
    from flywheel import storage
    from flywheel.profiles import load
    from flywheel.runtime import kuberay

    p = load(profile)
    url = p.storage.endpoint_url
    base = kuberay.handoff_uri(p, run_id, stage)
    in_uris = {name: f"{base}/in/{name}" for name in inputs}
    out_uris = {name: f"{base}/out/{name}" for name in outputs}
    result_uri = f"{base}/out/result.json"
    for name, path in inputs.items():
        storage.upload_dir(Path(path), in_uris[name], "storage.root", url)
    spec = {
        "stage": stage,
        "run_id": run_id,
        "profile": _profile_param(profile),
        "args": args,
        "inputs": in_uris,
        "outputs": out_uris,
        "result": result_uri,
    }
    try:
        kuberay.run(p, stage, run_id, spec)
        text = kuberay.read_text(result_uri, url)
        for name, path in outputs.items():
            loc = storage.parse(out_uris[name], "storage.root")
            storage.download(storage.filesystem(loc, url), loc.path, Path(path))
            text = text.replace(json.dumps(OUT_MARK + name)[1:-1], json.dumps(str(path))[1:-1])
    finally:
        # The payload copies (datasets, models) go once the step holds its outputs, or has
        # failed; spec.json and result.json, small, stay for the run's exit handler.
        for uri in [*in_uris.values(), *out_uris.values()]:
            storage.remove_tree(uri, "storage.root", url)
    return json.loads(text)


def runner(stage: str, profile: Any) -> Callable[..., Any]:
    """The function a component calls for a Ray stage (contracts PREPARE_DATA, TUNE, TRAIN):
    the library's own runner (`flywheel.stages`), or with `ray.mode: kuberay` the same stage
    in a RayJob of its own. Both take the pipeline's arguments and return the same result."""
    from flywheel import stages
    from flywheel.runtime import kuberay

    remote = kuberay.launches(profile)
    choices: dict[str, Callable[..., Any]] = {
        PREPARE_DATA: prepare if remote else stages.prepare,
        TUNE: tune if remote else stages.tune,
        TRAIN: train if remote else stages.train,
    }
    return choices[stage]


def prepare(profile: dict[str, Any], data_location: str, out_dir: str | Path, run_id: str):
    """`flywheel.stages.prepare` (the pipeline's arguments), run in a RayJob."""
    from flywheel.data.stats import DataStats

    outputs = {"dataset": Path(out_dir)}
    args = {"data_location": data_location}
    return DataStats.model_validate(launch(profile, PREPARE_DATA, run_id, {}, outputs, args))


def tune(profile: dict[str, Any], dataset_dir: str | Path, out_dir: str | Path, run_id: str):
    """`flywheel.stages.tune` (the pipeline's arguments), run in a RayJob."""
    from flywheel.tune.report import TuneResult

    inputs, outputs = {"dataset": Path(dataset_dir)}, {"plots": Path(out_dir)}
    return TuneResult.model_validate(launch(profile, TUNE, run_id, inputs, outputs, {}))


def train(
    profile: dict[str, Any],
    dataset_dir: str | Path,
    params: dict[str, Any] | None,
    out_dir: str | Path,
    trigger_reason: str,
    run_id: str,
):
    """`flywheel.stages.train` (the pipeline's arguments), run in a RayJob."""
    from flywheel.train.report import TrainResult

    inputs, outputs = {"dataset": Path(dataset_dir)}, {"model": Path(out_dir)}
    args = {"params": params or {}, "trigger_reason": trigger_reason}
    return TrainResult.model_validate(launch(profile, TRAIN, run_id, inputs, outputs, args))


# ------------------------------------------------------------------------- job side


def _run_prepare(spec: dict[str, Any], inputs: dict[str, Path], out: dict[str, Path]) -> Any:
    from flywheel.stages import prepare as run

    return run(spec["profile"], spec["args"]["data_location"], out["dataset"], spec["run_id"])


def _run_tune(spec: dict[str, Any], inputs: dict[str, Path], out: dict[str, Path]) -> Any:
    from flywheel.stages import tune as run

    return run(spec["profile"], inputs["dataset"], out["plots"], spec["run_id"])


def _run_train(spec: dict[str, Any], inputs: dict[str, Path], out: dict[str, Path]) -> Any:
    from flywheel.stages import train as run

    args = spec["args"]
    return run(
        spec["profile"], inputs["dataset"], args["params"], out["model"],
        args["trigger_reason"], spec["run_id"],
    )  # fmt: skip


STAGES = {PREPARE_DATA: _run_prepare, TUNE: _run_tune, TRAIN: _run_train}


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

    text = result.model_dump_json()
    for name, path in outputs.items():  # this pod's paths mean nothing to the step
        text = text.replace(json.dumps(str(path))[1:-1], json.dumps(OUT_MARK + name)[1:-1])
    write_text(spec["result"], text, endpoint_url)


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
