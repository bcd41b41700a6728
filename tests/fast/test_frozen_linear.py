"""Frozen linear layers through oneDNN on the CPU: torch's results and gradients, and only where nothing else
changes."""

import pytest
import torch

import loralab.fast.frozen_linear as frozen
from loralab.data.collate import pad_batch
from loralab.fast.frozen_linear import frozen_linear, use_onednn_for_frozen_linears
from loralab.fast.lm_loss import causal_lm_loss
from loralab.lora import LoraConfig, apply_lora
from tiny_models import tiny_model

pytestmark = pytest.mark.skipif(frozen.onednn_linear() is None,
                                reason="frozen products go through oneDNN on AMD CPUs only")


@pytest.fixture
def onednn_calls(monkeypatch):
    calls = []
    real = frozen.onednn_linear()
    monkeypatch.setattr(frozen, "onednn_linear", lambda: lambda *args: calls.append(args[0].shape) or real(*args))
    return calls


def test_the_operator_passes_torchs_custom_op_checks():
    x = torch.randn(3, 5, 16, requires_grad=True)
    torch.library.opcheck(frozen_linear, (x, torch.randn(8, 16), torch.randn(8)))
    torch.library.opcheck(frozen_linear, (x, torch.randn(16, 8).t(), None))  # a transposed view, as backward uses


def test_products_and_input_gradients_equal_torchs_at_a_real_models_shapes():
    x = torch.randn(2, 300, 576, requires_grad=True)
    weight, bias = torch.randn(1536, 576) / 24, torch.randn(1536)
    grad = torch.randn(2, 300, 1536)
    out = frozen.linear(x, weight, bias)
    (ours,) = torch.autograd.grad(out, x, grad)
    expected = torch.nn.functional.linear(x, weight, bias)
    (theirs,) = torch.autograd.grad(expected, x, grad)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-4)


def lora_llama(seed=0):
    torch.manual_seed(seed)
    model = tiny_model("llama", head="causal")
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # B = 0 would hide mistakes in the gradients
    return model


def loss_and_grads(model):
    g = torch.Generator().manual_seed(1)
    examples = [{"input_ids": torch.randint(3, 100, (n,), generator=g).tolist()} for n in (7, 12, 9)]
    for e in examples:
        e["labels"] = [-100] * 3 + e["input_ids"][3:]
    loss = causal_lm_loss(model, pad_batch(examples, pad_id=0))
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_a_lora_model_trains_as_before_with_its_frozen_products_through_onednn(onednn_calls):
    expected_loss, expected = loss_and_grads(lora_llama())
    assert onednn_calls  # the chunked loss's output head
    onednn_calls.clear()
    model = lora_llama()
    layers = use_onednn_for_frozen_linears(model)
    loss, grads = loss_and_grads(model)
    linears = 2 * 7  # the tiny Llama's two layers
    assert layers == linears + 1 + 2 * 2 * 2  # the head, and each adapter's A and B
    # each frozen product once forward and once for its input's gradient, but for the first layer's q, k and v
    # projections, whose input (the embeddings) nothing trains; and the head's two
    assert len(onednn_calls) == linears + (linears - 3) + 2
    assert loss == pytest.approx(expected_loss, abs=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(grad, expected[name], atol=1e-6), name


def test_trainable_weights_other_dtypes_and_autocast_keep_torchs_linear(onednn_calls):
    layer = torch.nn.Linear(16, 8)
    use_onednn_for_frozen_linears(layer)
    x = torch.randn(4, 16)
    layer(x).sum().backward()  # trains: its weight's gradient comes from torch
    assert onednn_calls == [] and layer.weight.grad is not None
    layer.requires_grad_(False)
    layer.bias.requires_grad_(True)  # a trained bias (lora.bias: all) needs its gradient too
    layer(x)
    layer.bias.requires_grad_(False)
    layer.bfloat16()(x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.float()(x).dtype == torch.bfloat16
    assert onednn_calls == []
    layer(x)
    assert onednn_calls == [(4, 16)]


def test_onednns_kernel_cache_is_kept_small_unless_the_user_sized_it():
    import os
    import subprocess
    import sys

    # set when a model is switched to oneDNN, not at import
    read = ("import os, torch, loralab.fast.frozen_linear as f; name = 'ONEDNN_PRIMITIVE_CACHE_CAPACITY';"
            "print(os.environ.get(name)); f.use_onednn_for_frozen_linears(torch.nn.Linear(2, 2));"
            "print(os.environ[name])")
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    for given, kept in ((None, "None\n64"), ("8", "8\n8")):
        run_env = env if given is None else {**env, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": given}
        out = subprocess.run([sys.executable, "-c", read], env=run_env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == kept
