"""`loralab serve` as users use it: the official openai client against a real server on loopback."""

import json
import socket
import threading
import time

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from loralab import LoraConfig, apply_lora, save_adapter
from loralab.infer.generate import generate_file
from loralab.infer.load import load_for_inference

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from loralab.serve.app import create_app  # noqa: E402

KEY = "test-key"


def randomized_adapter(base, folder, seed):
    model = apply_lora(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules="all-linear"))
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # B starts at zero: make each adapter answer differently
    save_adapter(model, folder)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dirs):
    root = tmp_path_factory.mktemp("serve")
    base = str(model_dirs["llama"])
    adapters = {"sql": str(randomized_adapter(base, root / "sql", 1)),
                "chat": str(randomized_adapter(base, root / "chat", 2))}
    loaded = load_for_inference(base, adapters, device="cpu")
    app = create_app(loaded, "base", api_key=KEY, max_batch=8, max_waiting=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    yield {"client": client, "url": f"http://127.0.0.1:{port}", "base": base, "adapters": adapters, "root": root,
           "engine": app.state.engine}
    server.should_exit = True
    thread.join(timeout=10)


def reference_answer(base, adapters, name, prompt, max_tokens):
    """`loralab generate` with the same adapter, greedy."""
    folder = adapters[name]
    loaded = load_for_inference(base, {name: folder}, device="cpu")
    tmp = json.dumps({"messages": [{"role": "user", "content": prompt}]})
    path = folder + "-prompts.jsonl"
    with open(path, "w") as f:
        f.write(tmp + "\n")
    generate_file(loaded, path, folder + "-answers.jsonl", batch_size=1, max_new_tokens=max_tokens)
    with open(folder + "-answers.jsonl") as f:
        return json.loads(f.readline())["output"]


def test_models_lists_the_base_and_each_adapter(server):
    assert [m.id for m in server["client"].models.list().data] == ["base", "sql", "chat"]


def test_each_adapter_answers_as_loralab_generate_does_and_requests_switch_adapters(server):
    client = server["client"]
    answers = {}
    for name in ("sql", "chat", "sql"):
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hello there"}],
                                               max_tokens=12, temperature=0)
        answers.setdefault(name, reply.choices[0].message.content)
        assert reply.choices[0].message.content == answers[name]
    assert answers["sql"] != answers["chat"]
    for name in ("sql", "chat"):
        assert answers[name] == reference_answer(server["base"], server["adapters"], name, "hello there", 12)


def test_concurrent_requests_for_mixed_adapters_share_batches_and_keep_their_answers(server):
    # prompts of different lengths: prefilled together, left-padded, each row with its own adapter
    client = server["client"]
    prompts = {"base": "hi", "sql": "tell me more about it please", "chat": "x y"}

    def answer(name):
        return client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompts[name]}],
                                              max_tokens=10, temperature=0).choices[0].message.content

    alone = {name: answer(name) for name in prompts}
    results = {}

    def ask(i, name):
        results[i] = (name, answer(name))

    threads = [threading.Thread(target=ask, args=(i, ["base", "sql", "chat"][i % 3])) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(text == alone[name] for name, text in results.values())
    health = httpx.get(server["url"] + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert health["largest_batch"] > 1  # decoded together, not one at a time


def test_streaming_chat_and_completions(server):
    client = server["client"]
    full = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "stream"}],
                                          max_tokens=8, temperature=0).choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "stream"}], max_tokens=8, temperature=0, stream=True)]
    assert "".join(pieces) == full
    completion = client.completions.create(model="sql", prompt="SELECT", max_tokens=6, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="sql", prompt="SELECT", max_tokens=6, temperature=0, stream=True))
    assert streamed == completion.choices[0].text
    assert completion.usage.completion_tokens <= 6


def test_sampling_with_a_seed_repeats_and_n_gives_several_choices(server):
    client = server["client"]
    ask = dict(model="chat", messages=[{"role": "user", "content": "x"}], max_tokens=8, temperature=1.0, seed=7, n=2)
    first, second = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
    assert len(first.choices) == 2
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]


def test_stop_strings_cut_the_answer(server):
    client = server["client"]
    full = client.completions.create(model="sql", prompt="a", max_tokens=12, temperature=0).choices[0].text
    assert len(full) > 2
    stop = full[1:3]
    cut = client.completions.create(model="sql", prompt="a", max_tokens=12, temperature=0, stop=[stop]).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"


