"""loralab: LoRA fine-tuning of transformer models, simple, fast and lean."""

from loralab.errors import LoralabError
from loralab.lora import *  # noqa: F403
from loralab.lora import __all__ as _lora_all

__version__ = "0.1.0"
__all__ = ["LoralabError", *_lora_all]
