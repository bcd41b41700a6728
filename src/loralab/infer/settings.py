"""What inference must repeat from training (task, chat template, labels), kept beside the adapter in loralab.json.

PEFT ignores the file; without it (a PEFT adapter, a plain model) the task comes from the adapter's task_type and
the template from the tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from loralab.errors import LoralabError
from loralab.files import write_text_atomically

SETTINGS_NAME = "loralab.json"
TASK_TYPES = {"SEQ_CLS": "classification", "TOKEN_CLS": "tagging", "CAUSAL_LM": "sft"}


@dataclass
class InferenceSettings:
    task: str = "sft"
    template: str | None = None  # the Jinja source used in training; None: raw text
    system: str | None = None
    labels: list[str] | None = None
    max_length: int = 512
    max_new_tokens: int = 16
    quantize: str = "none"  # the frozen base as training saw it (model.quantize): inference loads it the same way


def save_inference_settings(folder: Path, config, data) -> None:
    settings = InferenceSettings(task=config.task, template=data.extra.get("template"), system=config.data.system,
                                 labels=data.labels, max_length=config.data.max_length,
                                 max_new_tokens=config.generate_classify.max_new_tokens,
                                 quantize=config.model.quantize)
    write_text_atomically(folder / SETTINGS_NAME, json.dumps(asdict(settings), indent=2, ensure_ascii=False) + "\n")


def read_inference_settings(folder: str | Path | None) -> InferenceSettings | None:
    if folder is None:
        return None
    path = Path(folder) / SETTINGS_NAME
    if path.is_file():
        try:
            return InferenceSettings(**json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as e:  # damaged JSON, or keys this version does not know
            raise LoralabError(f"cannot read the adapter's inference settings ({e})", file=str(path),
                               fix="restore the file from the run's adapter/ folder, or delete it to fall back "
                                   "on adapter_config.json") from None
    config = Path(folder) / "adapter_config.json"
    if config.is_file():
        task_type = json.loads(config.read_text(encoding="utf-8")).get("task_type")
        return InferenceSettings(task=TASK_TYPES.get(task_type, "sft"))
    return None
