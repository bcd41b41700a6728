"""sft's validation loss: the model's own loss over every answer token, however the examples are batched, without
full-vocabulary logits where the chunked loss applies."""

from types import SimpleNamespace

import pytest
import torch

import loralab.fast.lm_loss as lm_loss
from loralab.config import load_config
from loralab.tasks import TaskData, sft
from tiny_models import tiny_model


def validation_examples(n=5, vocab=128):
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        ids = torch.randint(3, vocab, (5 + 4 * i,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (2 + i % 3) + ids[2 + i % 3:]})
    return out


@pytest.mark.parametrize("model_type", ["llama", "opt"])  # the chunked loss; the model's own
def test_validation_loss_is_the_models_own_padded_or_padding_free(model_type, monkeypatch):
    model = tiny_model(model_type, head="causal").eval()
    examples = validation_examples()
    expected_sum, expected_count = 0.0, 0
    with torch.no_grad():
        for e in examples:  # each example alone: no padding, no other example in the row
            n = sum(label != -100 for label in e["labels"][1:])
            expected_sum += model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])
                                  ).loss.item() * n
            expected_count += n
    full_logits = []
    real_forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: full_logits.append(1) or real_forward(*a, **k))
    base = {"task": "sft", "model": {"path": "m"}, "data": {"train": "t.json"}, "train": {"eval_batch_size": 3}}
    ways = [False] + ([True] if model_type == "llama" else [])  # OPT keeps learned positions: never packed
    for padding_free in ways:
        config = load_config(None, [f"data.padding_free={str(padding_free).lower()}"], base=base)
        loss = sft.evaluate(model, SimpleNamespace(pad_token_id=0), TaskData([], examples), config, "cpu",
                            torch.autocast("cpu", enabled=False))["loss"]
        assert loss == pytest.approx(expected_sum / expected_count, abs=1e-5), padding_free
    # the chunked loss runs the decoder alone: the model's forward (and its logits) never runs
    assert bool(full_logits) == (not lm_loss.supports_chunked_loss(model))
