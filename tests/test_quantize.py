"""QLoRA and 8-bit bases: bitsandbytes' 4- and 8-bit layers under loralab's LoRA, against PEFT, merged, planned."""

import importlib.metadata
import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from loralab import quantize
from loralab.cli import USER_ERROR, main
from loralab.config import load_config
from loralab.errors import LoralabError
from loralab.estimate import estimate_memory
from loralab.infer.load import load_for_inference
from loralab.infer.merge import load_merged
from loralab.lora.layer import LoraLinear
from loralab.models import kept_in_floats
from run_helpers import SENTIMENT, write_config, write_jsonl

pytest.importorskip("bitsandbytes")

QA = [{"instruction": "What is the capital of France?", "input": "", "output": "Paris is the capital."},
      {"instruction": "Give three tips", "input": "for staying healthy", "output": "Eat well, sleep enough."}]
IDS = torch.tensor([[5, 17, 42, 9, 77, 3, 120, 64], [8, 8, 300, 21, 2, 19, 54, 6]])


def quantized_base(path, kind: str, task_class=AutoModelForCausalLM, **kwargs):
    """The base as the field loads it for QLoRA: transformers + BitsAndBytesConfig, on the CPU, in fp32."""
    kw, _ = quantize.loading_kwargs(kind, task_class.from_pretrained(path).config, torch.float32, "cpu",
                                    kept_in_floats())
    model = task_class.from_pretrained(path, dtype=torch.float32, **kw, **kwargs)
    quantize.check_quantized(model, kind, str(path))
    return model.eval()


def sft_config(tmp_path, model_dirs, name, kind, **train):
    data = write_jsonl(tmp_path / "qa.jsonl", QA * 4)
    return write_config(tmp_path / f"{name}.yaml", name=name, output_dir=str(tmp_path / "runs"), task="sft",
                        model={"path": str(model_dirs["llama"]), "quantize": kind},
                        lora={"r": 8, "alpha": 16, "target_modules": "all-linear"},
                        data={"train": str(data), "validation": str(data), "max_length": 64},
                        train={"epochs": 20, "batch_size": 4, "lr": 2e-2, "schedule": "constant", **train})


