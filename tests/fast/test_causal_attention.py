import copy
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from loralab.data.collate import pack_batch, to_device
from loralab.fast import causal_attention
from loralab.fast.causal_attention import chunked_causal_attention, packed_causal_attention, use_chunked_attention
from loralab.lora import LoraConfig, apply_lora
from tiny_models import losses_and_gradients, packed_examples, tiny_model


def one_sdpa_call(query, key, value, scale):
    gqa = query.shape[1] != key.shape[1]
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


@pytest.mark.parametrize(("heads", "kv_heads", "length", "dtype"), [
    (4, 4, 130, torch.float32),  # a length the chunks do not divide
    (6, 2, 257, torch.float32),  # grouped-query heads
    (4, 2, 200, torch.bfloat16),
])
def test_chunks_give_one_causal_sdpa_call_in_value_and_gradients(heads, kv_heads, length, dtype):
    torch.manual_seed(0)
    # laid out as transformers passes them: (batch, length, heads, dim) transposed
    query = torch.randn(2, length, heads, 16, dtype=dtype).transpose(1, 2).requires_grad_()
    key, value = (torch.randn(2, length, kv_heads, 16, dtype=dtype).transpose(1, 2).requires_grad_()
                  for _ in range(2))
    grad_out = torch.randn(2, length, heads, 16, dtype=dtype)
    results = []
    for attention in (one_sdpa_call, lambda *args: chunked_causal_attention(*args)[0]):
        out = attention(query, key, value, 0.25)
        results.append((out, *torch.autograd.grad(out, (query, key, value), grad_out)))
    tolerance = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-4)
    for chunked, plain in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(chunked, plain, **tolerance)


def test_the_operators_pass_torchs_custom_op_checks():
    # fake (meta) kernels, registration and autograd as torch.compile relies on them
    query = torch.randn(1, 4, 40, 8, requires_grad=True)
    key, value = (torch.randn(1, 2, 40, 8, requires_grad=True) for _ in range(2))
    torch.library.opcheck(chunked_causal_attention, (query, key, value, 0.3))
    out, logsumexp = chunked_causal_attention(query.detach(), key.detach(), value.detach(), 0.3)
    torch.library.opcheck(causal_attention.chunked_causal_attention_backward,
                          (torch.randn_like(out), query.detach(), key.detach(), value.detach(), out, logsumexp, 0.3))
    # packed: two rows of 20, the first holding examples of 12 and 8 tokens, the second one of 20
    examples = torch.tensor([0, 12, 20, 40], dtype=torch.int32)
    query, key, value = (t[:, :, :20].detach().repeat(2, 1, 1, 1).requires_grad_() for t in (query, key, value))
    torch.library.opcheck(packed_causal_attention, (query, key, value, examples, 0.3))
    q, k, v = query.detach(), key.detach(), value.detach()
    out, logsumexp = packed_causal_attention(q, k, v, examples, 0.3)
    torch.library.opcheck(causal_attention.packed_causal_attention_backward,
                          (torch.randn_like(out), q, k, v, out, logsumexp, examples, 0.3))


