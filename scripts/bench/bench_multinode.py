"""The data stage and training on a Ray cluster of containers, two nodes against one.

    .venv/bin/python scripts/bench/bench_multinode.py [--docs 3000] [--steps 20] [--out build/bench/multinode.json]

Both layouts run the component image (`make image`) with the corpus in S3 on loopback (moto),
the driver on the head as a RayJob's driver runs (`ray.mode: kuberay`):

  one node    a head with 2 CPUs: the driver and every task in one container, one disk;
  two nodes   KubeRay's layout: a head with no CPUs (the driver) and a worker with 2 CPUs and
              its own disk: every task's input and output crosses between containers (object
              transfer), and the corpus and the train split cross through storage (S3).

Same machine, same cores, same run: the ratio is what the split costs, not more hardware.
It prints a table (seconds end to end, the data stage's own step timings) and writes JSON.
Needs podman and the image (the first call builds it, as the container test tier does).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # the container harness the test tier uses

from common import machine, print_table, write_result  # noqa: E402
from drift_corpora import pydoc_paragraphs  # noqa: E402
from fixtures_containers import RayCluster, component_image  # noqa: E402
from fixtures_s3 import S3_CREDENTIALS, make_bucket, s3_server, upload_dir  # noqa: E402

BUCKET = "bench"
DRIVER = {"FLYWHEEL_KUBERAY_DRIVER": "1"}  # flywheel.runtime.kuberay_manifest.DRIVER_ENV

# On the head: the two stages through the pipeline's own runners, timed, as JSON.
STAGES = """
import json, sys, time
from flywheel.config import load_profile
from flywheel.stages import prepare, train
p = load_profile(None, sys.argv[1:])
t0 = time.perf_counter()
stats = prepare(p, "", "/tmp/ds", "bench")
t1 = time.perf_counter()
result = train(p, stats.out_dir or "/tmp/ds", None, "/tmp/model", "bench", "bench")
t2 = time.perf_counter()
print(json.dumps({"prepare_s": t1 - t0, "train_s": t2 - t1, "data_steps": stats.timings,
                  "docs": stats.docs, "tokens_per_s": result.tokens_per_s,
                  "train_loop_s": result.loop_s}))
"""


def overrides(endpoint: str, steps: int, layout: str) -> list[str]:
    # A storage root per layout: with one, the second layout's train step found the first's
    # final checkpoint (same run name) and resumed it, training no step.
    return [
        "ray.mode=kuberay",
        "data.source.kind=files",
        f"data.source.path=s3://{BUCKET}/corpus",
        f"storage.root=s3://{BUCKET}/root-{layout}",
        f"storage.endpoint_url={endpoint}",
        "data.tokenizer.vocab_size=2048",
        f"train.max_steps={steps}",
        "train.checkpoint_every=1000",  # no checkpoint inside the timed steps
        "train.scaling.num_workers=2",
        "train.scaling.cpus_per_worker=1",
        "tune.enabled=false",
    ]


def run_layout(name: str, image: str, args: list[str], head_cpus: int, workers: int) -> dict:
    t0 = time.perf_counter()
    with RayCluster(image, dict(S3_CREDENTIALS), workers=workers, head_cpus=head_cpus) as c:
        up = time.perf_counter() - t0
        done = c.on_head("python", "-c", STAGES, *args, env=DRIVER, timeout=3000)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {"layout": name, "cluster_up_s": up, **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=3000, help="pydoc paragraphs in the corpus")
    ap.add_argument("--steps", type=int, default=20, help="training steps")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "bench" / "multinode.json")
    a = ap.parse_args()
    image = component_image()
    with s3_server() as endpoint:
        make_bucket(endpoint, BUCKET)
        corpus = a.out.parent / "multinode-corpus"
        corpus.mkdir(parents=True, exist_ok=True)
        (corpus / "docs.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in pydoc_paragraphs()[: a.docs])
        )
        upload_dir(endpoint, corpus, f"s3://{BUCKET}/corpus")
        one = run_layout("one node", image, overrides(endpoint, a.steps, "one"), 2, 0)
        two = run_layout("two nodes", image, overrides(endpoint, a.steps, "two"), 0, 1)
    for run in (one, two):
        assert run["tokens_per_s"] > 0, f"{run['layout']}: no training step was timed"
    rows = []
    for key in ("prepare_s", "train_s", "train_loop_s"):
        rows.append((key, [f"{one[key]:.1f}", f"{two[key]:.1f}", f"{two[key] / one[key]:.2f}x"]))
    rows.append(("tokens/s", [f"{one['tokens_per_s']:,.0f}", f"{two['tokens_per_s']:,.0f}",
                              f"{two['tokens_per_s'] / one['tokens_per_s']:.2f}x"]))  # fmt: skip
    for step in sorted(set(one["data_steps"]) | set(two["data_steps"])):
        a1, a2 = one["data_steps"].get(step, 0.0), two["data_steps"].get(step, 0.0)
        ratio = f"{a2 / a1:.2f}x" if a1 else "-"
        rows.append((f" {step}", [f"{a1:.1f}", f"{a2:.1f}", ratio]))
    print_table("seconds", ["one node", "two nodes", "two / one"], rows)
    write_result(
        a.out, {"machine": machine(), "docs": a.docs, "steps": a.steps, "runs": [one, two]}
    )


if __name__ == "__main__":
    main()