@pytest.mark.parametrize("case", ["unknown_model", "negative_max_tokens", "too_long", "bad_stop", "no_key",
                                  "malformed_json"])
def test_bad_requests_get_openai_style_errors_and_the_server_goes_on(server, case):
    client = server["client"]
    messages = [{"role": "user", "content": "hi"}]
    if case == "malformed_json":
        response = httpx.post(server["url"] + "/v1/chat/completions", content=b"{not json",
                              headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        assert response.status_code == 400 and "message" in response.json()["error"]
    elif case == "no_key":
        response = httpx.get(server["url"] + "/v1/models")
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    else:
        kwargs = {"unknown_model": dict(model="sqll"), "negative_max_tokens": dict(max_tokens=-3),
                  "too_long": dict(messages=[{"role": "user", "content": "word " * 2000}]),
                  "bad_stop": dict(stop=["a", "b", "c", "d", "e"])}[case]
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(**{"model": "chat", "messages": messages, "max_tokens": 4, **kwargs})
        assert err.value.status_code == (404 if case == "unknown_model" else 400)
        assert err.value.body["message"]
    assert client.chat.completions.create(model="chat", messages=messages, max_tokens=2).choices  # still serving


def test_a_full_queue_answers_429_and_loses_nothing(server):
    client = server["client"].with_options(timeout=60)
    codes, texts = [], []

    def ask():
        try:
            texts.append(client.completions.create(model="base", prompt="q", max_tokens=4).choices[0].text)
            codes.append(200)
        except openai.RateLimitError:
            codes.append(429)

    engine = server["engine"]
    with engine.lock:  # the engine stalls at its next forward pass: requests pile up (at most 8 wait)
        threads = [threading.Thread(target=ask) for _ in range(14)]
        for t in threads:
            t.start()
        deadline = time.time() + 20
        while codes.count(429) < 5 and time.time() < deadline:
            time.sleep(0.05)
    for t in threads:
        t.join()
    assert codes.count(429) == 5 and codes.count(200) == 9 == len(texts)  # 1 decoding + 8 waiting, all answered


def test_the_documented_client_snippet_runs(server, capsys):
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "serving.md").read_text(encoding="utf-8")
    snippet = doc.split("```python\n")[1].split("```")[0]
    exec(snippet.replace("http://127.0.0.1:8000", server["url"]).replace('"KEY"', f'"{KEY}"'), {})
    assert capsys.readouterr().out.endswith("\n")  # the answer was printed


def test_adapters_load_and_unload_while_serving_and_a_failed_load_changes_nothing(server, tmp_path):
    client, headers = server["client"], {"Authorization": f"Bearer {KEY}"}
    extra = randomized_adapter(server["base"], tmp_path / "extra", 3)
    before = [m.id for m in client.models.list().data]
    bad = httpx.post(server["url"] + "/admin/adapters", json={"name": "broken", "path": str(tmp_path / "nope")},
                     headers=headers)
    assert bad.status_code == 400 and [m.id for m in client.models.list().data] == before
    assert httpx.post(server["url"] + "/admin/adapters", json={"name": "sql", "path": str(extra)},
                      headers=headers).status_code == 409
    assert httpx.post(server["url"] + "/admin/adapters", json={"name": "extra", "path": str(extra)},
                      headers=headers).status_code == 200
    assert [m.id for m in client.models.list().data] == [*before, "extra"]
    answer = client.chat.completions.create(model="extra", messages=[{"role": "user", "content": "hello there"}],
                                            max_tokens=8, temperature=0).choices[0].message.content
    assert answer == reference_answer(server["base"], {"extra": str(extra)}, "extra", "hello there", 8)
    assert httpx.delete(server["url"] + "/admin/adapters/extra", headers=headers).status_code == 200
    assert [m.id for m in client.models.list().data] == before
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="extra", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert httpx.delete(server["url"] + "/admin/adapters/base", headers=headers).status_code == 400
    assert httpx.delete(server["url"] + "/admin/adapters/extra").status_code == 401


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    engine, headers = server["engine"], {"Authorization": f"Bearer {KEY}"}
    body = {"model": "chat", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 60, "stream": True,
            "temperature": 1.0, "seed": 1}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body, headers=headers) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                break  # one piece of text, then the client goes away
    deadline = time.time() + 20
    while engine.active and time.time() < deadline:
        time.sleep(0.05)
    assert not engine.active  # cancelled, not decoded to its 60 tokens for nobody
