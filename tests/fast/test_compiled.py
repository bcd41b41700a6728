import copy

import pytest
import torch
from torch._dynamo.utils import counters
from torch.profiler import profile

from loralab.data.collate import pack_batch, to_device
from loralab.fast import compiled as compiled_module
from loralab.fast.causal_attention import use_chunked_attention
from loralab.fast.compiled import compile_model
from loralab.fast.swiglu import fuse_swiglu
from loralab.lora import LoraConfig, apply_lora
from tiny_models import losses_and_gradients, packed_examples, tiny_model


def lora_llama(dropout: float):
    model = tiny_model("llama", hidden_size=64, intermediate_size=128)
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], dropout=dropout))
    for name, p in model.named_parameters():  # nonzero B, so every path carries gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.train()  # blocks run compiled in training only (dropout on)


def saved_bytes_of_forward(model, ids) -> int:
    """Bytes that autograd keeps for the backward pass over one forward (parameters excluded)."""
    weights = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in weights:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    return total


def test_compiled_models_give_eager_losses_and_gradients_dropout_masks_included():
    # compiled graphs draw the dropout masks from torch's generator in the order eager code does; their causal
    # attention is chunked (as in training), the eager model's one SDPA call. Blocks compile into two graphs (the
    # first block's input needs no gradient, the others' do), which serve every length
    torch._dynamo.reset()
    counters.clear()
    eager = lora_llama(dropout=0.1)
    fuse_swiglu(eager)
    compiled = copy.deepcopy(eager)
    assert use_chunked_attention(compiled)
    compile_model(compiled)
    for length in (40, 23):
        ids = torch.randint(3, 128, (2, length))
        results = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(5)
            results += losses_and_gradients([model], ids)
        (loss, grads), (compiled_loss, compiled_grads) = results
        torch.testing.assert_close(compiled_loss, loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(compiled_grads, grads, atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] == 2 and counters["aot_autograd"]["autograd_cache_bypass"] == 0


def test_budget_keeps_fewer_activations_than_the_speed_tuned_partition(monkeypatch):
    # with dropout the speed-tuned partition keeps each adapted projection's dropped input as a float tensor
    ids = torch.randint(3, 128, (2, 32))
    kept = {}
    lean = compiled_module.ACTIVATION_BUDGET
    for budget in (1.0, lean):
        torch._dynamo.reset()
        monkeypatch.setattr(compiled_module, "ACTIVATION_BUDGET", budget)
        model = lora_llama(dropout=0.1)
        compile_model(model)
        kept[budget] = saved_bytes_of_forward(model, ids)
    torch._dynamo.reset()
    one_input_copy_per_block = model.config.num_hidden_layers * ids.numel() * model.config.hidden_size * 4
    assert kept[1.0] - kept[lean] >= one_input_copy_per_block


def test_blocks_trace_once_into_graphs_the_compile_cache_can_store_and_only_for_training():
    # an autograd.Function in the graph bars AOTAutograd's cache (each run would trace and compile afresh), and
    # symbolic floats make dynamo trace every graph twice; evaluation and generation trace nothing (generation
    # would retrace at every key-value cache layout until dynamo's recompile limit)
    torch._dynamo.reset()
    counters.clear()
    model = lora_llama(dropout=0.1)
    fuse_swiglu(model)
    eager = copy.deepcopy(model).eval()
    use_chunked_attention(model)  # one graph for every length: the chunks are one opaque operator
    compile_model(model)
    for length in (17, 40):
        ids = torch.randint(3, 128, (2, length))
        model(input_ids=ids, labels=ids).loss.backward()
    model.eval()
    prompt = torch.randint(3, 128, (1, 9))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        answer = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                do_sample=False)
        torch.testing.assert_close(logits, eager(input_ids=ids).logits)
        torch.testing.assert_close(answer, eager.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                                          max_new_tokens=12, do_sample=False))
    torch._dynamo.reset()
    assert counters["aot_autograd"]["autograd_cache_bypass"] == 0
    # two graphs: the first block's input needs no gradient, the others' do; both of dynamic length
    assert counters["stats"]["unique_graphs"] == 2 and counters["aot_autograd"]["total"] == 2


def test_compiled_blocks_attend_packed_rows_one_example_at_a_time():
    # the examples' bounds reach the compiled graphs as inputs: no mask over the rows' whole squares, and one graph
    # for every packing
    torch._dynamo.reset()
    counters.clear()
    eager = lora_llama(dropout=0.1)
    assert use_chunked_attention(eager)
    compiled = copy.deepcopy(eager)
    compile_model(compiled)
    examples = packed_examples(150, 60, 90, 100, 20, 1, 33, 7)
    # compiles first: tracing calls the operator too. Two rows: dynamo gives a batch of one a graph of its own
    compiled(**pack_batch([examples[2:4], examples[4:6]], pad_id=0), use_cache=False).loss.backward()
    for rows in ([examples[:2], examples[2:6]], [examples[6:], examples[2:3], examples[:1]]):
        batch = pack_batch(rows, pad_id=0)
        results = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(5)
            with profile() as trace:
                loss = model(**batch, use_cache=False).loss
                loss.backward()
            calls = [e for e in trace.events() if e.name == "loralab::packed_causal_attention"]
            assert len(calls) == model.config.num_hidden_layers
            results.append((loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
        (loss, grads), (compiled_loss, compiled_grads) = results
        torch.testing.assert_close(compiled_loss, loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(compiled_grads, grads, atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] == 2  # the first block's, and the others'


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_blocks_on_a_gpu_take_packed_rows_to_the_varlen_kernel():
    # bf16 on an Ampere or newer GPU: one variable-length flash call a layer, no masked SDPA; as eager
    torch._dynamo.reset()
    eager = lora_llama(dropout=0.0).cuda().bfloat16()
    assert use_chunked_attention(eager)
    compiled = copy.deepcopy(eager)
    compile_model(compiled)
    examples = packed_examples(150, 60, 90, 100, 20, 1)
    batch = to_device(pack_batch([examples[:2], examples[2:]], pad_id=0), "cuda")
    compiled(**batch, use_cache=False).loss.backward()  # compiles
    results = []
    for model in (eager, compiled):
        model.zero_grad(set_to_none=True)
        with profile() as trace:
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            torch.cuda.synchronize()
        names = [e.name for e in trace.events()]
        assert names.count("aten::_flash_attention_forward") == model.config.num_hidden_layers
        assert not any("efficient_attention" in name for name in names)
        results.append((loss.float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}))
    (loss, grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, loss, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(compiled_grads, grads, atol=5e-2, rtol=5e-2)
    torch._dynamo.reset()
