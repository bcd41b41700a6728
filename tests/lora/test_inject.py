import copy
import logging

import peft
import pytest
import torch
from torch import nn

from loralab import (
    LoraConfig,
    LoralabError,
    LoraLinear,
    apply_lora,
    count_parameters,
    disable_adapters,
    merge_adapters,
    merge_and_unload,
    set_active_adapters,
    trainable_parameters_report,
    unmerge_adapters,
)
from loralab.lora.modules_to_save import ModulesToSave
from loralab.lora.targets import DEFAULT_TARGETS
from tiny_models import sample_inputs, tiny_model

ARCHS = [t for t in DEFAULT_TARGETS if t != "chatglm"]


def randomize_adapters(model, seed=1):
    """Give B (and saved copies) non-zero values so adapter effects are visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def wrapped_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]


@pytest.mark.parametrize("model_type", ARCHS)
def test_default_targets_exist_and_fresh_adapter_keeps_outputs(model_type):
    model = tiny_model(model_type)
    inputs = sample_inputs(model)
    before = logits(model, inputs)
    apply_lora(model, LoraConfig(r=4))
    names = wrapped_names(model)
    assert names, f"no module wrapped for {model_type}"
    assert {n.rsplit(".", 1)[-1] for n in names} == set(DEFAULT_TARGETS[model_type])
    assert torch.equal(logits(model, inputs), before)


class ChatGLMLike(nn.Module):
    """Enough of ChatGLM's layout (remote code, not in transformers) to check its default target."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"model_type": "chatglm"})()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"query_key_value": nn.Linear(8, 24), "dense": nn.Linear(8, 8)}) for _ in range(2))


def test_chatglm_default_is_query_key_value():
    model = apply_lora(ChatGLMLike(), LoraConfig(r=2))
    assert wrapped_names(model) == ["layers.0.query_key_value", "layers.1.query_key_value"]


def test_unknown_architecture_falls_back_to_attention_projections_and_says_so(caplog):
    model = tiny_model("llama")
    model.config.model_type = "brand-new-arch"
    with caplog.at_level(logging.WARNING, logger="loralab"):
        apply_lora(model, LoraConfig(r=2))
    assert "brand-new-arch" in caplog.text and "q_proj" in caplog.text
    assert {n.rsplit(".", 1)[-1] for n in wrapped_names(model)} == {"q_proj", "v_proj"}


def test_no_match_lists_the_linear_layers_that_exist():
    model = tiny_model("llama")
    with pytest.raises(LoralabError) as err:
        apply_lora(model, LoraConfig(target_modules=["query", "value"]))
    message = str(err.value)
    assert "matched no linear layer" in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in message
    assert message.count("q_proj") == 1  # deduplicated by suffix, not one per layer
    assert not wrapped_names(model)


@pytest.mark.parametrize("targets,named", [(["q_proj", "embed_tokens"], "Embedding"), (["q_proj", "qproj"], None)])
def test_a_listed_target_that_matches_nothing_is_refused_while_others_match(targets, named):
    model = tiny_model("llama")
    with pytest.raises(LoralabError) as err:
        apply_lora(model, LoraConfig(target_modules=targets))
    message = str(err.value)
    assert f"target_modules {targets[1]} matched no linear layer" in message and "q_proj" in message
    assert (named in message and "modules_to_save" in message) if named else "modules_to_save" not in message
    assert not wrapped_names(model)  # refused before anything was wrapped


def test_regex_suffix_and_layer_selection():
    model = apply_lora(tiny_model("llama"), LoraConfig(target_modules=r".*\.layers\.1\.self_attn\.(q|k)_proj"))
    assert wrapped_names(model) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    model = apply_lora(tiny_model("llama"), LoraConfig(target_modules=["o_proj", "down_proj"], layers_to_transform=[0]))
    assert wrapped_names(model) == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"]


def test_all_linear_skips_the_output_head():
    model = apply_lora(tiny_model("gpt2"), LoraConfig(target_modules="all-linear"))
    names = wrapped_names(model)
    assert len(names) == 8 and "lm_head" not in names
    model = apply_lora(tiny_model("bert"), LoraConfig(target_modules="all-linear", modules_to_save=["classifier"]))
    assert not any("classifier" in n for n in wrapped_names(model))


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_only_adapter_saved_modules_and_chosen_biases_train(bias):
    model = apply_lora(tiny_model("bert"), LoraConfig(r=4, modules_to_save=["classifier"], bias=bias))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(("lora_" in n) or ("modules_to_save" in n) or n.endswith("bias") for n in trainable)
    assert any("classifier.modules_to_save.default.weight" == n for n in trainable)
    assert not any("original_module" in n for n in trainable)
    biases = {n for n in trainable if n.endswith("bias") and "modules_to_save" not in n}
    if bias == "none":
        assert not biases
    elif bias == "lora_only":
        assert biases and all(n.endswith(("query.base_layer.bias", "value.base_layer.bias")) for n in biases)
    else:
        assert any("intermediate.dense.bias" in n for n in biases)


