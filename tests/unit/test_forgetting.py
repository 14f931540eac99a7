"""Replay and the regression set: the pure parts and the no-op paths (the lineage parts
run in tests/integration/test_monitor_local.py, on a real champion)."""

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
