from types import SimpleNamespace

import pytest
import torch

from loralab.fast import cuda_allocator
from loralab.fast.cuda_allocator import SETTINGS, use_expandable_segments
from loralab.train import loop


@pytest.fixture
def calls(monkeypatch):
    """Records what the allocator would be told, on any machine."""
    seen = []
    for name in cuda_allocator.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    owner, name = cuda_allocator.SETTERS[0]
    monkeypatch.setattr(owner, name, seen.append, raising=False)
    return seen


def test_expandable_segments_are_turned_on_when_the_user_set_nothing(calls):
    assert use_expandable_segments()
    assert calls == [SETTINGS]


@pytest.mark.parametrize("name", cuda_allocator.USER_SETTINGS)
def test_the_users_allocator_settings_win(calls, monkeypatch, name):
    monkeypatch.setenv(name, "expandable_segments:False")
    assert not use_expandable_segments()
    assert calls == []


def test_a_torch_without_the_call_keeps_its_defaults(monkeypatch):
    for name in cuda_allocator.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    for owner, name in cuda_allocator.SETTERS:
        monkeypatch.delattr(owner, name, raising=False)
    assert not use_expandable_segments()


@pytest.mark.parametrize("device, turned_on", [("cuda", 1), ("cuda:1", 1), ("cpu", 0)])
def test_train_sets_the_allocator_before_anything_else_for_a_gpu_run_only(monkeypatch, device, turned_on):
    class Started(Exception):
        pass

    def init_world(_):
        raise Started  # the run's first step that may touch CUDA

    seen = []
    monkeypatch.setattr(loop, "use_expandable_segments", lambda: seen.append(device))
    monkeypatch.setattr(loop, "init_world", init_world)
    monkeypatch.setattr(loop, "usable_device", loop.pick_device)  # no GPU needed to see the order
    with pytest.raises(Started):
        loop.train(SimpleNamespace(train=SimpleNamespace(device=device)))
    assert len(seen) == turned_on


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_allocator_takes_expandable_segments(monkeypatch):
    for name in cuda_allocator.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert use_expandable_segments()
    torch.empty(1, device="cuda")
    settings = torch.cuda.memory._snapshot().get("allocator_settings", {})
    if "expandable_segments" not in settings:
        pytest.skip("this torch's snapshot does not report its allocator settings")
    assert settings["expandable_segments"]
