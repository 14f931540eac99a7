"""The Ray stages on a Ray cluster of separate containers, as KubeRay lays one out: a head
with no CPUs and a worker with its own filesystem, both from the component image built here
(tests/fixtures_containers.py). Every Ray task runs on the worker; the driver runs on the head,
as a RayJob's driver does under `ray.mode: kuberay` (the entrypoint's environment marks it).

What it proves:
- the data stage's Ray tasks read a corpus in storage themselves (before, the driver staged
  it onto its own disk and every task on the worker rejected every file as unreadable);
- they write nothing the driver needs onto their own node's disk (before, the shards, reports
  and dedup index landed on the worker and the dataset the step returned held none of them):
  the dataset holds every file its manifest lists;
- training, its worker on the other node, reads that dataset through storage.root (S3 on
  loopback), and the model lands on the driver.
A loopback `ray.address` is taken to mean one machine's disk (runtime.crossing), so address
mode is exercised here only through what kuberay mode shares with it (the hand-off).
"""

from __future__ import annotations

import json

import pytest
from drift_corpora import pydoc_paragraphs
from fixtures_containers import RayCluster, component_image
from fixtures_data import TINY_OVERRIDES
from fixtures_s3 import S3_CREDENTIALS, make_bucket, s3_server, upload_dir

from flywheel.runtime.kuberay_manifest import DRIVER_ENV

pytestmark = pytest.mark.integration

BUCKET = "multinode"
# What a RayJob's entrypoint runs with (runtime/kuberay_manifest.py): ray.mode kuberay's
# stages connect to the cluster they run on.
DRIVER = {DRIVER_ENV: "1"}

CHECK_DATASET = """
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
manifest = json.loads((root / "manifest.json").read_text())
listed = [f for s in manifest["splits"].values() for f in s["files"]]
missing = [f for f in listed if not (root / f).is_file()]
index = sorted(p.name for p in (root / "dedup_index").glob("part-*.parquet"))
print(json.dumps({"listed": listed, "missing": missing, "index_parts": index,
                  "rejects": (root / "rejects.jsonl").is_file()}))
"""


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server() as endpoint:
        make_bucket(endpoint, BUCKET)
        corpus = tmp_path_factory.mktemp("corpus")
        (corpus / "docs.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in pydoc_paragraphs()[:600])
        )
        upload_dir(endpoint, corpus, f"s3://{BUCKET}/corpus")
        yield endpoint


@pytest.fixture(scope="module")
def cluster(s3):
    with RayCluster(component_image(), env=dict(S3_CREDENTIALS)) as ray_cluster:
        yield ray_cluster


def _overrides(s3: str) -> list[str]:
    tiny = {o.split("=", 1)[0]: o for o in TINY_OVERRIDES}
    tiny.update(
        {
            o.split("=", 1)[0]: o
            for o in (
                "ray.mode=kuberay",
                "data.source.kind=files",
                f"data.source.path=s3://{BUCKET}/corpus",
                "data.source.max_docs=500",
                f"storage.root=s3://{BUCKET}/root",
                f"storage.endpoint_url={s3}",
                "train.scaling.num_workers=1",
                "train.scaling.cpus_per_worker=1",
            )
        }
    )
    return list(tiny.values())


def test_prepare_and_train_across_nodes(cluster, s3):
    args = _overrides(s3)
    cluster.on_head("flywheel", "data", "prepare", "--out", "/tmp/ds", *args, env=DRIVER)
    seen = json.loads(cluster.on_head("python", "-c", CHECK_DATASET, "/tmp/ds").stdout)
    assert seen["listed"] and seen["missing"] == [], seen
    assert seen["index_parts"] and seen["rejects"], seen
    # Nothing of the dataset was left on the worker that ran the tasks.
    assert cluster.on_worker("test", "-e", "/tmp/ds").returncode != 0
    # Training: its worker runs on the other node and reads the train split as a URI.
    cluster.on_head(
        "flywheel", "train", "--data", "/tmp/ds", "--out", "/tmp/model", *args, env=DRIVER
    )
    model = cluster.on_head("ls", "/tmp/model").stdout.split()
    assert "config.json" in model and any(n.endswith(".safetensors") for n in model), model
