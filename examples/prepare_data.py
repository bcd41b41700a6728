"""Build the small data sets under data/ from the public copies in ../shared/data (run once; outputs committed).

    python examples/prepare_data.py ../shared/data

- data/rams/{train,dev}.jsonl: RAMS event-argument extraction as tokens + BIO tags. Each document's tokens are
  flattened, the event trigger is wrapped in <t> ... </t> marker tokens (so the tagger knows which event), and each
  argument span gets B-/I-<role> (role = the part after "argNN", e.g. victim). RAMS may give one span two roles;
  BIO needs one, so the first listed is kept. 700 documents for training, the other 224 for evaluation.
- data/huanhuan/huanhuan_600.json: the first 600 records of huanhuan.json (alpaca format, Chinese role-play).
- data/advertisegen/advertisegen_400.jsonl: the first 400 AdvertiseGen lines {content, summary}.
- data/sst2_text/{train,dev}.jsonl: SST-2 with the labels written as words (negative / positive), for
  classification by generation: 600 sentences from the demo's training file, 200 from the GLUE dev set.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "data"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{path}: {len(rows)} records")


def rams_document(doc: dict) -> tuple[dict, int]:
    tokens = [t for sentence in doc["sentences"] for t in sentence]
    tags = ["O"] * len(tokens)
    dropped = 0
    for _, (start, end), role in doc["gold_evt_links"]:
        if any(tag != "O" for tag in tags[start:end + 1]):
            dropped += 1
            continue
        name = re.sub(r"^evt\d+arg\d+", "", role)
        tags[start:end + 1] = [f"B-{name}"] + [f"I-{name}"] * (end - start)
    t_start, t_end = doc["evt_triggers"][0][:2]
    tokens = tokens[:t_start] + ["<t>"] + tokens[t_start:t_end + 1] + ["</t>"] + tokens[t_end + 1:]
    tags = tags[:t_start] + ["O"] + tags[t_start:t_end + 1] + ["O"] + tags[t_end + 1:]
    return {"tokens": tokens, "tags": tags}, dropped


def main(shared: Path) -> None:
    docs = [json.loads(line) for line in (shared / "rams/dev.jsonlines").open(encoding="utf-8")]
    converted = [rams_document(d) for d in docs]
    print(f"RAMS: {sum(d for _, d in converted)} argument roles dropped as second roles of a span")
    write_jsonl(ROOT / "rams/train.jsonl", [r for r, _ in converted[:700]])
    write_jsonl(ROOT / "rams/dev.jsonl", [r for r, _ in converted[700:]])

    huanhuan = json.loads((shared / "huanhuan/huanhuan.json").read_text(encoding="utf-8"))[:600]
    (ROOT / "huanhuan").mkdir(parents=True, exist_ok=True)
    (ROOT / "huanhuan/huanhuan_600.json").write_text(json.dumps(huanhuan, ensure_ascii=False, indent=1),
                                                      encoding="utf-8")
    lines = (shared / "advertisegen/dev.json").read_text(encoding="utf-8").splitlines()[:400]
    write_jsonl(ROOT / "advertisegen/advertisegen_400.jsonl", [json.loads(line) for line in lines])

    demo = Path(__file__).resolve().parent.parent / "src/loralab/demo/sst2"
    words = {"0": "negative", "1": "positive"}
    for name, source, n in (("train", "train.tsv", 600), ("dev", "validation.tsv", 200)):
        with open(demo / source, encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]
        write_jsonl(ROOT / f"sst2_text/{name}.jsonl",
                    [{"text": r["sentence"].strip(), "label": words[r["label"]]} for r in rows])


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"))
