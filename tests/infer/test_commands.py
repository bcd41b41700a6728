"""chat, generate, eval, predict and merge end to end on adapters trained here on tiny models."""

import io
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import loralab.infer.generate as generate_module
from loralab.cli import USER_ERROR, main
from loralab.errors import LoralabError
from loralab.infer.load import load_for_inference
from run_helpers import SENTIMENT, write_config, write_jsonl

QA = [{"instruction": "What is the capital of France?", "input": "", "output": "Paris is the capital."},
      {"instruction": "Give three tips", "input": "", "output": "Eat well, sleep enough."}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dirs):
    """An sft adapter that has memorised two answers, a 2-class and a 3-class classifier on the same base, a tagger
    and a generate-classifier."""
    root = tmp_path_factory.mktemp("trained")
    runs = {}
    sft = write_jsonl(root / "qa.jsonl", QA * 4)
    cls = write_jsonl(root / "cls.jsonl", [{"text": t, "label": lab} for t, lab in SENTIMENT * 4])
    topics = [("paris london rome", "city"), ("red blue green", "colour"), ("cat dog cow", "animal")]
    cls3 = write_jsonl(root / "cls3.jsonl", [{"text": t, "label": lab} for t, lab in topics * 6])
    tags = write_jsonl(root / "tags.jsonl", [{"tokens": ["Paris", "is", "nice"], "tags": ["B-LOC", "O", "O"]},
                                             {"tokens": ["hello", "world"], "tags": ["O", "O"]}] * 6)
    specs = {
        "sft": dict(task="sft", model={"path": str(model_dirs["llama"])}, lora={"r": 8, "target_modules": "all-linear"},
                    data={"train": str(sft), "max_length": 64},
                    train={"epochs": 40, "batch_size": 4, "lr": 2e-2, "schedule": "constant"}),
        "cls": dict(task="classification", model={"path": str(model_dirs["bert"])}, data={"train": str(cls)},
                    train={"epochs": 8, "batch_size": 8, "lr": 1e-2}),
        "cls3": dict(task="classification", model={"path": str(model_dirs["bert"])}, data={"train": str(cls3)},
                     train={"epochs": 8, "batch_size": 6, "lr": 1e-2}),
        "tag": dict(task="tagging", model={"path": str(model_dirs["bert"])}, lora={"target_modules": "all-linear"},
                    data={"train": str(tags)}, train={"epochs": 20, "batch_size": 4, "lr": 1e-2}),
        "gc": dict(task="generate-classify", model={"path": str(model_dirs["bloom"])},
                   lora={"r": 8, "target_modules": "all-linear"}, data={"train": str(cls), "max_length": 32},
                   train={"epochs": 12, "batch_size": 4, "lr": 1e-2}, generate_classify={"max_new_tokens": 4}),
    }
    for name, spec in specs.items():
        config = write_config(root / f"{name}.yaml", name=name, output_dir=str(root / "runs"), **spec)
        assert main(["train", str(config)]) == 0
        runs[name] = root / "runs" / name / "adapter"
    runs.update(root=root, cls_data=cls, cls3_data=cls3, tag_data=tags)
    return runs


def test_generate_answers_with_the_training_template(trained, model_dirs, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": q["instruction"]} for q in QA] +
                          [{"messages": [{"role": "user", "content": "What is the capital of France?"}]}])
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(model_dirs["llama"]), "--adapter", str(trained["sft"]),
                 "--input", str(prompts), "--output", str(out), "--max-new-tokens", "24"]) == 0
    rows = [json.loads(line) for line in out.open()]
    assert [r["output"] for r in rows] == ["Paris is the capital.", "Eat well, sleep enough.",
                                           "Paris is the capital."]
    assert rows[0]["instruction"] == QA[0]["instruction"]  # the input fields are kept


def test_chat_streams_multi_turn_and_no_adapter_answers_differently(trained, model_dirs, monkeypatch, capsys):
    args = ["chat", "--model", str(model_dirs["llama"]), "--adapter", str(trained["sft"]), "--temperature", "0",
            "--max-new-tokens", "24"]
    script = "What is the capital of France?\nGive three tips\n/reset\nGive three tips\n/exit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    prompts = []
    real_prompt = generate_module.fitting_prompt
    monkeypatch.setattr(generate_module, "fitting_prompt",
                        lambda *a: prompts.append(real_prompt(*a)) or prompts[-1])
    assert main(args) == 0
    answers = [text.strip() for text in capsys.readouterr().out.split("> ")[1:]]  # an answer may be empty
    assert answers[0] == "Paris is the capital." and answers[2] == "(history cleared)"
    assert answers[3] == "Eat well, sleep enough."
    # the same question, asked after the first exchange, is asked with it (its prompt holds the whole first
    # prompt); after /reset, without
    first, with_history, after_reset = (p[0].tolist() for p in prompts)
    assert len(with_history) > len(after_reset) + len(first) // 2
    assert with_history[:len(first) - 3] == first[:-3]  # less the generation prompt's tokens
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n"))
    assert main([*args, "--no-adapter"]) == 0
    assert "Paris is the capital." not in capsys.readouterr().out


