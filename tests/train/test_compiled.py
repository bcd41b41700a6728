import copy

import pytest
import torch
from torch._dynamo.utils import counters

from loralab.lora import LoraConfig, apply_lora
from loralab.train import compiled as compiled_module
from loralab.train.causal_attention import use_chunked_attention
from loralab.train.compiled import compile_model
from loralab.train.swiglu import fuse_swiglu
from tiny_models import losses_and_gradients, tiny_model


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


@pytest.mark.parametrize("scope,graphs", [(True, 2), ("model", 1)])
def test_compiled_models_give_eager_losses_and_gradients_dropout_masks_included(scope, graphs):
    # compiled graphs draw the dropout masks from torch's generator in the order eager code does; their causal
    # attention is chunked (as in training), the eager model's one SDPA call. Blocks compile into two graphs (the
    # first block's input needs no gradient, the others' do), the whole body (train.compile: model) into one;
    # either serves every length
    torch._dynamo.reset()
    counters.clear()
    eager = lora_llama(dropout=0.1)
    fuse_swiglu(eager)
    compiled = copy.deepcopy(eager)
    assert use_chunked_attention(compiled)
    compile_model(compiled, scope)
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
    assert counters["stats"]["unique_graphs"] == graphs and counters["aot_autograd"]["autograd_cache_bypass"] == 0


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