def plain_and_switched(model_type, **model_settings):
    """A tiny LoRA model in training mode on transformers' SDPA, and a copy switched to loralab's attention."""
    model = tiny_model(model_type, **model_settings)
    targets = {"gpt2": ["c_attn"]}.get(model_type, ["q_proj", "v_proj"])
    apply_lora(model, LoraConfig(r=4, target_modules=targets, dropout=0.0))
    for name, p in model.named_parameters():  # nonzero B, so every path carries gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.train()
    switched = copy.deepcopy(model)
    assert use_chunked_attention(switched)
    return model, switched


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gpt2"])
def test_a_switched_model_trains_as_with_sdpa_and_only_unmasked_causal_rows_are_chunked(model_type, monkeypatch):
    # (gpt2 with its dropout off: with attention dropout on, it runs SDPA)
    gpt2 = dict(n_positions=256, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model, switched = plain_and_switched(model_type, **(gpt2 if model_type == "gpt2" else {}))
    calls = []
    monkeypatch.setattr(causal_attention, "chunked_causal_attention",
                        lambda *args: calls.append(args[0].shape) or chunked_causal_attention(*args))

    ids = torch.randint(3, 128, (2, 150))
    (loss, grads), (switched_loss, switched_grads) = losses_and_gradients((model, switched), ids)
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(switched_loss, loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(switched_grads, grads, atol=1e-5, rtol=1e-4)

    calls.clear()
    padded = torch.ones_like(ids)
    padded[0, 140:] = 0
    with torch.no_grad():
        short = switched(input_ids=ids[:, :40]).logits  # below the shortest chunked length
        masked = switched(input_ids=ids, attention_mask=padded).logits
        torch.testing.assert_close(short, model(input_ids=ids[:, :40]).logits)
        torch.testing.assert_close(masked, model(input_ids=ids, attention_mask=padded).logits)
        prompt = ids[:1, :130]
        settings = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
        answer = switched.generate(input_ids=prompt, **settings)
        assert torch.equal(answer, model.generate(input_ids=prompt, **settings))
    # only generation's first pass over the prompt (no mask needed, no cache yet) is chunked
    assert len(calls) == model.config.num_hidden_layers


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_packed_rows_attend_one_example_at_a_time_as_with_sdpa(model_type, monkeypatch):
    model, switched = plain_and_switched(model_type)
    calls = []
    monkeypatch.setattr(causal_attention, "packed_causal_attention",
                        lambda *args: calls.append(args[3].tolist()) or packed_causal_attention(*args))
    examples = packed_examples(150, 60, 90, 100, 20, 1)
    # a row of two long examples (chunked), one of three and a one-token example, and padding
    batch = pack_batch([[examples[0], examples[1]], [examples[2], examples[3], examples[4], examples[5]]], pad_id=0)
    results = []
    for m in (model, switched):
        loss = m(**batch, use_cache=False).loss  # as training runs it: a cache turns packed masking off
        loss.backward()
        results.append((loss, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    # the rows end to end (211 tokens each): 210 is the first row's padding, 421 the one-token example
    assert calls[0] == [0, 150, 210, 211, 301, 401, 421, 422]
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-5, rtol=1e-4)


def test_packed_rows_under_a_sliding_window_shorter_than_an_example_keep_sdpa(monkeypatch):
    model, switched = plain_and_switched("mistral", sliding_window=16)
    calls = []
    monkeypatch.setattr(causal_attention, "packed_causal_attention", lambda *args: calls.append(args))
    examples = packed_examples(40, 20, 30)
    batch = pack_batch([examples[:2], examples[2:]], pad_id=0)
    losses = [m(**batch, use_cache=False).loss for m in (model, switched)]
    assert calls == []  # one example at a time would ignore the window
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)


def reference_varlen_kernel(seen):
    """Stands in for torch's CUDA flash kernel on CPU, with its calling convention: (tokens, heads, dim) tensors,
    int32 offsets of the sequences, their longest length; causal SDPA over each sequence."""
    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, debug_mask, scale):
        seen.append((cu_q, max_q))
        assert cu_q is cu_k and max_q == max_k and dropout == 0.0 and causal and not debug_mask
        out = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                              scale=scale, enable_gqa=True).transpose(0, 1)
               for a, b in pairwise(cu_q.tolist())]
        return torch.cat(out), None, None, None, None
    return kernel