def test_merge_writes_a_plain_model_with_the_same_outputs(trained, model_dirs, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(model_dirs["llama"]), "--adapter", str(trained["sft"]),
                 "--output", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # transformers alone
    assert not any("lora" in k for k in merged.state_dict())
    loaded = load_for_inference(str(model_dirs["llama"]), {"default": str(trained["sft"])}, dtype="fp32")
    ids = torch.tensor([[5, 9, 30, 41, 7, 2]])
    with torch.no_grad():
        assert (merged(ids).logits - loaded.model(ids).logits).abs().max() <= 1e-5
    assert (out / "tokenizer_config.json").is_file() and (out / "model.safetensors").is_file()
    assert main(["merge", "--model", str(model_dirs["llama"]), "--adapter", str(trained["sft"]),
                 "--out", str(out)]) == USER_ERROR  # an existing folder is not overwritten unasked


def test_eval_and_predict_classification(trained, model_dirs, tmp_path, capsys):
    common = ["--model", str(model_dirs["bert"]), "--adapter", str(trained["cls"]), "--data", str(trained["cls_data"])]
    assert main(["eval", *common, "--output", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["accuracy"] == 1.0 and "macro_f1" in metrics
    assert main(["predict", *common, "--output", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").open()]
    assert all(r["prediction"] == r["label"] for r in rows)


def test_eval_and_predict_tagging_and_generate_classify(trained, model_dirs, tmp_path):
    common = ["--model", str(model_dirs["bert"]), "--adapter", str(trained["tag"]), "--data", str(trained["tag_data"])]
    assert main(["eval", *common, "--output", str(tmp_path / "t.json")]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["f1"] == 1.0
    assert main(["predict", *common, "--output", str(tmp_path / "t.jsonl")]) == 0
    first = json.loads((tmp_path / "t.jsonl").open().readline())
    assert first["prediction"] == ["B-LOC", "O", "O"]
    common = ["--model", str(model_dirs["bloom"]), "--adapter", str(trained["gc"]), "--data", str(trained["cls_data"])]
    assert main(["eval", *common, "--output", str(tmp_path / "g.json")]) == 0
    assert json.loads((tmp_path / "g.json").read_text())["accuracy"] == 1.0
    assert main(["predict", *common, "--output", str(tmp_path / "g.jsonl")]) == 0
    assert all(r["prediction"] == r["label"] for r in map(json.loads, (tmp_path / "g.jsonl").open()))


def test_several_adapters_on_one_base(trained, model_dirs, tmp_path):
    # the sft adapter twice under two names, plus a weighted combination: same base, per-call choice
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"instruction": QA[0]["instruction"]}])
    base = ["generate", "--model", str(model_dirs["llama"]), "--adapter", f"a={trained['sft']}",
            "--adapter", f"b={trained['sft']}", "--input", str(prompts), "--max-new-tokens", "24"]
    for extra in (["--use", "b"], ["--combine", "a=0.5,b=0.5", "--combination", "cat"]):
        assert main([*base, *extra, "--output", str(tmp_path / "o.jsonl")]) == 0
        assert json.loads((tmp_path / "o.jsonl").read_text())["output"] == "Paris is the capital."


def test_classifiers_with_different_label_counts_share_one_base(trained, model_dirs, tmp_path):
    # each adapter brings its own head: switching adapters switches the labels, and every prediction is the one
    # the adapter gives when loaded alone
    base = str(model_dirs["bert"])
    both = load_for_inference(base, {"sentiment": str(trained["cls"]), "topic": str(trained["cls3"])})
    alone = {name: load_for_inference(base, {name: str(trained[key])})
             for name, key in (("sentiment", "cls"), ("topic", "cls3"))}
    inputs = {k: v for k, v in both.tokenizer(["good great", "red blue"], return_tensors="pt", padding=True).items()
              if k != "token_type_ids"}
    for name, n_labels in (("topic", 3), ("sentiment", 2), ("topic", 3)):
        both.use(name)
        with torch.no_grad():
            logits = both.model(**inputs).logits
            expected = alone[name].model(**inputs).logits
        assert logits.shape == (2, n_labels) and both.model.config.num_labels == n_labels
        torch.testing.assert_close(logits, expected)
        assert both.settings.labels == alone[name].settings.labels
    with pytest.raises(LoralabError, match="did you mean 'topic'"):
        both.use("topci")
    common = ["--model", str(model_dirs["bert"]), "--adapter", f"sentiment={trained['cls']}",
              "--adapter", f"topic={trained['cls3']}"]
    for use, data in (("topic", trained["cls3_data"]), ("sentiment", trained["cls_data"])):
        out = tmp_path / f"{use}.jsonl"
        assert main(["predict", *common, "--use", use, "--data", str(data), "--output", str(out)]) == 0
        assert all(r["prediction"] == r["label"] for r in map(json.loads, out.open()))
    mixed = ["--adapter", f"sentiment={trained['cls']}", "--adapter", f"tags={trained['tag']}"]
    assert main(["predict", "--model", str(model_dirs["bert"]), *mixed, "--data", str(trained["cls_data"]),
                 "--output", str(tmp_path / "x.jsonl")]) == USER_ERROR


@pytest.mark.parametrize("case", ["other_base", "empty_prompts", "unknown_name", "no_tokenizer", "no_adapter_dir",
                                  "answer_past_positions", "bad_weight", "unknown_combined", "damaged_settings",
                                  "output_is_a_folder", "template_error"])
def test_bad_inference_inputs(trained, model_dirs, tmp_path, capsys, case):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    model, adapter, extra = str(model_dirs["llama"]), str(trained["sft"]), []
    if case == "other_base":
        model = str(model_dirs["bloom"])
        expected = "trained on a 'llama' model, but the base model is 'bloom'"
    elif case == "empty_prompts":
        prompts.write_text("")
        expected = "the data file is empty"
    elif case == "unknown_name":
        extra = ["--use", "nope"]
        expected = "no adapter is named 'nope'"
    elif case == "no_tokenizer":
        bare = tmp_path / "bare"
        AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).save_pretrained(bare)
        model, adapter = str(bare), str(tmp_path / "adapter_only")
        (tmp_path / "adapter_only").mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors", "loralab.json"):
            (tmp_path / "adapter_only" / f).write_bytes((trained["sft"] / f).read_bytes())
        expected = "cannot load a tokenizer"
    elif case == "answer_past_positions":  # the tiny llama handles 2048 positions
        prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"prompt": "hi " * 3000}])
        extra = ["--max-new-tokens", "16"]
        expected = "p.jsonl:2: this prompt is"
    elif case in ("bad_weight", "unknown_combined"):
        extra = ["--combine", "default=abc" if case == "bad_weight" else "default=0.5,other=0.5"]
        expected = "'default=abc' is not name=weight" if case == "bad_weight" else "no adapter is named 'other'"
    elif case == "output_is_a_folder":
        (tmp_path / "o.jsonl").mkdir()
        expected = "o.jsonl: field '--output': the output path is a folder"
    elif case == "template_error":
        extra = ["--template", "{% for m in messages %}{{ m.content.__class__.__mro__ }}{% endfor %}"]
        expected = "the chat template fails"
    elif case == "damaged_settings":
        adapter = str(tmp_path / "damaged")
        (tmp_path / "damaged").mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "tokenizer.json"):
            if (trained["sft"] / f).is_file():
                (tmp_path / "damaged" / f).write_bytes((trained["sft"] / f).read_bytes())
        (tmp_path / "damaged" / "loralab.json").write_text('{"task": "sft", ')
        expected = "damaged/loralab.json: cannot read the adapter's inference settings"
    else:
        adapter = str(tmp_path / "missing")
        expected = "adapter folder not found"
    code = main(["generate", "--model", model, "--adapter", adapter, "--input", str(prompts),
                 "--output", str(tmp_path / "o.jsonl"), *extra])
    err = capsys.readouterr().err
    assert code == USER_ERROR and expected in err and "Traceback" not in err
    assert not (tmp_path / "o.jsonl").is_file()


