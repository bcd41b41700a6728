import peft
import pytest
import torch
from test_inject import logits, randomize_adapters

from loralab import LoraConfig, LoralabError, load_adapter, save_adapter
from loralab.lora.combine import add_weighted_adapter
from tiny_models import sample_inputs, tiny_model


@pytest.fixture
def two_peft_adapters(tmp_path):
    for name, seed, r in (("one", 1, 4), ("two", 2, 4)):
        model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=r, lora_alpha=2 * r + seed,
                                                                          target_modules=["q_proj", "v_proj"]))
        randomize_adapters(model, seed=seed)
        model.save_pretrained(tmp_path / name)
    return tmp_path


@pytest.mark.parametrize("combination", ["linear", "cat"])
def test_weighted_combination_equals_peft(two_peft_adapters, combination, tmp_path):
    weights = [0.7, 0.3]
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), two_peft_adapters / "one", adapter_name="one")
    theirs.load_adapter(two_peft_adapters / "two", adapter_name="two")
    theirs.add_weighted_adapter(["one", "two"], weights, "mix", combination_type=combination)
    theirs.set_adapter("mix")
    ours = load_adapter(tiny_model("llama"), two_peft_adapters / "one", "one")
    load_adapter(ours, two_peft_adapters / "two", "two")
    add_weighted_adapter(ours, ["one", "two"], weights, "mix", combination)
    inputs = sample_inputs(ours)
    assert (logits(ours, inputs) - logits(theirs, inputs)).abs().max() <= 1e-5
    save_adapter(ours, tmp_path / "mix", adapter_name="mix")  # and it saves like any adapter
    reloaded = load_adapter(tiny_model("llama"), tmp_path / "mix")
    assert (logits(reloaded, inputs) - logits(ours, inputs)).abs().max() <= 1e-6


def test_linear_needs_equal_ranks_and_known_names(two_peft_adapters):
    model = load_adapter(tiny_model("llama"), two_peft_adapters / "one", "one")
    from loralab import apply_lora

    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "small")
    with pytest.raises(LoralabError, match="equal ranks"):
        add_weighted_adapter(model, ["one", "small"], [0.5, 0.5], "mix")
    with pytest.raises(LoralabError, match="unknown adapter 'nope'"):
        add_weighted_adapter(model, ["one", "nope"], [0.5, 0.5], "mix")
    assert torch.is_tensor(model.model.layers[0].self_attn.q_proj.lora_A["one"].weight)
