import copy

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loralab.lora.layer import LoraLinear, keep_mask


def make_base(kind: str, dtype=torch.float32):
    torch.manual_seed(0)
    layer = nn.Linear(16, 24) if kind == "linear" else Conv1D(24, 16)  # Conv1D(nf=out, nx=in)
    return layer.to(dtype)


def randomize(layer: LoraLinear, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in layer.lora_B.values():
            b.weight.copy_(torch.randn(b.weight.shape, generator=g) * 0.2)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_fresh_adapter_gives_base_output_exactly(kind, init):
    base = make_base(kind)
    layer = LoraLinear(copy.deepcopy(base))
    layer.add_adapter("default", r=4, scaling=2.0, init=init)
    x = torch.randn(3, 5, 16)
    assert torch.equal(layer(x), base(x))
    assert layer.lora_A["default"].weight.abs().sum() > 0  # A is random, B is zero
    assert layer.lora_B["default"].weight.abs().sum() == 0


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_is_base_plus_scaled_low_rank_update(kind):
    base = make_base(kind)
    layer = LoraLinear(copy.deepcopy(base))
    layer.add_adapter("default", r=4, scaling=0.5)
    randomize(layer)
    x = torch.randn(2, 3, 16)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = base(x) + 0.5 * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)


def test_several_adapters_active_together_add_up_and_disable_restores_base():
    base = make_base("linear")
    layer = LoraLinear(copy.deepcopy(base))
    layer.add_adapter("one", r=2, scaling=1.0)
    layer.add_adapter("two", r=4, scaling=3.0)
    randomize(layer)
    x = torch.randn(4, 16)
    delta = {n: layer.delta_weight(n) for n in ("one", "two")}
    assert layer.active_adapters == ["one"]  # the first adapter added is active
    torch.testing.assert_close(layer(x), base(x) + x @ delta["one"].T, atol=1e-5, rtol=0)
    layer.active_adapters = ["one", "two"]
    torch.testing.assert_close(layer(x), base(x) + x @ (delta["one"] + delta["two"]).T, atol=1e-5, rtol=0)
    layer.disabled = True
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_is_exact_in_fp32_and_unmerge_restores_weights(kind):
    base = make_base(kind)
    layer = LoraLinear(copy.deepcopy(base))
    layer.add_adapter("default", r=8, scaling=2.0)
    randomize(layer)
    x = torch.randn(6, 16)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged_adapters == ["default"]
    assert (layer(x) - unmerged).abs().max() <= 1e-6
    assert not torch.equal(layer.base_layer.weight, base.weight)
    layer.unmerge()
    assert (layer.base_layer.weight - base.weight).abs().max() <= 1e-6
    assert (layer(x) - unmerged).abs().max() <= 1e-6


def test_merge_in_bf16_stays_within_bf16_tolerance():
    base = make_base("linear", torch.bfloat16)
    layer = LoraLinear(copy.deepcopy(base))
    layer.add_adapter("default", r=8, scaling=2.0)
    randomize(layer)
    x = torch.randn(6, 16, dtype=torch.bfloat16)
    unmerged = layer(x).float()
    layer.merge()
    merged = layer(x).float()
    torch.testing.assert_close(merged, unmerged, **dict(rtol=1.6e-2, atol=2e-2))
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight.float(), base.weight.float(), rtol=1.6e-2, atol=1e-2)


def test_disabling_a_merged_layer_unmerges_it():
    base = make_base("linear")
    layer = LoraLinear(copy.deepcopy(base))
    layer.add_adapter("default", r=4, scaling=1.0)
    randomize(layer)
    layer.merge()
    layer.disabled = True
    x = torch.randn(2, 16)
    torch.testing.assert_close(layer(x), base(x), atol=1e-6, rtol=0)
    assert layer.merged_adapters == []


def test_zero_dropout_adds_no_dropout_module():
    layer = LoraLinear(make_base("linear"))
    layer.add_adapter("a", r=2, scaling=1.0, dropout=0.0)
    layer.add_adapter("b", r=2, scaling=1.0, dropout=0.1)
    assert isinstance(layer.lora_dropout["a"], nn.Identity)
    assert isinstance(layer.lora_dropout["b"], nn.Dropout)


