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


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_asking_for_a_gpu_on_a_machine_without_one_is_a_clear_error(device):
    from loralab.errors import LoralabError
    from loralab.models import pick_device, usable_device

    assert pick_device(device).type == "cuda"  # planning for one needs none
    with pytest.raises(LoralabError, match="sees no GPU") as error:
        usable_device(device)
    assert error.value.field == "train.device"


def test_a_device_name_torch_does_not_know_is_a_clear_error():
    from loralab.errors import LoralabError
    from loralab.models import pick_device

    with pytest.raises(LoralabError, match="is not a device"):
        pick_device("gpu0")
