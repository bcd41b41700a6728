"""Inputs the tasks must refuse or count: labels outside the label set, truncation, no answer left, no pad."""

import pytest

from loralab.config import ModelConfig, load_config
from loralab.data.records import read_records
from loralab.errors import LoralabError
from loralab.models import load_tokenizer
from loralab.tasks import classification, sft
from run_helpers import write_jsonl
from tiny_tokenizer import tiny_tokenizer


def config(**data):
    return load_config(None, ["model.path=m", "data.train=t.jsonl", *[f"data.{k}={v}" for k, v in data.items()]])


def test_label_outside_the_declared_label_set(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "good", "label": 1}, {"text": "odd", "label": 2}])
    with pytest.raises(LoralabError) as err:
        classification.prepare(config(labels="[0, 1]"), tiny_tokenizer(), read_records(path), [])
    assert (err.value.record, err.value.field) == (2, "label") and "'2' never occurs" in str(err.value)


def test_truncated_and_answerless_examples_are_counted(tmp_path):
    long_prompt = "the quick brown fox " * 30
    rows = [{"instruction": "hello", "output": "world"}, {"instruction": "hi", "output": "answer " * 40},
            {"instruction": long_prompt, "output": "lost"}]
    data = sft.prepare(config(max_length=40), tiny_tokenizer(), read_records(write_jsonl(tmp_path / "a.jsonl", rows)),
                       [])
    assert data.stats == {"truncated": 2, "without_trainable_tokens": 1}
    assert len(data.train) == 2  # the one whose answer was cut off entirely is left out


def test_tokenizer_without_pad_eos_or_unk_is_refused(tmp_path):
    tokenizer = tiny_tokenizer(pad=False)
    tokenizer.eos_token = None
    tokenizer.unk_token = None
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(LoralabError, match="no pad, eos or unk token"):
        load_tokenizer(ModelConfig(path=str(tmp_path)))
