import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_inject import logits, randomize_adapters

from loralab import LoraConfig, LoralabError, apply_lora, load_adapter, save_adapter, set_active_adapters
from loralab.lora.io import CONFIG_NAME, WEIGHTS_NAME
from tiny_models import sample_inputs, tiny_model

INTEROP = [
    ("llama", dict(r=4, alpha=8)),
    ("qwen2", dict(r=8, alpha=32, dropout=0.1, target_modules="all-linear")),
    ("gpt2", dict(r=4, target_modules=["c_attn", "c_proj"])),
    ("bert", dict(r=8, modules_to_save=["classifier"])),
    ("bloom", dict(r=4, bias="lora_only", use_rslora=True)),
    ("t5", dict(r=4, target_modules=["q", "k", "v", "o", "wi", "wo"], layers_to_transform=[1])),
    ("roberta", dict(r=4, bias="all", modules_to_save=["classifier"], init="gaussian")),
    ("llama", dict(r=4, target_modules=r".*\.(q|v)_proj", rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})),
]


def trained_loralab_model(model_type, kwargs):
    model = apply_lora(tiny_model(model_type), LoraConfig(**kwargs))
    randomize_adapters(model)
    return model.eval()


@pytest.mark.parametrize("model_type,kwargs", INTEROP)
def test_loralab_adapter_loads_in_peft_with_same_logits(tmp_path, model_type, kwargs):
    ours = trained_loralab_model(model_type, kwargs)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_model(model_type), tmp_path).eval()
    inputs = sample_inputs(ours)
    expected = logits(ours, inputs)
    assert not torch.allclose(expected, logits(tiny_model(model_type), inputs))  # the adapter does something
    assert (logits(theirs, inputs) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("model_type,kwargs", INTEROP)
def test_peft_adapter_loads_in_loralab_with_same_logits(tmp_path, model_type, kwargs):
    config = dict(r=kwargs["r"], lora_alpha=kwargs.get("alpha", 8), lora_dropout=kwargs.get("dropout", 0.0),
                  target_modules=kwargs.get("target_modules"), bias=kwargs.get("bias", "none"),
                  modules_to_save=kwargs.get("modules_to_save"), use_rslora=kwargs.get("use_rslora", False),
                  layers_to_transform=kwargs.get("layers_to_transform"),
                  rank_pattern=kwargs.get("rank_pattern", {}), alpha_pattern=kwargs.get("alpha_pattern", {}))
    if config["target_modules"] is None:
        config.pop("target_modules")  # PEFT's own default for the architecture
    if config.get("target_modules") == "all-linear" or model_type in ("bert", "roberta"):
        config["task_type"] = "CAUSAL_LM" if model_type == "qwen2" else "SEQ_CLS"
    theirs = peft.get_peft_model(tiny_model(model_type), peft.LoraConfig(**config))
    randomize_adapters(theirs)
    theirs.eval().save_pretrained(tmp_path)
    ours = load_adapter(tiny_model(model_type), tmp_path)
    inputs = sample_inputs(ours)
    assert (logits(ours, inputs) - logits(theirs, inputs)).abs().max() <= 1e-5
    assert not any(p.requires_grad for p in ours.parameters())  # loaded for inference by default


def test_reload_in_loralab_and_keep_training(tmp_path):
    ours = trained_loralab_model("bert", dict(r=4, modules_to_save=["classifier"]))
    save_adapter(ours, tmp_path / "adapter")
    again = load_adapter(tiny_model("bert"), tmp_path / "adapter", trainable=True)
    inputs = sample_inputs(ours)
    assert torch.equal(logits(again, inputs), logits(ours, inputs))
    trainable = sorted(n for n, p in again.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n, p in ours.named_parameters() if p.requires_grad)


def test_several_named_adapters_on_one_base(tmp_path):
    first = trained_loralab_model("llama", dict(r=4))
    second = apply_lora(tiny_model("llama"), LoraConfig(r=2, target_modules=["o_proj"]))
    randomize_adapters(second, seed=7)
    save_adapter(first, tmp_path / "a")
    save_adapter(second, tmp_path / "b")
    both = load_adapter(tiny_model("llama"), tmp_path / "a", adapter_name="first")
    load_adapter(both, tmp_path / "b", adapter_name="second")
    inputs = sample_inputs(both)
    set_active_adapters(both, "first")
    assert torch.equal(logits(both, inputs), logits(first, inputs))
    set_active_adapters(both, "second")
    assert torch.equal(logits(both, inputs), logits(second, inputs))
    save_adapter(both, tmp_path / "again", adapter_name="second")
    saved = load_file(tmp_path / "again" / WEIGHTS_NAME)
    assert set(saved) == set(load_file(tmp_path / "b" / WEIGHTS_NAME))


def test_classification_adapters_with_own_heads_and_label_counts_on_one_base(tmp_path):
    three = trained_loralab_model("bert", dict(r=4, modules_to_save=["classifier"]))
    five = tiny_model("bert")  # the same base weights; a 5-class head
    five.classifier = torch.nn.Linear(five.config.hidden_size, 5)
    five.config.num_labels = five.num_labels = 5
    apply_lora(five, LoraConfig(r=2, modules_to_save=["classifier"]))
    randomize_adapters(five, seed=3)
    save_adapter(three, tmp_path / "three")
    save_adapter(five.eval(), tmp_path / "five")
    both = load_adapter(tiny_model("bert"), tmp_path / "three", adapter_name="three")
    load_adapter(both, tmp_path / "five", adapter_name="five")
    inputs = sample_inputs(both)
    for name, alone in (("five", five), ("three", three), ("five", five)):
        set_active_adapters(both, name)
        assert torch.equal(logits(both, inputs), logits(alone, inputs))
    with pytest.raises(LoralabError, match="wrong shape"):  # other widths than the label count stay refused
        wide = tiny_model("bert", hidden_size=48, intermediate_size=64)
        load_adapter(wide, tmp_path / "five")


def test_saved_files_are_what_peft_writes(tmp_path):
    save_adapter(trained_loralab_model("bert", dict(r=4, modules_to_save=["classifier"])), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["r"] == 4 and config["lora_alpha"] == 16 and config["target_modules"] == ["query", "value"]
    keys = set(load_file(tmp_path / WEIGHTS_NAME))
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert "base_model.model.classifier.weight" in keys
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


# ---- bad adapters: refused before the model is touched, with what differs ----

def saved(tmp_path, model_type="llama", **kwargs):
    save_adapter(trained_loralab_model(model_type, kwargs or dict(r=4)), tmp_path)
    return tmp_path


def assert_refused_untouched(model_type, path, *fragments):
    model = tiny_model(model_type)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoralabError) as err:
        load_adapter(model, path)
    for fragment in fragments:
        assert fragment in str(err.value)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    return err.value


def test_corrupt_weights_file(tmp_path):
    path = saved(tmp_path)
    data = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    error = assert_refused_untouched("llama", path, "corrupt or truncated", WEIGHTS_NAME)
    assert error.fix


def test_invalid_json_names_the_file_and_line(tmp_path):
    path = saved(tmp_path)
    (path / CONFIG_NAME).write_text('{\n  "r": 4,\n  "lora_alpha": ,\n}')
    error = assert_refused_untouched("llama", path, CONFIG_NAME, "not valid JSON")
    assert error.record == 3


def test_missing_keys_are_listed(tmp_path):
    path = saved(tmp_path)
    tensors = load_file(path / WEIGHTS_NAME)
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del tensors[dropped]
    save_file(tensors, path / WEIGHTS_NAME)
    assert_refused_untouched("llama", path, "1 missing", "model.layers.1.self_attn.v_proj.lora_B.weight")


def test_wrong_shapes_are_listed(tmp_path):
    path = saved(tmp_path)
    config = json.loads((path / CONFIG_NAME).read_text())
    config["r"] = 6
    (path / CONFIG_NAME).write_text(json.dumps(config))
    assert_refused_untouched("llama", path, "wrong shape", "file (4, 32) vs model (6, 32)")


def test_adapter_for_another_architecture(tmp_path):
    path = saved(tmp_path, "gpt2", r=4)
    assert_refused_untouched("llama", path, "trained on a 'gpt2' model", "'llama'")
    # the same adapter without loralab's metadata (as from PEFT) is still refused, by its module names
    save_file(load_file(path / WEIGHTS_NAME), path / WEIGHTS_NAME, metadata={"format": "pt"})
    assert_refused_untouched("llama", path, "does not fit this model", "c_attn")


def test_adapter_for_a_bigger_model_of_the_same_architecture(tmp_path):
    save_adapter(apply_lora(tiny_model("llama", hidden_size=64), LoraConfig(r=4)), tmp_path)
    assert_refused_untouched("llama", tmp_path, "wrong shape")


def test_pickle_adapter_is_refused(tmp_path):
    path = saved(tmp_path)
    (path / WEIGHTS_NAME).unlink()
    torch.save({"x": torch.zeros(1)}, path / "adapter_model.bin")
    assert_refused_untouched("llama", path, "pickle", "adapter_model.bin")


def test_unsupported_peft_features_are_refused(tmp_path):
    path = saved(tmp_path)
    config = json.loads((path / CONFIG_NAME).read_text())
    (path / CONFIG_NAME).write_text(json.dumps({**config, "use_dora": True}))
    assert_refused_untouched("llama", path, "use_dora")
    (path / CONFIG_NAME).write_text(json.dumps({**config, "peft_type": "IA3"}))
    assert_refused_untouched("llama", path, "IA3")


def test_missing_folder_and_bad_values(tmp_path):
    assert_refused_untouched("llama", tmp_path / "nowhere", CONFIG_NAME)
    path = saved(tmp_path)
    config = json.loads((path / CONFIG_NAME).read_text())
    (path / CONFIG_NAME).write_text(json.dumps({**config, "r": 0}))
    error = assert_refused_untouched("llama", path, "r must be a positive integer")
    assert error.file.endswith(CONFIG_NAME)


def test_saving_over_an_adapter_replaces_it_whole(tmp_path):
    saved(tmp_path, "llama", r=4)
    saved(tmp_path, "llama", r=2)
    model = load_adapter(tiny_model("llama"), tmp_path)
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape[0] == 2


def test_disk_full_while_saving_an_adapter_keeps_the_previous_one(tmp_path, monkeypatch):
    import errno

    import loralab.lora.io as io

    saved(tmp_path, "llama", r=4)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "save_file", full)
    with pytest.raises(LoralabError, match="No space left on device"):
        save_adapter(trained_loralab_model("llama", dict(r=2)), tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporary file left


def test_an_adapter_with_nan_weights_is_refused_naming_the_tensor(tmp_path):
    model = apply_lora(tiny_model("bert"), LoraConfig(r=4, target_modules=["query", "value"]))
    save_adapter(model, tmp_path)
    weights = load_file(tmp_path / WEIGHTS_NAME)
    key = sorted(weights)[0]
    weights[key][0, 0] = float("nan")
    save_file(weights, tmp_path / WEIGHTS_NAME)
    with pytest.raises(LoralabError, match="1 of .* values are NaN or infinite") as error:
        load_adapter(tiny_model("bert"), tmp_path)
    assert error.value.field == key and "earlier checkpoint" in error.value.fix
