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
    ("train.compile=whole", "train.compile", None),
    ("train.max_new_tokens=4", "train.max_new_tokens", "rename it to generate_classify.max_new_tokens"),
    ("train.compile=true train.gradient_checkpointing=2", "train.compile", "use one"),
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


def _numeric_fields(cls, prefix=""):
    """(dotted key, field) for every number-valued setting, sections included."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _numeric_fields(hint, f"{prefix}{f.name}.")
        elif not {list, dict} & _flat(hint) and (int in _flat(hint) or float in _flat(hint)):
            yield f"{prefix}{f.name}", f


def _flat(hint):
    import typing

    args = typing.get_args(hint)
    return {hint} if not args else {a for arg in args for a in _flat(arg)} | {typing.get_origin(hint)}


def test_every_numeric_setting_declares_its_range():
    from loralab.config import RunConfig

    unranged = [key for key, f in _numeric_fields(RunConfig) if "range" not in f.metadata
                and not key.startswith("lora.")]  # lora's are checked by LoraConfig itself
    assert unranged == [], unranged


def _out_of_range(f):
    from hypothesis import strategies as st

    low, high, low_open, high_open = f.metadata["range"]
    below = st.floats(max_value=low, exclude_max=not low_open, allow_nan=False) if low_open else \
        st.floats(max_value=low, exclude_max=True, allow_nan=False)
    options = [below, st.just(float("nan")), st.just(float("inf"))]
    if high is not None:
        options.append(st.floats(min_value=high, exclude_min=not high_open, allow_nan=False))
    values = st.one_of(options)
    return values.map(lambda v: int(v) if v == v and abs(v) != float("inf") and abs(v) < 2**62 and int(v) != low
                      and int(v) == v else v)


def test_out_of_range_values_are_refused_with_the_key_named():
    """Random out-of-range values for every ranged key: a clear error naming the key, never a silent run."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from loralab.config import RunConfig

    ranged = [(key, f) for key, f in _numeric_fields(RunConfig) if "range" in f.metadata]
    cases = st.sampled_from(ranged).flatmap(lambda kf: st.tuples(st.just(kf[0]), _out_of_range(kf[1])))

    @settings(max_examples=300, deadline=None)
    @given(cases)
    def check(case):
        key, value = case
        with pytest.raises(LoralabError) as error:
            load_config(None, [f"{key}={value!r}" if isinstance(value, int) else f"{key}={_yaml_float(value)}",
                               "model.path=m", "data.train=t.jsonl"])
        assert error.value.field == key  # a range error says the fix; a type error the type expected

    check()


def _yaml_float(value):
    if value != value:
        return ".nan"
    if abs(value) == float("inf"):
        return ".inf" if value > 0 else "-.inf"
    return repr(value)


@pytest.mark.parametrize("key", ["lora.r=0", "lora.r=-3", "lora.alpha=-1", "lora.alpha=.nan", "lora.dropout=1",
                                 "lora.dropout=-0.5"])
def test_out_of_range_lora_values_are_refused(key):
    with pytest.raises(LoralabError) as error:
        load_config(None, [key, "model.path=m", "data.train=t.jsonl"])
    assert error.value.field == key.split("=")[0]
