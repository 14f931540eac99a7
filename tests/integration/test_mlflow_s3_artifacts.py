"""A tracking server that does not proxy artifacts (`--no-serve-artifacts`, an s3:// default
artifact root), as a cluster may run one: every client writes and reads models in object
storage itself, with boto3. The store here is S3-compatible (moto on 127.0.0.1, as MinIO on a
cluster), named by `storage.endpoint_url` alone: nothing in the environment says where S3 is,
so an upload that does not go through the profile's endpoint goes to AWS and fails."""

from __future__ import annotations

import pytest
from fixtures_models import fresh_model, save_model, split_paragraphs, train_tokenizer
from fixtures_s3 import S3_CREDENTIALS, list_keys, make_bucket, s3_server
from fixtures_services import mlflow_server

from flywheel.config import Profile
from flywheel.registry import Registry, lineage_tags
from flywheel.registry.lineage import CARD_ARTIFACT

pytestmark = pytest.mark.integration

BUCKET = "mlflow-artifacts"


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """(moto endpoint, tracking server URL): the server's default artifact root in moto."""
    with s3_server() as endpoint:
        make_bucket(endpoint, BUCKET)
        root = f"s3://{BUCKET}/mlflow"
        with mlflow_server(tmp_path_factory.mktemp("server"), default_artifact_root=root) as url:
            yield endpoint, url


@pytest.fixture
def aws_env(monkeypatch):
    """Credentials only, as the flywheel-s3 Secret gives a pod; no endpoint anywhere in the
    environment (another module's moto fixture sets AWS_ENDPOINT_URL for the session), and
    one quick attempt, so a request that goes to AWS fails at once instead of retrying."""
    for key, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    # Set, then removed: monkeypatch then removes whatever the code under test sets.
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "unset")
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_models_reach_the_profiles_object_store(stores, aws_env, tmp_path):
    endpoint, url = stores
    tok = train_tokenizer(split_paragraphs()[0])
    model_dir = save_model(fresh_model(tok, seed=0), tok, tmp_path / "model")
    profile = Profile(
        state_dir=str(tmp_path / "state"),
        registry={"tracking_uri": url, "model_name": "s3-lm", "retries": 0},
        storage={"endpoint_url": endpoint},
    )
    reg = Registry(profile)
    version = reg.register_candidate(
        model_dir, tags=lineage_tags(data_hash="h", pipeline_run_id="p1"), model_card="# card"
    )
    keys = list_keys(endpoint, f"s3://{BUCKET}/mlflow")
    # The model's files and its card went to the server's artifact root in the profile's store.
    assert any(k.endswith("/config.json") for k in keys), keys
    assert any(k.endswith(f"/{CARD_ARTIFACT}") for k in keys), keys
    # ... and come back from there: what the next warm start and the evaluations download.
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(reg.download(version)).config.n_layer == 2