@pytest.fixture(scope="module")
def qlora(tmp_path_factory, model_dirs):
    """An nf4 QLoRA adapter and an int8 one, trained on the tiny llama (checkpointed: every layer recomputes)."""
    root = tmp_path_factory.mktemp("qlora")
    adapters = {}
    for kind in ("nf4", "int8"):
        assert main(["train", str(sft_config(root, model_dirs, kind, kind, gradient_checkpointing=True))]) == 0
        adapters[kind] = root / "runs" / kind
    return adapters


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_quantised_base_trains_lora_and_says_how_it_was_stored(qlora, kind):
    report = json.loads((qlora[kind] / "report.json").read_text())
    evals = report["evaluations"]
    assert evals[-1]["metrics"]["loss"] < 0.3 * evals[0]["metrics"]["loss"]
    described = "nf4 (double-quantised)" if kind == "nf4" else "int8"
    assert report["base_quantization"].startswith(described)
    assert f"frozen base quantised: {described}" in (qlora[kind] / "report.md").read_text()
    assert json.loads((qlora[kind] / "adapter/loralab.json").read_text())["quantize"] == kind
    # A and B train in fp32 and are saved in PEFT's names, as on a float base
    weights = load_file(qlora[kind] / "adapter/adapter_model.safetensors")
    assert weights and all(v.dtype == torch.float32 and ".lora_" in k for k, v in weights.items())


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_peft_on_the_same_quantised_base_gives_loralabs_logits(qlora, model_dirs, kind):
    loaded = load_for_inference(str(model_dirs["llama"]), {"default": str(qlora[kind] / "adapter")}, device="cpu")
    assert any(isinstance(m, LoraLinear) and quantize.is_quantized_linear(m.base_layer)
               for m in loaded.model.modules())  # loaded quantised, as it trained, from loralab.json
    with torch.no_grad():
        ours = loaded.model(IDS).logits
        theirs = PeftModel.from_pretrained(quantized_base(model_dirs["llama"], kind),
                                           str(qlora[kind] / "adapter"))(IDS).logits
        base = quantized_base(model_dirs["llama"], kind)(IDS).logits
    assert (ours - base).abs().max() > 1e-2  # the adapter changes the answer
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_a_peft_qlora_adapter_loads_in_loralab(tmp_path, model_dirs):
    peft_model = get_peft_model(quantized_base(model_dirs["llama"], "nf4"),
                                PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                               init_lora_weights=False))  # B random: a non-zero update
    peft_model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        theirs = peft_model(IDS).logits
        loaded = load_for_inference(str(model_dirs["llama"]), {"default": str(tmp_path / "peft")}, device="cpu",
                                    quantize="nf4")
        ours = loaded.model(IDS).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_folds_the_adapter_into_the_dequantised_weights(qlora, model_dirs, kind):
    """The merged float model computes what the unmerged quantised one did: the logits within 1e-4 for 4 bits; for
    int8 within 5% of their mean size on average, the rounding LLM.int8() applies to activations (through fp16 and
    int8 rows), which a float model does not repeat."""
    adapter = str(qlora[kind] / "adapter")
    unmerged = load_for_inference(str(model_dirs["llama"]), {"default": adapter}, device="cpu")
    merged = load_merged(str(model_dirs["llama"]), adapter)
    assert "dequantised weights" in merged.merged_into and kind in merged.merged_into
    assert not quantize.quantized_layer_names(merged.model) and not any(
        isinstance(m, LoraLinear) for m in merged.model.modules())
    with torch.no_grad():
        reference = unmerged.model(IDS).logits
        difference = (merged.model(IDS).logits - reference).abs()
        if kind == "nf4":
            assert difference.max() < 1e-4
        else:
            assert difference.mean() < 0.05 * reference.abs().mean()
        # W = dequant(Wq) + scaling·B·A exactly, and not the float checkpoint's W + scaling·B·A
        layer = unmerged.model.model.layers[0].self_attn.q_proj
        expected = quantize.dequantized_weight(layer.base_layer) + layer.delta_weight("default")
        merged_weight = merged.model.model.layers[0].self_attn.q_proj.weight
        torch.testing.assert_close(merged_weight, expected, atol=1e-6, rtol=0)
        float_weight = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).model.layers[0].self_attn.q_proj.weight
        assert (merged_weight - (float_weight + layer.delta_weight("default"))).abs().max() > 1e-3


def test_loralab_merge_says_which_base_it_merged_into(qlora, model_dirs, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(model_dirs["llama"]), "--adapter", str(qlora["nf4"] / "adapter"),
                 "--out", str(out)]) == 0
    assert "merged into the dequantised weights of" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # a plain float model, loadable anywhere
    AutoModelForCausalLM.from_pretrained(out)


def test_a_classifier_on_a_4bit_encoder_trains_its_head_in_floats(tmp_path, model_dirs):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": lab} for t, lab in SENTIMENT * 4])
    config = write_config(tmp_path / "cls.yaml", name="cls", output_dir=str(tmp_path / "runs"), task="classification",
                          model={"path": str(model_dirs["bert"]), "quantize": "fp4"}, lora={"r": 4, "alpha": 8},
                          data={"train": str(data), "validation": str(data), "max_length": 16},
                          train={"epochs": 8, "batch_size": 8, "lr": 1e-2})
    assert main(["train", str(config)]) == 0
    report = json.loads((tmp_path / "runs/cls/report.json").read_text())
    assert report["fresh_modules"] == ["classifier"] and report["base_quantization"].startswith("fp4")
    assert report["evaluations"][-1]["metrics"]["accuracy"] == 1.0
    # inference keeps the head in floats too, so the saved head fits it
    loaded = load_for_inference(str(model_dirs["bert"]), {"default": str(tmp_path / "runs/cls/adapter")},
                                device="cpu")
    assert type(loaded.model.classifier.original_module) is nn.Linear


