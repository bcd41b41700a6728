import pytest
import torch

from loralab.train.optim import lr_factor, make_optimizer


@pytest.mark.parametrize("schedule,end", [("linear", 0.0), ("cosine", 0.0), ("constant", 1.0)])
def test_schedules_warm_up_then_decay(schedule, end):
    factors = [lr_factor(s, total=100, warmup=10, schedule=schedule) for s in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[100] == pytest.approx(end, abs=1e-9)
    assert all(a >= b - 1e-12 for a, b in zip(factors[10:], factors[11:], strict=False))


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = make_optimizer(model, lr=1e-3, weight_decay=0.1).param_groups
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(1, 0.1), (3, 0.0)]


def test_adamw_is_one_fused_kernel_on_cpu_with_the_reference_updates():
    torch.manual_seed(0)
    fused_model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    reference_model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    reference_model.load_state_dict(fused_model.state_dict())
    fused = make_optimizer(fused_model, lr=1e-2, weight_decay=0.1)
    assert fused.defaults["fused"]
    # torch's own loop over parameters, with the same groups
    twin = dict(zip(fused_model.parameters(), reference_model.parameters(), strict=True))
    reference = torch.optim.AdamW([{**g, "params": [twin[p] for p in g["params"]], "fused": False, "foreach": False}
                                   for g in fused.param_groups])
    for _ in range(5):
        x = torch.randn(16, 8)
        for model, optimizer in ((fused_model, fused), (reference_model, reference)):
            model(x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(fused_model.parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