def test_no_chat_template_anywhere_is_a_clear_error():
    from loralab.infer.generate import chat_template
    from loralab.infer.load import Loaded
    from loralab.infer.settings import InferenceSettings
    from tiny_tokenizer import tiny_tokenizer

    loaded = Loaded(model=None, tokenizer=tiny_tokenizer(chat_template=None), settings=InferenceSettings(),
                    device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(Exception, match="neither the adapter nor the tokenizer has a chat template"):
        chat_template(loaded)
    assert "### Instruction" in chat_template(loaded, "alpaca")


def test_chat_drops_the_oldest_exchanges_to_fit_the_positions():
    from types import SimpleNamespace

    from loralab.data.templates import encode_prompt
    from loralab.infer.generate import fitting_prompt
    from loralab.infer.load import Loaded
    from loralab.infer.settings import InferenceSettings
    from tiny_tokenizer import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    jinja = tokenizer.chat_template
    history = [{"role": "user", "content": "first question here"}, {"role": "assistant", "content": "an answer"},
               {"role": "user", "content": "second"}]
    whole, last = (len(encode_prompt(tokenizer, jinja, turns)) for turns in (history, history[2:]))

    def prompt(limit, kept):
        model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=limit))
        loaded = Loaded(model=model, tokenizer=tokenizer, settings=InferenceSettings(), device=torch.device("cpu"),
                        dtype=torch.float32)
        return fitting_prompt(loaded, jinja, None, kept, 8)

    kept = list(history)
    assert prompt(whole + 8, kept).shape[1] == whole and kept == history  # fits: kept whole
    assert prompt(whole + 7, kept).shape[1] == last and kept == history[2:]  # the first exchange goes
    assert prompt(last + 7, kept) is None and kept == history[2:]  # the message alone does not fit
