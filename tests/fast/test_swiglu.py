import copy

import pytest
import torch
from torch import nn

from loralab.fast.swiglu import SiluMul, fuse_swiglu, is_swiglu
from loralab.lora import LoraConfig, apply_lora
from tiny_models import losses_and_gradients, tiny_model


def test_silu_mul_matches_autograd_in_value_and_gradients():
    gate, up = (torch.randn(3, 7, 10, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(SiluMul.apply, (gate, up))
    out = SiluMul.apply(gate, up)
    assert torch.equal(out, torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_fused_model_gives_the_same_loss_and_gradients(model_type):
    model = tiny_model(model_type)
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], dropout=0.0))
    for name, p in model.named_parameters():  # nonzero B, so every path carries gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    fused = copy.deepcopy(model)
    assert fuse_swiglu(fused) == model.config.num_hidden_layers
    ids = torch.randint(3, 128, (2, 9))
    (loss, grads), (fused_loss, fused_grads) = losses_and_gradients((model, fused), ids)
    assert torch.equal(loss, fused_loss)
    torch.testing.assert_close(fused_grads, grads, atol=1e-6, rtol=1e-5)


def test_other_mlps_are_left_alone():
    assert fuse_swiglu(tiny_model("gpt2")) == 0
    assert fuse_swiglu(tiny_model("gemma")) == 0  # a GELU gate, not SiLU

    class Swapped(nn.Module):  # SiLU, the same names, another expression
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 4)
            self.act_fn = nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))

    assert not is_swiglu(Swapped())
    assert fuse_swiglu(Swapped()) == 0
