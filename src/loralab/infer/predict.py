"""`loralab eval` (the training metrics on a labelled file) and `loralab predict` (a predictions file)."""

from __future__ import annotations

from pathlib import Path

from loralab.config import DataConfig, GenerateClassifyConfig, RunConfig, TrainConfig
from loralab.data.records import Record, read_records
from loralab.data.templates import encode_prompt
from loralab.errors import LoralabError
from loralab.infer.generate import check_output_file, prompt_turns, write_jsonl_atomically
from loralab.infer.load import Loaded
from loralab.tasks import get_task
from loralab.tasks.evaluation import batches, generate
from loralab.tasks.generate_classify import fit_prompt
from loralab.tasks.metrics import bio_entities


def run_config(loaded: Loaded, path: str, columns: dict | None, batch_size: int) -> RunConfig:
    """The settings training used, as a config the task functions understand."""
    s = loaded.settings
    data = DataConfig(train=path, columns=columns or {}, template=s.template or "auto", system=s.system,
                      max_length=s.max_length, labels=s.labels if get_task(s.task).LABELLED else None)
    return RunConfig(task=s.task, data=data, train=TrainConfig(eval_batch_size=batch_size),
                     generate_classify=GenerateClassifyConfig(max_new_tokens=s.max_new_tokens))


def evaluate_file(loaded: Loaded, path: str, columns: dict | None = None, batch_size: int = 32) -> dict:
    """The task's metrics on a labelled file, computed exactly as during training."""
    config = run_config(loaded, path, columns, batch_size)
    records = read_records(path, config.data.columns)
    task = get_task(config.task)
    data = task.prepare(config, loaded.tokenizer, records, records)
    return task.evaluate(loaded.model, loaded.tokenizer, data, config, loaded.device, loaded.autocast())


def predict_file(loaded: Loaded, path: str, output: str, columns: dict | None = None, batch_size: int = 32) -> int:
    """Write each record with a "prediction": a label, tags per word, spans, or generated text."""
    check_output_file(Path(output))
    config = run_config(loaded, path, columns, batch_size)
    records = read_records(path, config.data.columns)
    task = config.task
    if task == "classification":
        predictions = predict_classes(loaded, records, config)
    elif task == "tagging":
        predictions = predict_tags(loaded, records, config)
    elif task == "generate-classify":
        prompts = [{"input_ids": fit_prompt(encode_prompt(loaded.tokenizer, config.data.template,
                                                          prompt_turns(r, config.data.system)),
                                            config.data.max_length - config.generate_classify.max_new_tokens)}
                   for r in records]
        predictions = generate(loaded.model, loaded.tokenizer, prompts, batch_size,
                               config.generate_classify.max_new_tokens, loaded.device, loaded.autocast())
    else:
        raise LoralabError("predict is for classification, tagging and generate-classify adapters",
                           field="--adapter", fix="use `loralab generate` for sft adapters")
    write_jsonl_atomically(Path(output),
                           [{**r.data, "prediction": p} for r, p in zip(records, predictions, strict=True)])
    return len(records)


def _logits(loaded: Loaded, examples: list[dict], batch_size: int):
    for _, output in batches(loaded.model, examples, loaded.tokenizer.pad_token_id, batch_size, loaded.device,
                             loaded.autocast()):
        yield output.logits


def predict_classes(loaded: Loaded, records: list[Record], config: RunConfig) -> list[str]:
    labels = config.data.labels
    examples = []
    for r in records:
        encoded = loaded.tokenizer(r.get("text"), r.get("text_pair", required=False), truncation=True,
                                   max_length=config.data.max_length)
        examples.append({k: v for k, v in encoded.items() if k in ("input_ids", "token_type_ids")})
    return [labels[i] for logits in _logits(loaded, examples, config.train.eval_batch_size)
            for i in logits.argmax(-1).tolist()]


def predict_tags(loaded: Loaded, records: list[Record], config: RunConfig) -> list:
    """tokens records -> one tag per word; text records -> spans [start, end, label] in characters."""
    tok, labels = loaded.tokenizer, config.data.labels
    fmt = "tokens" if "tokens" in records[0].data else "text"
    if fmt == "tokens":
        encoded = [tok([str(w) for w in r.get("tokens", list)], is_split_into_words=True, truncation=True,
                       max_length=config.data.max_length) for r in records]
    else:
        encoded = [tok(r.get("text"), truncation=True, max_length=config.data.max_length,
                       return_offsets_mapping=True) for r in records]
    examples = [{"input_ids": e["input_ids"]} for e in encoded]
    rows = [row for logits in _logits(loaded, examples, config.train.eval_batch_size) for row in logits.argmax(-1)]
    out = []
    for r, e, row in zip(records, encoded, rows, strict=True):
        tags = [labels[i] for i in row.tolist()]
        if fmt == "tokens":
            words = len(r.get("tokens", list))
            per_word = ["O"] * words
            seen = set()
            for position, word in enumerate(e.word_ids()):
                if word is not None and word not in seen:
                    seen.add(word)
                    per_word[word] = tags[position]
            out.append(per_word)
        else:
            offsets = e["offset_mapping"]
            scored = [i for i, (a, b) in enumerate(offsets) if a != b]
            chunks = bio_entities([tags[i] for i in scored])
            out.append(sorted([offsets[scored[s]][0], offsets[scored[t]][1], kind] for kind, s, t in chunks))
    return out