def test_varlen_attention_lays_packed_rows_out_as_the_flash_kernel_takes_them(monkeypatch):
    seen = []
    monkeypatch.setattr(causal_attention, "flash_varlen", reference_varlen_kernel(seen))
    torch.manual_seed(0)
    query = torch.randn(2, 12, 4, 8).transpose(1, 2).requires_grad_()  # as transformers passes them
    key, value = (torch.randn(2, 12, 2, 8).transpose(1, 2).requires_grad_() for _ in range(2))
    examples = torch.tensor([0, 5, 12, 21, 24], dtype=torch.int32)  # rows of 5 + 7 and 9 + 3 tokens
    grad_out = torch.randn(2, 12, 4, 8)
    results = []
    for attention in (lambda *args: causal_attention.varlen_causal_attention(*args[:3], examples, 9, args[4]),
                      lambda *args: packed_causal_attention(*args)[0]):
        out = attention(query, key, value, examples, 0.3)
        results.append((out, *torch.autograd.grad(out, (query, key, value), grad_out)))
    assert seen == [(examples, 9)]
    for varlen, per_example in zip(*results, strict=True):
        torch.testing.assert_close(varlen, per_example)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_rows_on_a_gpu_train_as_examples_apart(monkeypatch):
    # the real flash kernel (bf16): the packed loss and gradients against each example run alone
    model, switched = plain_and_switched("llama", head_dim=64, num_attention_heads=4, hidden_size=256)
    model, switched = model.cuda().bfloat16(), switched.cuda().bfloat16()
    assert causal_attention.varlen_fits(torch.empty(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16))
    calls, varlen = [], causal_attention.varlen_causal_attention
    monkeypatch.setattr(causal_attention, "varlen_causal_attention", lambda *args: calls.append(args) or varlen(*args))
    examples = packed_examples(150, 60, 90, 100, 1)
    batch = to_device(pack_batch([examples[:2], examples[2:]], pad_id=0), "cuda")
    packed = switched(**batch, use_cache=False).loss
    packed.backward()
    assert len(calls) == model.config.num_hidden_layers
    # each example alone through plain SDPA, its loss weighted by its scored tokens
    total, scored = 0.0, 0
    for e in examples:
        ids = torch.tensor([e["input_ids"]], device="cuda")
        n = len(e["input_ids"]) - 1
        if n:
            total = total + model(input_ids=ids, labels=ids).loss * n
            scored += n
    (total / scored).backward()
    torch.testing.assert_close(packed.float(), (total / scored).float(), atol=2e-2, rtol=2e-2)
    for (name, p), q in zip(switched.named_parameters(), model.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad.float(), q.grad.float(), atol=5e-2, rtol=5e-2, msg=name)


def test_left_padded_prompts_generate_as_with_sdpa_in_one_call(monkeypatch):
    # generation's positions restart at each pad and at each prompt's first token, as packed rows' do
    model, switched = plain_and_switched("llama")
    model.eval(), switched.eval()
    calls = []
    monkeypatch.setattr(causal_attention, "packed_causal_attention", lambda *args: calls.append(args))
    ids = torch.randint(3, 128, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    settings = dict(attention_mask=mask, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        assert torch.equal(switched.generate(input_ids=ids, **settings), model.generate(input_ids=ids, **settings))
    assert calls == []


def test_models_not_on_sdpa_are_left_alone():
    model = tiny_model("llama", attn_implementation="eager")
    assert not use_chunked_attention(model)
    assert model.config._attn_implementation == "eager"


def test_bf16_gradients_are_computed_in_fp32_and_returned_in_bf16(monkeypatch):
    # torch's CPU flash backward in bf16 has a fixed cost of milliseconds a call, which short chunks pay in full
    seen = []
    flash_backward = causal_attention.flash_backward
    monkeypatch.setattr(causal_attention, "flash_backward",
                        lambda *args, **kwargs: seen.append(args[1].dtype) or flash_backward(*args, **kwargs))
    torch.manual_seed(0)
    examples = torch.tensor([0, 150, 190, 300], dtype=torch.int32)  # one row: a chunked example and two others
    wide = [torch.randn(1, 300, heads, 16).transpose(1, 2) for heads in (4, 2, 2)]
    grad_out = torch.randn(1, 300, 4, 16)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        inputs = [t.to(dtype).requires_grad_() for t in wide]
        out, _ = packed_causal_attention(*inputs, examples, 0.25)
        results.append(torch.autograd.grad(out, inputs, grad_out.to(dtype)))
    assert set(seen) == {torch.float32}
    for reference, narrow in zip(*results, strict=True):
        assert narrow.dtype == torch.bfloat16
        torch.testing.assert_close(narrow.float(), reference, atol=3e-2, rtol=3e-2)
