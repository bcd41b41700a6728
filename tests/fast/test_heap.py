import platform
import sys

import pytest
import torch

from loralab.estimate import resident_bytes
from loralab.fast.heap import release_free_heap

linux_glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                 reason="malloc_trim is glibc's, /proc Linux's")


@linux_glibc
def test_freed_heap_pages_go_back_to_the_system():
    chunks = [torch.ones(24_000) for _ in range(4000)]  # 96 KB each: below the mmap threshold, so heap chunks
    top = torch.ones(24_000)  # allocated last, it pins the heap's top: free() alone cannot shrink the heap
    del chunks
    before = resident_bytes()
    assert release_free_heap()
    assert before - resident_bytes() > 200 * 2**20  # of the 366 MiB freed in the middle of the heap
    assert top.sum() == 24_000


def test_trims_inside_a_training_steps_forward_every_few_blocks_and_change_nothing(monkeypatch):
    import loralab.fast.heap as heap
    from tiny_models import tiny_model

    model = tiny_model("llama", num_hidden_layers=6).train()
    calls = []
    monkeypatch.setattr(heap, "release_free_heap", lambda: calls.append(1) or True)
    ids = torch.randint(3, 100, (2, 9))

    def loss_and_gradients():
        model.zero_grad()
        torch.manual_seed(0)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    plain = loss_and_gradients()
    assert heap.trim_inside_steps(model, every=4) == 2  # blocks 0 and 4 of 6
    assert not calls
    trimmed = loss_and_gradients()
    assert len(calls) == 2  # after blocks 0 and 4 in the forward pass
    assert torch.equal(plain[0], trimmed[0]) and all(map(torch.equal, plain[1], trimmed[1]))
    with torch.no_grad():
        model(input_ids=ids)
    model.eval()(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 2  # not in evaluation, generation or eval-mode passes


@linux_glibc
def test_with_checkpointing_it_also_trims_before_the_backward_pass_enters_a_block(monkeypatch):
    import loralab.fast.heap as heap
    from loralab.train.model import enable_checkpointing
    from tiny_models import tiny_model

    model = tiny_model("llama", num_hidden_layers=6).train()
    enable_checkpointing(model, "full")
    calls = []
    monkeypatch.setattr(heap, "release_free_heap", lambda: calls.append(torch.is_grad_enabled()) or True)
    ids = torch.randint(3, 100, (2, 9))

    def loss_and_gradients():
        model.zero_grad()
        torch.manual_seed(0)
        loss = model(input_ids=ids, labels=ids).loss
        forward_calls = len(calls)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()], forward_calls

    plain = loss_and_gradients()
    assert heap.trim_inside_steps(model, every=4, backward=True) == 2
    trimmed = loss_and_gradients()
    assert trimmed[2] == 2  # after blocks 0 and 4 in the forward pass
    assert calls[2:] == [False, False]  # in the backward pass, as it reaches blocks 4 and 0 (before recomputing)
    assert torch.equal(plain[0], trimmed[0]) and all(map(torch.equal, plain[1], trimmed[1]))


@linux_glibc
@pytest.mark.parametrize("checkpointing", [False, True])
def test_cpu_training_trims_in_the_backward_pass_only_with_checkpointing(tmp_path, checkpointing):
    import loralab.fast.heap as heap
    from loralab.config import load_config
    from loralab.train.model import build_model
    from tiny_models import tiny_model

    tiny_model("llama", num_hidden_layers=8).save_pretrained(tmp_path)
    config = load_config(None, base={
        "task": "sft", "model": {"path": str(tmp_path), "dtype": "fp32"}, "data": {"train": "unused.json"},
        "lora": {"target_modules": ["q_proj", "v_proj"]},
        "train": {"device": "cpu", "gradient_checkpointing": checkpointing}})
    model, _, _ = build_model(config)
    hooks = [hook for m in model.modules() for hook in m._forward_hooks.values()
             if getattr(hook, "func", None) is heap._trim_after_block]
    assert len(hooks) == 2 and all(hook.keywords == {"backward": checkpointing} for hook in hooks)