CASES = [
    ("llama", dict(r=4)),
    ("gpt2", dict(r=8, target_modules="all-linear")),
    ("bert", dict(r=16, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])),
    ("bert", dict(r=4, bias="all", modules_to_save=["classifier"])),
    ("bloom", dict(r=2, bias="lora_only")),
    ("t5", dict(r=4, target_modules=["q", "k", "v", "o"])),
    ("qwen2", dict(r=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
]


def to_peft_config(config: LoraConfig, targets):
    return peft.LoraConfig(r=config.r, lora_alpha=config.alpha, target_modules=targets,
                           modules_to_save=config.modules_to_save, bias=config.bias,
                           layers_to_transform=config.layers_to_transform)


@pytest.mark.parametrize("model_type,kwargs", CASES)
def test_trainable_parameter_report_equals_peft(model_type, kwargs):
    config = LoraConfig(**kwargs)
    ours = apply_lora(tiny_model(model_type), config)
    targets = config.target_modules or DEFAULT_TARGETS[model_type]
    theirs = peft.get_peft_model(tiny_model(model_type), to_peft_config(config, targets))
    assert count_parameters(ours) == tuple(theirs.get_nb_trainable_parameters())
    report = trainable_parameters_report(ours)
    trainable, total = theirs.get_nb_trainable_parameters()
    assert report == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                      f"trainable%: {100 * trainable / total:.4f}")


def test_disable_adapters_gives_base_outputs_and_restores_after():
    model = tiny_model("bert")
    inputs = sample_inputs(model)
    base = logits(model, inputs)
    apply_lora(model, LoraConfig(r=4, modules_to_save=["classifier"]))
    randomize_adapters(model)
    adapted = logits(model, inputs)
    assert not torch.allclose(adapted, base)
    with disable_adapters(model):
        assert torch.equal(logits(model, inputs), base)
    assert torch.equal(logits(model, inputs), adapted)


def test_named_adapters_switch_and_combine():
    model = tiny_model("llama")
    inputs = sample_inputs(model)
    apply_lora(model, LoraConfig(r=4), "one")
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "two")
    randomize_adapters(model)
    one = logits(model, inputs)  # "one" is active until told otherwise
    set_active_adapters(model, "two")
    two = logits(model, inputs)
    assert not torch.allclose(one, two)
    set_active_adapters(model, "one")
    assert torch.equal(logits(model, inputs), one)
    with pytest.raises(LoralabError, match="unknown adapter 'three'"):
        set_active_adapters(model, "three")
    with pytest.raises(LoralabError, match="already has an adapter named 'one'"):
        apply_lora(model, LoraConfig(), "one")


def test_merge_unmerge_and_unload_keep_outputs():
    model = tiny_model("qwen2")
    inputs = sample_inputs(model)
    apply_lora(model, LoraConfig(r=8, target_modules="all-linear"))
    randomize_adapters(model)
    reference = logits(model, inputs)
    originals = {n: m.base_layer.weight.clone() for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    merge_adapters(model)
    assert (logits(model, inputs) - reference).abs().max() <= 1e-5
    unmerge_adapters(model)
    for name, weight in originals.items():
        assert (model.get_submodule(name).base_layer.weight - weight).abs().max() <= 1e-6
    plain = merge_and_unload(copy.deepcopy(model))
    assert not any(isinstance(m, (LoraLinear, ModulesToSave)) for m in plain.modules())
    assert (logits(plain, inputs) - reference).abs().max() <= 1e-5


def test_a_few_training_steps_change_only_the_adapter_and_lower_the_loss():
    # a wide init: with the default 0.02 the frozen random head bounds the logits and no adapter can fit anything
    model = tiny_model("llama", initializer_range=0.5).train()
    apply_lora(model, LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = sample_inputs(model, batch=4, length=12)
    losses = []
    for _ in range(30):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5  # memorises the batch
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_modules_to_save_not_found_is_a_clear_error():
    with pytest.raises(LoralabError, match=r"modules_to_save \['head'\] not found"):
        apply_lora(tiny_model("bert"), LoraConfig(modules_to_save=["head"]))


@pytest.mark.parametrize("kwargs,field", [
    (dict(r=0), "lora.r"), (dict(alpha=0), "lora.alpha"), (dict(dropout=1.0), "lora.dropout"),
    (dict(bias="some"), "lora.bias"), (dict(target_modules=[]), "lora.target_modules"),
])
def test_impossible_config_values_are_refused(kwargs, field):
    with pytest.raises(LoralabError) as err:
        LoraConfig(**kwargs)
    assert err.value.field == field and err.value.fix


def test_delete_adapter_leaves_the_model_as_if_it_was_never_added():
    from loralab import delete_adapter
    from loralab.lora.inject import lora_layers

    model = tiny_model("bert").eval()
    inputs = sample_inputs(model)
    apply_lora(model, LoraConfig(r=4, modules_to_save=["classifier"]), "keep")
    apply_lora(model, LoraConfig(r=2, modules_to_save=["classifier"]), "gone")
    randomize_adapters(model)
    set_active_adapters(model, "keep")
    kept = logits(model, inputs)
    set_active_adapters(model, "gone")
    assert not torch.equal(logits(model, inputs), kept)
    delete_adapter(model, "gone")
    set_active_adapters(model, "keep")
    assert torch.equal(logits(model, inputs), kept)
    assert "gone" not in model.lora_configs and all("gone" not in m.lora_A for _, m in lora_layers(model))
    with pytest.raises(LoralabError, match="did you mean 'keep'"):
        delete_adapter(model, "kep")
