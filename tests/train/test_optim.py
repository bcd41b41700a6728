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