def test_dropout_in_training_is_dropout_then_linear_with_a_one_byte_mask():
    layer = LoraLinear(make_base("linear"))
    layer.add_adapter("default", r=4, scaling=2.0, dropout=0.3)
    randomize(layer)
    x = torch.randn(3, 5, 16, requires_grad=True)
    torch.manual_seed(7)
    out = layer(x)
    out.pow(2).sum().backward()
    got = (x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad)

    # the same mask, drawn from the same random stream, through plain autograd
    torch.manual_seed(7)
    keep, scale = keep_mask(x.shape, 0.3, x.device)
    assert 0 < keep.sum() < keep.numel()
    x2 = x.detach().clone().requires_grad_(True)
    a, b = (copy.deepcopy(m.weight) for m in (layer.lora_A["default"], layer.lora_B["default"]))
    expected = layer.base_layer(x2) + ((x2 * keep * scale) @ a.T @ b.T) * 2.0
    expected.pow(2).sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(got, (x2.grad, a.grad, b.grad), strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)

    layer.eval()  # no dropout at all in eval mode
    torch.testing.assert_close(layer(x), layer.base_layer(x) + (x @ a.T @ b.T) * 2.0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3])
def test_keep_mask_drops_each_element_with_probability_p(p):
    torch.manual_seed(0)
    keep, scale = keep_mask(torch.Size([1024, 1025]), p, torch.device("cpu"))  # not a multiple of 4 elements
    assert keep.dtype == torch.bool and keep.shape == (1024, 1025)
    # each of the four 16-bit slices of a random word is unbiased (a fixed sign bit would show in one of them);
    # 262k draws each, so the standard error of a rate is below 0.0006
    flat = keep.flatten()[:1024 * 1024].view(-1, 4).float()
    for slot in range(4):
        assert abs(1 - flat[:, slot].mean().item() - p) < 0.003
    assert scale == pytest.approx(1 / (1 - p), rel=1e-4)
    assert (keep.float() * scale).mean().item() == pytest.approx(1.0, abs=0.004)  # dropout keeps the mean


def test_dropout_under_autocast_trains_an_fp32_layer():
    # an fp32 layer (kept in fp32 by its model) in a bf16 autocast region: the low-rank path's output is bf16, its
    # gradients come back in the weights' dtype
    layer = LoraLinear(make_base("linear"))
    layer.base_layer.requires_grad_(False)
    layer.add_adapter("default", r=4, scaling=2.0, dropout=0.3)
    randomize(layer)
    x = torch.randn(3, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.lora_A["default"].weight.grad.dtype == torch.float32
    assert layer.lora_A["default"].weight.grad.abs().sum() > 0


def test_gradients_reach_a_and_b_only_through_the_update():
    layer = LoraLinear(make_base("linear"))
    layer.base_layer.requires_grad_(False)
    layer.add_adapter("default", r=4, scaling=2.0)
    randomize(layer)
    layer(torch.randn(3, 16)).pow(2).sum().backward()
    assert layer.lora_A["default"].weight.grad is not None
    assert layer.lora_B["default"].weight.grad is not None
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_output_and_gradients_as_peft_layer(dtype):
    base = make_base("linear", dtype)
    ours = LoraLinear(copy.deepcopy(base))
    ours.add_adapter("default", r=8, scaling=2.0)
    randomize(ours)
    wrapped = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), peft.LoraConfig(r=8, lora_alpha=16,
                                                                                      target_modules=["0"]))
    peft_layer = wrapped.base_model.model[0]
    peft_layer.lora_A["default"].weight.data.copy_(ours.lora_A["default"].weight)
    peft_layer.lora_B["default"].weight.data.copy_(ours.lora_B["default"].weight)
    x = torch.randn(2, 5, 16, dtype=dtype)
    y_ours, y_peft = ours(x), peft_layer(x)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=2e-2)
    torch.testing.assert_close(y_ours, y_peft, **tol)
    y_ours.float().sum().backward()
    y_peft.float().sum().backward()
    grad_ours, grad_peft = ours.lora_A["default"].weight.grad, peft_layer.lora_A["default"].weight.grad
    assert grad_ours.dtype == grad_peft.dtype == torch.float32  # fp32 master weights on a bf16 base, as PEFT
    # PEFT computes the update in fp32, we in the input's dtype: compare the whole gradient, relatively
    assert (grad_ours - grad_peft).norm() / grad_peft.norm() < (1e-2 if dtype == torch.bfloat16 else 1e-6)