def test_a_checkpoint_saved_quantised_loads_as_it_is(tmp_path, model_dirs):
    quantized_base(model_dirs["llama"], "nf4").save_pretrained(tmp_path / "llama-bnb-4bit")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "llama-bnb-4bit" / name).write_bytes((model_dirs["llama"] / name).read_bytes())
    data = write_jsonl(tmp_path / "qa.jsonl", QA * 2)
    config = write_config(tmp_path / "pre.yaml", name="pre", output_dir=str(tmp_path / "runs"), task="sft",
                          model={"path": str(tmp_path / "llama-bnb-4bit")}, lora={"r": 4},
                          data={"train": str(data), "max_length": 64}, train={"max_steps": 2, "batch_size": 2})
    assert main(["train", str(config)]) == 0
    assert json.loads((tmp_path / "runs/pre/report.json").read_text())["base_quantization"].startswith("nf4")
    # a quantisation other than the checkpoint's, and full fine-tuning of integers, are refused
    assert main(["train", str(config), "model.quantize=int8"]) == USER_ERROR
    assert main(["train", str(config), "method=full", "train.overwrite=true"]) == USER_ERROR


def test_the_planner_counts_weights_as_bitsandbytes_stores_them(model_dirs):
    """The planned frozen bytes equal those of the model bitsandbytes builds: packed nibbles, uint8 absmax and its
    fp32 scales (nf4, double-quantised), or int8 rows and their scales."""
    for kind in ("nf4", "int8"):
        model = quantized_base(model_dirs["llama"], kind)
        stored = sum(p.numel() * p.element_size() for p in model.parameters())
        for name in quantize.quantized_layer_names(model):
            weight = model.get_submodule(name).weight
            state = getattr(weight, "quant_state", None)
            if state is not None:
                stored += sum(t.numel() * t.element_size() for t in state.as_dict(packed=False).values()
                              if torch.is_tensor(t))
            else:
                scales = model.get_submodule(name).state.SCB if weight.SCB is None else weight.SCB
                stored += scales.numel() * scales.element_size()
        config = load_config(None, base={"task": "sft", "model": {"path": str(model_dirs["llama"]), "dtype": "fp32",
                                                                  "quantize": kind},
                                         "data": {"train": "unused.json", "max_length": 16},
                                         "train": {"device": "cpu"}})
        (planned,) = estimate_memory(config, [1])
        assert planned.base_weights == stored, kind


def test_the_estimate_command_shows_the_quantised_bases_side_by_side(model_dirs, capsys):
    assert main(["estimate", "--model", str(model_dirs["llama"]), "--compare-bases", "--budget", "1GiB"]) == 0
    out = capsys.readouterr().out
    for kind in ("fp32", "bf16", "int8", "nf4"):
        assert kind in out


def test_bad_quantisation_settings_are_refused_with_the_fix(tmp_path, model_dirs, monkeypatch):
    config = sft_config(tmp_path, model_dirs, "bad", "nf4")
    with pytest.raises(LoralabError, match="fine-tuned in full"):
        load_config(config, ["method=full"])
    with pytest.raises(LoralabError, match="FSDP"):
        load_config(config, ["distributed=fsdp"])

    real_version = importlib.metadata.version

    def version(name, answer):
        if name != "bitsandbytes":
            return real_version(name)
        if answer is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return answer

    for answer, message in ((None, "not installed"), ("0.44.1", "too old")):
        monkeypatch.setattr(importlib.metadata, "version", lambda name, a=answer: version(name, a))
        with pytest.raises(LoralabError, match=message) as error:
            quantize.require_bitsandbytes("cpu")
        assert "pip install" in error.value.fix
    monkeypatch.setattr(importlib.metadata, "version", real_version)

    with pytest.raises(LoralabError, match="no linear layer"):
        quantize.check_quantized(nn.Sequential(nn.Embedding(10, 4)), "nf4", "model")
    monkeypatch.setattr(quantize, "cpu_computes_fp16", lambda: False)
    with pytest.raises(LoralabError, match="fp16"):
        quantize.check_compute_dtype(torch.float16, torch.device("cpu"))


def test_a_fresh_module_that_would_be_quantised_is_named(model_dirs):
    model = AutoModelForSequenceClassification.from_pretrained(model_dirs["bert"], num_labels=2)
    # what bitsandbytes would do without loralab's list of modules kept in floats
    kw, _ = quantize.loading_kwargs("nf4", model.config, torch.float32, "cpu", [])
    quantized = AutoModelForSequenceClassification.from_pretrained(model_dirs["bert"], num_labels=2, **kw)
    with pytest.raises(LoralabError, match="modules_to_save"):
        quantize.check_quantized(quantized, "nf4", "bert", fresh=["classifier"])
