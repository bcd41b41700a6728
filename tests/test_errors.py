"""Every place a user picks a name by typing it answers a typo with the closest valid name."""

import pytest

from loralab import LoraConfig, apply_lora, set_active_adapters
from loralab.cli import parse_combination
from loralab.data.formats import to_conversation
from loralab.data.records import read_records
from loralab.data.templates import resolve_template
from loralab.errors import LoralabError, did_you_mean
from loralab.lora.combine import add_weighted_adapter
from loralab.tasks import get_task
from tiny_models import tiny_model


def test_did_you_mean_offers_the_closest_name_or_lists_them_all():
    assert did_you_mean("topci", ["sentiment", "topic"]) == "did you mean 'topic'?"
    assert did_you_mean("zzz", ["sentiment", "topic"]) == "use one of sentiment, topic"
    assert did_you_mean("x", []) == "there is nothing to choose from"


def fix_of(fn, *args):
    with pytest.raises(LoralabError) as err:
        fn(*args)
    return err.value.fix


def test_adapter_task_template_and_role_names(tmp_path):
    model = tiny_model("llama")
    apply_lora(model, LoraConfig(r=2), "sql")
    apply_lora(model, LoraConfig(r=2), "chat")
    assert fix_of(set_active_adapters, model, "chta") == "did you mean 'chat'?"
    assert fix_of(add_weighted_adapter, model, ["sqll", "chat"], [0.5, 0.5], "mix") == "did you mean 'sql'?"
    assert fix_of(add_weighted_adapter, model, ["sql", "chat"], [0.5, 0.5], "mix", "lineer") == \
        "did you mean 'linear'?"
    assert fix_of(parse_combination, "sql=0.5,caht=0.5", ["sql", "chat"]) == "did you mean 'chat'?"
    assert fix_of(get_task, "clasification") == "did you mean 'classification'?"
    assert fix_of(resolve_template, None, "alpacca").startswith("did you mean 'alpaca'?")
    data = tmp_path / "m.jsonl"
    data.write_text('{"messages": [{"role": "asistant", "content": "hi"}]}\n')
    assert fix_of(to_conversation, read_records(data)[0], "messages") == "did you mean 'assistant'?"


def test_column_names(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"sentence": "good", "labels": "pos"}\n')
    # a mapped column the file does not have
    with pytest.raises(LoralabError) as err:
        read_records(data, {"text": "sentense"})
    assert (err.value.field, err.value.fix) == ("data.columns.text", "did you mean 'sentence'?")
    # a field the task needs, close to one the record has
    record = read_records(data, {"text": "sentence"})[0]
    assert record.get("text") == "good"
    with pytest.raises(LoralabError) as err:
        record.get("label")
    assert err.value.fix.startswith("map your column to it with data.columns.label=labels")
