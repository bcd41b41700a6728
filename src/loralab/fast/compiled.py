"""`train.compile`: torch.compile per transformer block, with a partitioner told to keep fewer activations.

AOTAutograd traces a block's forward and backward as one graph and then chooses what the forward keeps for the
backward. Its default choice is tuned for speed alone, and it overrides the choices our own autograd functions
make: in a LoRA block with dropout it keeps both dropped copies of the layer input (x * mask, one per adapted
projection) as full float tensors, where eager autograd keeps x once and one-byte masks. An activation budget
below 1.0 makes the partitioner solve for the least recompute (counted in FLOPs) that keeps less; elementwise
products cost no FLOPs, so they are recomputed in the backward pass first, and matmuls and attention are kept.
"""

from __future__ import annotations

import functools

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.utils.checkpoint import CheckpointPolicy

import loralab.fast.causal_attention  # noqa: F401  (registers torch.ops.loralab's attention operators)
from loralab.models import transformer_blocks

# share of the speed-tuned choice's saved bytes a block may keep; 0.9 drops the dropped copies of x (and other
# elementwise products) and still keeps attention's output, whose recompute a lower budget starts to buy
ACTIVATION_BUDGET = 0.9


def lean_inductor(graph, example_inputs):
    """torch.compile's inductor backend, partitioned under ACTIVATION_BUDGET. The partition happens inside this
    call, so the setting applies to these graphs only and leaves other compiled code in the process alone."""
    from torch._inductor.compile_fx import compile_fx

    with torch._functorch.config.patch(activation_memory_budget=ACTIVATION_BUDGET):
        # random ops call torch's own generator (as eager code does), not inductor's per-element kernels, which
        # made LoRA's dropout masks cost 5% of a CPU step
        return compile_fx(graph, example_inputs, config_patches={"fallback_random": True,
                                                                 "joint_custom_pre_pass": NEVER_RECOMPUTE})


class NeverRecompute(CustomGraphPass):
    """Marks the joint graph's random draws and our causal attention as never recomputed in the backward pass.

    Under a budget the partitioner may recompute any op it does not list as random or compute-intensive. Its random
    list (dropout, rand_like, randn_like) lacks torch.randint, which LoRA's dropout masks are drawn with: a redrawn
    mask gives the backward pass other masks than the forward used (wrong gradients, equal losses). The masks
    themselves, drawn once, are still what is kept. Its compute-intensive list lacks custom operators, so it reran
    our attention (causal_attention.py) in the backward pass to save its output, as it never does with SDPA."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            target = node.target
            if isinstance(target, torch._ops.OpOverload) and (
                    torch.Tag.nondeterministic_seeded in target.tags
                    or target in (torch.ops.loralab.chunked_causal_attention.default,
                                  torch.ops.loralab.packed_causal_attention.default)):
                node.meta["recompute"] = CheckpointPolicy.MUST_SAVE

    def uuid(self) -> bytes:
        # part of the keys of torch's compile caches: graphs cached before our attention's backward (traced into
        # them, not hashed by torch) or these rules changed are not reused
        return get_hash_for_files((__file__, loralab.fast.causal_attention.__file__))


NEVER_RECOMPUTE = NeverRecompute()


def compile_model(model) -> int:
    """torch.compile for training steps, each transformer block (the model's `_no_split_modules`) on its own: the
    blocks repeat, so one compiled graph serves them all and compiling takes seconds, not the minutes a graph of
    the whole model takes. Returns how many modules were compiled."""
    modules = transformer_blocks(model) or [model]
    for module in modules:
        module.compile(backend=lean_inductor, dynamic=True)  # batches change length
        # Module.compile keeps the compiled call here; wrapped, so that it serves training steps only
        module._compiled_call_impl = compiled_when_training(module, module._compiled_call_impl)
    return len(modules)


def compiled_when_training(module, call):
    """The compiled call for training steps; evaluation and generation run the block eagerly. They would each
    trace graphs of their own (no gradient, no dropout), and generation retraces at every new key-value cache
    layout until dynamo's recompile limit turns it back to eager anyway: seconds to minutes of compiling for
    forward passes that keep nothing for a backward pass, where compiling saves the memory.

    Training steps are traced with constant Python floats: `dynamic=True` makes them symbolic too (norm eps,
    dropout p, LoRA scaling), inductor cannot keep them so, and dynamo then restarts the trace with them constant,
    every graph traced and compiled twice (about 13 s of a run's start on 2 CPU cores)."""

    config = torch._dynamo.config

    @functools.wraps(call)
    def call_compiled_when_training(*args, **kwargs):
        if not (module.training and torch.is_grad_enabled()):
            return module._call_impl(*args, **kwargs)
        # set and restored by hand: config.patch costs ~0.2 ms, paid by every block on every step
        before, config.specialize_float = config.specialize_float, True
        try:
            return call(*args, **kwargs)
        finally:
            config.specialize_float = before

    return call_compiled_when_training
