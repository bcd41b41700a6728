"""/v1/classify on a server of classification adapters, each with its own head and labels."""

import json

import pytest
import torch

from loralab import LoraConfig, apply_lora, save_adapter
from loralab.infer.load import load_for_inference
from tiny_models import tiny_model

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from loralab.serve.app import create_app  # noqa: E402


def classifier(folder, labels, seed):
    model = tiny_model("bert")  # the shapes of the tiny base folder's encoder
    model.classifier = torch.nn.Linear(model.config.hidden_size, len(labels))
    model.config.num_labels = len(labels)
    apply_lora(model, LoraConfig(r=2, modules_to_save=["classifier"]))
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "modules_to_save" in name:
            p.data.normal_(0, 1.0)
    save_adapter(model, folder)
    (folder / "loralab.json").write_text(json.dumps({"task": "classification", "labels": labels}))
    return str(folder)


def test_classify_gives_each_adapters_labels_and_scores(tmp_path, model_dirs):
    adapters = {"sentiment": classifier(tmp_path / "s", ["negative", "positive"], 1),
                "topic": classifier(tmp_path / "t", ["animal", "city", "colour"], 2)}
    loaded = load_for_inference(str(model_dirs["bert"]), adapters, device="cpu")
    alone = load_for_inference(str(model_dirs["bert"]), {"topic": adapters["topic"]}, device="cpu")
    with TestClient(create_app(loaded, "bert")) as client:
        for name, labels in (("topic", ["animal", "city", "colour"]), ("sentiment", ["negative", "positive"])):
            response = client.post("/v1/classify", json={"model": name, "input": ["red blue", "cat dog"]})
            assert response.status_code == 200
            rows = response.json()["data"]
            assert len(rows) == 2 and all(set(r["scores"]) == set(labels) and r["label"] in labels for r in rows)
            assert all(abs(sum(r["scores"].values()) - 1) < 1e-4 for r in rows)
            if name == "topic":  # the scores of the adapter loaded alone
                batch = alone.tokenizer(["red blue", "cat dog"], padding=True, return_tensors="pt")
                with torch.no_grad():
                    expected = torch.softmax(alone.model(**batch).logits, -1)
                got = torch.tensor([[r["scores"][label] for label in labels] for r in rows])
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        assert client.post("/v1/classify", json={"model": "bert", "input": "x"}).status_code == 400
        assert client.post("/v1/classify", json={"model": "topci", "input": "x"}).status_code == 404
        assert client.post("/v1/classify", json={"model": "topic", "input": []}).status_code == 400


def test_classify_on_a_tagging_adapter_gives_spans(tmp_path, model_dirs):
    from transformers import AutoModelForTokenClassification

    labels = ["B-LOC", "I-LOC", "O"]
    tagger = AutoModelForTokenClassification.from_pretrained(str(model_dirs["bert"]), num_labels=len(labels))
    apply_lora(tagger, LoraConfig(r=2, modules_to_save=["classifier"]))
    with torch.no_grad():
        tagger.classifier.modules_to_save["default"].bias.copy_(torch.tensor([5.0, 0.0, 0.0]))  # tags all B-LOC
    save_adapter(tagger, tmp_path / "tags")
    (tmp_path / "tags" / "loralab.json").write_text(json.dumps({"task": "tagging", "labels": labels}))
    loaded = load_for_inference(str(model_dirs["bert"]), {"places": str(tmp_path / "tags")}, device="cpu")
    with TestClient(create_app(loaded, "bert")) as client:
        rows = client.post("/v1/classify", json={"model": "places", "input": "paris rome"}).json()["data"]
    spans = rows[0]["spans"]
    assert spans and all(s["label"] == "LOC" and "paris rome"[s["start"]:s["end"]] == s["text"] for s in spans)
