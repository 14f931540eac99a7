"""`ray.mode: address` with storage.root on S3: the workers of a REAL `ray start --head` (the
address-mode tests' fixture) train from what crossed as URIs (runtime.crossing), not from
the driver's disk. S3 is a real server on loopback (moto, tests/fixtures_s3.py), started
before the head so its workers have the credentials, as a cluster's nodes would.
"""

from __future__ import annotations

import shutil

import pytest
from fixtures_data import TINY_MODEL, build_dataset, tiny_steps
from fixtures_s3 import list_keys, make_bucket, s3_endpoint  # noqa: F401  (fixture)
from test_ray_address import cluster  # noqa: F401  (the real head, reused)

from flywheel.config import load_profile
from flywheel.runtime import crossing

pytestmark = pytest.mark.integration

TINY = [
    *TINY_MODEL,
    *tiny_steps(4, checkpoint_every=4, log_every=2, warmup=1),
    "train.scaling.num_workers=1",  # one CPU left on the 2-CPU head for the streamed read
]


@pytest.fixture(scope="module")
def head(s3_endpoint, request):  # noqa: F811
    """The real head (test_ray_address's fixture, this module's own instance), started
    after the S3 server so that its workers inherit the credentials, as nodes would."""
    return request.getfixturevalue("cluster")


def test_workers_train_from_uris_on_s3(head, s3_endpoint, state_dir, tmp_path, monkeypatch):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from flywheel.train import run
    from flywheel.train.model import fresh_config
    from flywheel.train.plan import make_plan
    from flywheel.train.run import train

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    bucket = make_bucket(s3_endpoint, "crossing")
    dataset = build_dataset(tmp_path / "dataset", block_size=32, vocab_size=512, max_docs=120)
    profile = load_profile(
        None,
        [
            *TINY,
            "ray.mode=address",
            f"ray.address={head.gcs}",
            f"storage.root={bucket}/root",
            f"storage.endpoint_url={s3_endpoint}",
        ],
    )
    # A warm-start model in a directory of the driver's only.
    champion = tmp_path / "champion"
    plan = make_plan(profile, dataset)
    AutoModelForCausalLM.from_config(fresh_config(profile.model, plan.dataset)).save_pretrained(
        champion
    )

    # The split is streamed by Ray Data read tasks on the cluster (not read up front here).
    monkeypatch.setattr(run, "MATERIALIZE_BELOW_BYTES", 0)
    # Once uploaded, the champion's directory is gone from the driver's disk: a worker
    # handed its path would fail to load it.
    real = crossing.for_workers
    handed: list = []

    def then_remove(profile, plan, resume):
        out = real(profile, plan, resume)
        handed.append(out)
        shutil.rmtree(champion)
        return out

    monkeypatch.setattr(crossing, "for_workers", then_remove)

    result = train(profile, dataset, tmp_path / "model", init_from=str(champion))

    assert result.steps == 4 and (tmp_path / "model" / "config.json").is_file()
    worker_plan, _ = handed[0]
    assert worker_plan.model_source.path.startswith(f"{bucket}/root/handoff/model-")
    assert all(
        f.startswith(f"{bucket}/root/handoff/data-") for f in worker_plan.dataset.train_files
    )
    keys = list_keys(s3_endpoint, f"{bucket}/root/handoff")
    assert any("/handoff/model-" in k and k.endswith("config.json") for k in keys), keys
    assert any("/handoff/data-" in k and k.endswith(".parquet") for k in keys), keys
    # The checkpoints went to the same store (storage.root/ray).
    assert result.checkpoint.startswith("s3://crossing/root/ray/")
