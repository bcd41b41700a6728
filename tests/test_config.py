import pytest

from loralab.config import RunConfig, load_config
from loralab.errors import LoralabError

BASE = ["model.path=m", "data.train=t.jsonl"]


def test_yaml_and_dotted_overrides_become_typed_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task: classification\nlora:\n  r: 4\n  target_modules: [query, value]\ntrain:\n  lr: 2e-4\n")
    config = load_config(path, [*BASE, "lora.r=16", "train.warmup=0.1", "data.columns.text=sentence"])
    assert isinstance(config, RunConfig) and config.task == "classification"
    assert config.lora.r == 16 and config.lora.target_modules == ["query", "value"]
    assert config.train.lr == 2e-4 and isinstance(config.train.lr, float)  # YAML reads 2e-4 as text
    assert config.data.columns == {"text": "sentence"}
    assert load_config(None, [*BASE, "train.compile=model"]).train.compile == "model"
    assert load_config(None, [*BASE, "train.compile=true"]).train.compile is True


@pytest.mark.parametrize("override,field,fix", [
    ("lora.rank=4", "lora.rank", "did you mean 'r'?"),
    ("train.learning_rate=1", "train.learning_rate", "did you mean 'lr'?"),
    ("train.batchsize=4", "train.batchsize", "did you mean 'batch_size'?"),
    ("method=qlora", "method", "did you mean 'lora'?"),
    ("train.epochs=many", "train.epochs", None),
    ("train.lr=0", "train.lr", "2e-4"),
    ("lora.alpha=-1", "lora.alpha", None),
    ("data.validation_fraction=1.5", "data.validation_fraction", None),
    ("train.gradient_checkpointing=-2", "train.gradient_checkpointing", "every N-th layer"),
    ("train.gradient_checkpointing=sometimes", "train.gradient_checkpointing", None),
    ("train.batch_size=big", "train.batch_size", "int or auto"),
    ("train.compile=whole", "train.compile", "bool or model"),
    ("train.compile=true train.gradient_checkpointing=2", "train.compile", "use one"),
    ("train.compile=model train.gradient_checkpointing=true", "train.compile", "use one"),
    ("train.compile=model distributed=fsdp", "train.compile", "train.compile=true"),
])
def test_bad_keys_and_values_name_the_key_and_suggest(override, field, fix):
    with pytest.raises(LoralabError) as err:
        load_config(None, [*BASE, *override.split()])
    assert err.value.field == field
    if fix:
        assert fix in err.value.fix


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("task: sft\nlora:\n  r: [4\n")
    with pytest.raises(LoralabError) as err:
        load_config(path)
    assert err.value.file == str(path) and "not valid YAML" in str(err.value)


def test_model_and_data_are_required():
    with pytest.raises(LoralabError, match="no model given"):
        load_config(None, ["data.train=x"])
