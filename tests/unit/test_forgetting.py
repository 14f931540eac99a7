"""Replay and the regression set: the pure parts and the no-op paths (the lineage parts
run in tests/integration/test_monitor_local.py, on a real champion)."""

from pathlib import Path

import pytest

from flywheel.config import load_profile
from flywheel.forgetting import replay_count, replayed


@pytest.mark.parametrize(
    ("n_new", "share", "n"),
    [(300, 0.2, 75), (300, 0.0, 0), (0, 0.5, 0), (10, 0.5, 10), (1, 0.9, 9)],
)
def test_replay_count_makes_the_share_of_the_whole_corpus(n_new, share, n):
    assert replay_count(n_new, share) == n
    if n:
        assert n / (n + n_new) == pytest.approx(share, abs=0.01)


def test_no_replay_without_new_data_or_share(state_dir, tmp_path):
    (tmp_path / "w.jsonl").write_text('{"text": "x"}\n')
    p = load_profile(None, ["data.source.kind=files", f"data.source.path={tmp_path / 'w.jsonl'}"])
    with replayed(p, new_data=False) as same:
        assert same is p  # the profile's own corpus: nothing replayed
    off = load_profile(
        None,
        [
            "drift.replay_share=0",
            "data.source.kind=files",
            f"data.source.path={tmp_path / 'w.jsonl'}",
        ],
    )
    with replayed(off, new_data=True) as same:
        assert same is off
    with replayed(p, new_data=True) as same:  # no champion in this store: nothing to replay
        assert same.data.source.path == str(tmp_path / "w.jsonl")


@pytest.fixture
def champion(state_dir, tmp_path):
    """A champion registered with a training run that logged its samples, as
    `flywheel.stages.train` leaves one: tiny GPT-2, real MLflow (SQLite) store."""
    import mlflow
    import pandas as pd
    from fixtures_models import fresh_model, save_model, split_paragraphs, train_tokenizer

    from flywheel import artifacts
    from flywheel.registry import Registry, lineage_tags
    from flywheel.tracking import experiment_id, log_dataset_samples, tracking_uri

    p = load_profile(None, ["eval.max_docs=30", "eval.bootstrap_samples=0"])
    train, test = split_paragraphs()
    tok = train_tokenizer(train)
    model_dir = save_model(fresh_model(tok), tok, tmp_path / "champ")
    ds = tmp_path / "ds"
    (ds / artifacts.TEXT_DIR).mkdir(parents=True)
    pd.DataFrame({"id": [f"r{i}" for i in range(300)], "text": train[:300]}).to_parquet(
        ds / artifacts.REFERENCE_TEXT
    )
    pd.DataFrame({"id": [f"t{i}" for i in range(40)], "text": test[:40]}).to_parquet(
        ds / artifacts.TEST_TEXT
    )
    client = mlflow.MlflowClient(tracking_uri(p))
    run = client.create_run(experiment_id(p))
    log_dataset_samples(p, run.info.run_id, ds)
    reg = Registry(p)
    v = reg.register_candidate(
        model_dir, tags=lineage_tags(training_run_id=run.info.run_id), model_card="# test"
    )
    reg.promote(v, reason="test", actor="test")
    return p, model_dir


def test_regression_set_is_the_champions_held_out_sample_scored_for_both(champion):
    from flywheel.forgetting import regression_reports

    p, model_dir = champion
    reports = regression_reports(p, model_dir)
    assert reports is not None
    ch, cp = reports
    assert ch.n_docs == cp.n_docs == 30  # eval.max_docs of the 40 held-out documents
    assert ch.docs.ids == cp.docs.ids and ch.docs.ids[0] == "t0"  # paired by document
    assert ch.data_hash == cp.data_hash and ch.data_hash.startswith("regression-")
    assert ch.bits_per_byte == pytest.approx(cp.bits_per_byte)  # the same model, twice


def test_replay_adds_the_share_of_champion_documents_to_new_data(champion, tmp_path):
    import json

    from flywheel.forgetting import REPLAY_FILE

    p, _ = champion
    window = tmp_path / "window.jsonl"
    window.write_text("".join(json.dumps({"text": f"new {i}"}) + "\n" for i in range(40)))
    data = p.model_dump()
    data["data"]["source"].update(kind="files", path=str(window))
    data["drift"]["replay_share"] = 0.2
    from flywheel.config import validate_profile

    newp = validate_profile(data, "test")
    with replayed(newp, new_data=True) as local:
        root = Path(local.data.source.path)
        assert (root / "window.jsonl").read_text() == window.read_text()
        replay = (root / REPLAY_FILE).read_text().splitlines()
        assert len(replay) == replay_count(40, 0.2) == 10
        assert all(json.loads(line)["text"] for line in replay)
    with replayed(newp, new_data=True) as local:
        again = (Path(local.data.source.path) / REPLAY_FILE).read_text().splitlines()
    assert again == replay  # seeded: the same documents every time
    assert not root.exists()  # the temporary corpus is removed
