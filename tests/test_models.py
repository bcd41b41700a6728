import logging

import pytest

from loralab.config import ModelConfig
from loralab.errors import LoralabError
from loralab.models import load_tokenizer, resolve_model_path
from tiny_tokenizer import tiny_tokenizer


def test_missing_pad_token_is_set_to_eos_and_said(tmp_path, caplog):
    tiny_tokenizer(pad=False).save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="loralab"):
        tokenizer = load_tokenizer(ModelConfig(path=str(tmp_path)))
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert "no pad token" in caplog.text and "</s>" in caplog.text


def test_model_paths():
    assert resolve_model_path("package:loralab/demo").endswith("loralab/demo")
    with pytest.raises(LoralabError, match="not installed"):
        resolve_model_path("package:no_such_module_xyz/model")
    with pytest.raises(LoralabError, match="model folder not found"):
        resolve_model_path("./no/such/folder")
    assert resolve_model_path("org/some-model") == "org/some-model"  # a hub id goes to transformers as is
