import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from loralab.fast.rms_norm import fuse_rms_norm, is_rms_norm
from loralab.lora import LoraConfig, apply_lora
from tiny_models import losses_and_gradients, tiny_model


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_fused_model_gives_the_same_loss_and_gradients(model_type):
    model = tiny_model(model_type)
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], dropout=0.0))
    for name, p in model.named_parameters():  # nonzero B, so every path carries gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    for name, p in model.named_parameters():  # norms that are not all ones, trained as in full fine-tuning
        if "norm" in name:
            torch.nn.init.normal_(p, mean=1.0, std=0.2)
            p.requires_grad_(True)
    fused = copy.deepcopy(model)
    layers = model.config.num_hidden_layers
    assert fuse_rms_norm(fused) >= 2 * layers + 1  # two a layer and the final one (qwen3 also norms q and k)
    ids = torch.randint(3, 128, (2, 9))
    (loss, grads), (fused_loss, fused_grads) = losses_and_gradients((model, fused), ids)
    torch.testing.assert_close(fused_loss, loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused_grads, grads, atol=1e-6, rtol=1e-5)


def test_bf16_norm_is_within_one_rounding_of_transformers():
    norm = LlamaRMSNorm(64, eps=1e-6).to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight, mean=1.0, std=0.3)
    fused = copy.deepcopy(norm)
    assert fuse_rms_norm(fused) == 1
    x = (torch.randn(4, 16, 64) * 3).to(torch.bfloat16).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    expected, got = norm(x), fused(x2)
    assert got.dtype == torch.bfloat16
    # transformers rounds twice (the normalised x, then the product), torch's operator once
    torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=1e-6)
    grad = torch.randn_like(got)
    expected.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(x2.grad.float(), x.grad.float(), rtol=2**-6, atol=2**-6)


def test_a_norm_in_another_dtype_than_its_input_keeps_transformers_promotion():
    norm = LlamaRMSNorm(8)  # fp32 weight, as a norm kept in fp32 under bf16 autocast
    fuse_rms_norm(norm)
    x = torch.randn(2, 8).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, LlamaRMSNorm.forward(norm, x))


def test_other_norms_are_left_alone():
    assert fuse_rms_norm(tiny_model("gpt2")) == 0  # LayerNorm
    assert fuse_rms_norm(tiny_model("gemma")) == 0  # weight stored as an offset from one

    class Scaled(LlamaRMSNorm):  # the same names, another expression
        def forward(self, hidden_states):
            return self.weight * hidden_states * 2

    assert not is_rms_norm(Scaled(8))
