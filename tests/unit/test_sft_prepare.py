"""prepare_sft: split samples on disk with their labels, every reject written with its reason."""

from __future__ import annotations

import json

import pytest
from fixtures_data import pydoc_texts, train_tokenizer

from flywheel import artifacts
from flywheel.config import DataConfig
from flywheel.errors import DataError
from flywheel.sft import demo
from flywheel.sft import records as R
from flywheel.sft.prepare import prepare_sft, read_samples
from flywheel.sft.render import IGNORE_INDEX


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(pydoc_texts(200), 512)


def test_demo_set_prepared_split_and_masked(tok, tmp_path):
    records = demo.instruction_records()
    bad = [
        {"prompt": "Q"},
        {"prompt": "Q", "response": " "},
        {"prompt": "long " * 400, "response": "x"},
    ]
    cfg = DataConfig(
        format="instruction", block_size=256, split={"validation_share": 0.1, "test_share": 0.1}
    )
    stats = prepare_sft(records + bad, cfg, tok, tmp_path)

    assert stats.records == len(records) + 3
    assert stats.rejects.get(R.MISSING_FIELD) == 1 and stats.rejects.get(R.EMPTY_RESPONSE) == 1
    assert stats.rejects.get(R.LONGER_THAN_CONTEXT, 0) >= 1
    rejects = [json.loads(line) for line in (tmp_path / artifacts.REJECTS).read_text().splitlines()]
    assert len(rejects) == sum(stats.rejects.values())
    assert {
        "id": str(len(records)),
        "source": "",
        "reason": R.MISSING_FIELD,
        "detail": "no 'response' field (data.columns.response)",
    } in rejects
    assert sum(stats.samples.values()) == stats.records - len(rejects)
    assert all(stats.samples[s] > 0 for s in artifacts.SPLITS)

    train = read_samples(tmp_path / "train")
    assert len(train) == stats.samples["train"]
    for s in train:
        assert len(s.labels) == len(s.input_ids) <= 256
        assert s.labels[0] == IGNORE_INDEX and s.response_tokens > 0
    assert 0 <= stats.padding_share < 1

    again = prepare_sft(records + bad, cfg, tok, tmp_path / "again")
    assert again == stats  # deterministic splits


def test_too_many_rejects_is_a_data_error_after_writing_them(tok, tmp_path):
    cfg = DataConfig(format="chat", max_reject_share=0.5)
    rows = [{"messages": [{"role": "user", "content": "Q"}]}] * 3 + [
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    ]
    with pytest.raises(DataError, match=r"3 of 4 records rejected .* mostly no_response \(3\)"):
        prepare_sft(rows, cfg, tok, tmp_path)
    assert len((tmp_path / artifacts.REJECTS).read_text().splitlines()) == 3
