"""Writing data files and configs for end-to-end runs."""

import json

import yaml

SENTIMENT = [("good great fine", "positive"), ("bad awful poor", "negative"), ("great good", "positive"),
             ("awful bad", "negative"), ("fine great", "positive"), ("poor awful", "negative")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_config(path, **sections):
    path.write_text(yaml.safe_dump(sections), encoding="utf-8")
    return path
