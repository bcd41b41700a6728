import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Tiny model folders (weights + tokenizer) as users have them on disk: causal llama and bloom, a bert encoder
    saved without any head (so the classification head is missing from the checkpoint, as with MiniLM)."""
    from tiny_models import tiny_model
    from tiny_tokenizer import tiny_tokenizer

    root = tmp_path_factory.mktemp("models")
    tokenizer = tiny_tokenizer()
    dirs = {}
    for name, model_type, head in (("llama", "llama", "causal"), ("bloom", "bloom", "causal"),
                                   ("qwen2", "qwen2", "causal"), ("bert", "bert", "base")):
        model = tiny_model(model_type, head=head, vocab_size=len(tokenizer), initializer_range=0.2)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs
