"""Text generation with the training template: one conversation (chat) or a file of prompts (batched)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.progress import Progress
from transformers import TextStreamer

from loralab.data.formats import ROLES
from loralab.data.records import Record, read_records
from loralab.data.templates import encode_prompt, resolve_template
from loralab.errors import LoralabError
from loralab.files import write_text_atomically
from loralab.infer.load import Loaded
from loralab.tasks.evaluation import generate, position_limit


def chat_template(loaded: Loaded, override: str | None = None) -> str:
    """The template training used, unless overridden; raw-text adapters fall back to the tokenizer's."""
    if override:
        return resolve_template(loaded.tokenizer, override)
    if loaded.settings.template:
        return loaded.settings.template
    if getattr(loaded.tokenizer, "chat_template", None):
        return loaded.tokenizer.chat_template
    raise LoralabError("neither the adapter nor the tokenizer has a chat template", field="--template",
                       fix="pass --template (alpaca, chatml, qwen, llama2, llama3, chatglm3, or a Jinja string)")


def sampling(temperature: float, top_p: float, max_new_tokens: int, pad_id: int) -> dict:
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, do_sample=temperature > 0)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    return kwargs


def prompt_turns(record: Record, system: str | None) -> list[dict]:
    """A record's conversation up to the answer: messages (a trailing assistant turn dropped), alpaca
    instruction [+ input], or a plain prompt / text field."""
    data = record.data
    if "messages" in data or "conversations" in data:
        field = "messages" if "messages" in data else "conversations"
        turns = []
        for k, message in enumerate(record.get(field, list)):
            role = message.get("role", message.get("from")) if isinstance(message, dict) else None
            content = message.get("content", message.get("value")) if isinstance(message, dict) else None
            if role not in ROLES or not isinstance(content, str):
                raise record.error("each message needs a known role and text content", f"{field}[{k}]")
            turns.append({"role": ROLES[role], "content": content})
        if turns and turns[-1]["role"] == "assistant":
            turns = turns[:-1]  # the reference answer, if the file has one
    elif "instruction" in data:
        extra = record.get("input", required=False, empty_ok=True)
        instruction = record.get("instruction")
        turns = [{"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction}]
    else:
        field = "prompt" if "prompt" in data else "text"
        turns = [{"role": "user", "content": record.get(field)}]
    if system and turns[0]["role"] != "system":
        turns = [{"role": "system", "content": system}, *turns]
    return turns


def generate_file(loaded: Loaded, input_path: str, output_path: str, batch_size: int = 8, temperature: float = 0.0,
                  top_p: float = 0.9, max_new_tokens: int = 256, template: str | None = None,
                  system: str | None = None) -> int:
    """Answer every prompt of `input_path` into `output_path` (jsonl: the record's fields plus "output")."""
    check_output_file(Path(output_path))
    records = read_records(input_path)
    jinja = chat_template(loaded, template)
    system = system or loaded.settings.system
    prompts = [{"input_ids": encode_prompt(loaded.tokenizer, jinja, prompt_turns(r, system))} for r in records]
    limit = position_limit(loaded.model)
    for record, prompt in zip(records, prompts, strict=True):
        length = len(prompt["input_ids"])
        if limit and length + max_new_tokens > limit:
            raise record.error(
                f"this prompt is {length} tokens (with the template); with max_new_tokens={max_new_tokens} the "
                f"answer would run past the {limit} positions the model handles",
                fix=f"--max-new-tokens {limit - length}" if length < limit else
                f"shorten this prompt to under {limit - max_new_tokens} tokens")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]["input_ids"]))  # similar lengths together
    tok = loaded.tokenizer
    with Progress(transient=True) as progress:
        bar = progress.add_task("generating", total=len(prompts))
        texts = generate(loaded.model, tok, [prompts[i] for i in order], batch_size, max_new_tokens, loaded.device,
                         loaded.autocast(), sampling(temperature, top_p, max_new_tokens, tok.pad_token_id),
                         on_batch=lambda n: progress.advance(bar, n))
    outputs = dict(zip(order, texts, strict=True))
    rows = [{**r.data, "output": outputs[i]} for i, r in enumerate(records)]
    write_jsonl_atomically(Path(output_path), rows)
    return len(rows)


def check_output_file(path: Path) -> None:
    """Refused before any work: an output path that is a folder (the answers could not be written there)."""
    if path.is_dir():
        raise LoralabError("the output path is a folder", file=str(path), field="--output",
                           fix="give a file name, e.g. --output answers.jsonl")


def write_jsonl_atomically(path: Path, rows: list[dict]) -> None:
    check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_text_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    except OSError as e:
        raise LoralabError(f"cannot write the output ({e.strerror or e})", file=str(path), field="--output",
                           fix="check the folder exists and is writable, and that the disk has space") from None


class _Streamer(TextStreamer):
    def __init__(self, tokenizer, stream):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.stream.write(text + ("\n" if stream_end else ""))
        self.stream.flush()


def fitting_prompt(loaded: Loaded, jinja: str, system: str | None, history: list[dict], max_new_tokens: int):
    """The chat's prompt ids on the device, its oldest exchanges dropped from `history` (in place) until the prompt
    and the answer fit the model's positions; None when the last message alone does not."""
    limit = position_limit(loaded.model)
    while True:
        turns = ([{"role": "system", "content": system}] if system else []) + history
        ids = encode_prompt(loaded.tokenizer, jinja, turns)
        if not limit or len(ids) + max_new_tokens <= limit:
            return torch.tensor([ids], device=loaded.device)
        if len(history) == 1:
            return None
        del history[:2]  # the oldest user message and its answer


def chat(loaded: Loaded, input_stream, output_stream, system: str | None = None, temperature: float = 0.7,
         top_p: float = 0.9, max_new_tokens: int = 256, template: str | None = None) -> None:
    """A terminal chat: one line per user turn, the answer streamed as it is generated; /reset, /exit."""
    jinja = chat_template(loaded, template)
    system = system or loaded.settings.system
    history: list[dict] = []
    tok = loaded.tokenizer
    output_stream.write("chat: type a message; /reset clears the history, /exit quits\n")
    while True:
        output_stream.write("> ")
        output_stream.flush()
        line = input_stream.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = []
            output_stream.write("(history cleared)\n")
            continue
        history.append({"role": "user", "content": text})
        ids = fitting_prompt(loaded, jinja, system, history, max_new_tokens)
        if ids is None:
            history.pop()
            output_stream.write(f"(that message is too long for this model's {position_limit(loaded.model)} "
                                f"positions with max_new_tokens={max_new_tokens}: send a shorter one)\n")
            continue
        with torch.no_grad(), loaded.autocast():
            out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        streamer=_Streamer(tok, output_stream),
                                        **sampling(temperature, top_p, max_new_tokens, tok.pad_token_id))
        answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": answer})
