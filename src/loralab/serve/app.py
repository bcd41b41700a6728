"""`loralab serve`: an OpenAI-compatible HTTP server for a base model and its adapters, on FastAPI + uvicorn.

    loralab serve --model BASE --adapter sql=runs/sql/adapter --adapter chat=runs/chat/adapter --api-key KEY

The request's `model` field picks an adapter by name, or the base model by its name. Prompts are rendered with the
chat template and system prompt the adapter was trained with (its loralab.json), so served answers match
training. Requests for any mix of adapters share one batch (serve/engine.py).
"""

from __future__ import annotations

import asyncio
import json
import queue
import time
import uuid
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from loralab.data.records import Record
from loralab.data.templates import encode_prompt
from loralab.errors import LoralabError
from loralab.infer.generate import chat_template
from loralab.infer.load import Loaded, adapter_inference_settings
from loralab.infer.predict import predict_tags, run_config
from loralab.lora import delete_adapter, load_adapter
from loralab.serve.engine import Engine, QueueFull
from loralab.serve.engine import Request as Generation
from loralab.tasks import get_task
from loralab.tasks.evaluation import position_limit


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


class Message(BaseModel):
    role: str
    content: str


class Sampling(BaseModel):
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False


class ChatBody(Sampling):
    messages: list[Message]


class CompletionBody(Sampling):
    prompt: str | list[str]


class AdapterBody(BaseModel):
    name: str
    path: str


class ClassifyBody(BaseModel):
    model: str
    input: str | list[str]


@dataclass
class Choice:
    text: str
    finish_reason: str


def create_app(loaded: Loaded, base_name: str, api_key: str | None = None, max_batch: int = 32,
               max_waiting: int = 256, default_max_tokens: int = 256) -> FastAPI:
    """The FastAPI app; its engine thread starts with the app and stops with it."""
    tokenizer = loaded.tokenizer
    configured = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    eos = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    engine = Engine(loaded.model, {e for e in eos if e is not None}, loaded.device, max_batch, max_waiting,
                    loaded.autocast)
    limit = position_limit(loaded.model)
    app = FastAPI(title="loralab", on_startup=[engine.start], on_shutdown=[engine.stop])
    app.state.engine = engine

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return _error(ApiError(401, "invalid or missing API key", kind="authentication_error"))
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_request, error: ApiError):
        return _error(error)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(ApiError(400, f"{where or 'body'}: {first.get('msg', 'invalid request body')}", where))

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": len(engine.active), "waiting": engine.waiting.qsize(),
                "largest_batch": engine.largest_batch, "generated_tokens": engine.generated_tokens}

    @app.get("/v1/models")
    async def models():
        names = [base_name, *loaded.adapters]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "loralab"}
                                           for n in names]}

    def adapter_of(name: str) -> str | None:
        if name == base_name:
            return None
        if name not in loaded.adapters:
            raise ApiError(404, f"the model {name!r} does not exist: use one of "
                                f"{', '.join([base_name, *loaded.adapters])}", "model", "model_not_found")
        return name

    def check_sampling(body: Sampling, prompt_ids: list[list[int]]) -> tuple[int, list[str]]:
        max_tokens = body.max_tokens if body.max_tokens is not None else default_max_tokens
        if max_tokens < 1:
            raise ApiError(400, f"max_tokens must be 1 or more, got {max_tokens}", "max_tokens")
        if not 1 <= body.n <= 16:
            raise ApiError(400, f"n must be between 1 and 16, got {body.n}", "n")
        if body.temperature < 0 or not 0 < body.top_p <= 1:
            raise ApiError(400, "temperature must be >= 0 and top_p in (0, 1]", "temperature")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "stop takes up to 4 non-empty strings", "stop")
        for ids in prompt_ids:
            if not ids:
                raise ApiError(400, "the prompt is empty", "prompt")
            if limit and len(ids) + max_tokens > limit:
                raise ApiError(400, f"the prompt is {len(ids)} tokens; with max_tokens={max_tokens} it runs past the "
                                    f"model's {limit} positions", "max_tokens", "context_length_exceeded")
        return max_tokens, stop

    def submit(ids: list[int], adapter, body: Sampling, max_tokens: int, index: int) -> Generation:
        seed = None if body.seed is None else body.seed + index
        try:
            return engine.submit(Generation(ids, adapter, max_tokens, body.temperature, body.top_p, seed=seed))
        except QueueFull:
            raise ApiError(429, "the server is busy: too many requests are waiting; retry shortly",
                           kind="rate_limit_error") from None

    async def complete(generations: list[Generation], stop: list[str]) -> list[Choice]:
        return [await _collect(g, tokenizer, stop) for g in generations]

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        adapter = adapter_of(body.model)
        settings = loaded.adapter_settings.get(adapter) if adapter else None
        template = (settings.template if settings and settings.template else chat_template(loaded))
        turns = [m.model_dump() for m in body.messages]
        system = settings.system if settings else None
        if system and (not turns or turns[0]["role"] != "system"):
            turns = [{"role": "system", "content": system}, *turns]
        if not body.messages or turns[-1]["role"] == "assistant":
            raise ApiError(400, "messages must end with a user (or system) message", "messages")
        ids = encode_prompt(tokenizer, template, turns)
        max_tokens, stop = check_sampling(body, [ids])
        generations = [submit(ids, adapter, body, max_tokens, i) for i in range(body.n)]
        if body.stream:
            return _stream(generations, tokenizer, stop, body.model, chat=True)
        choices = await complete(generations, stop)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model, "usage": _usage([ids] * body.n, generations),
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason} for i, c in enumerate(choices)]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        adapter = adapter_of(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        max_tokens, stop = check_sampling(body, ids)
        generations = [submit(p, adapter, body, max_tokens, i) for p in ids for i in range(body.n)]
        if body.stream:
            return _stream(generations, tokenizer, stop, body.model, chat=False)
        choices = await complete(generations, stop)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model, "usage": _usage([p for p in ids for _ in range(body.n)], generations),
                "choices": [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                            for i, c in enumerate(choices)]}

    @app.post("/admin/adapters")
    async def load(body: AdapterBody):
        """Load an adapter while serving; a load that fails (a bad folder, another base) leaves the server as it was."""
        if body.name == base_name or body.name in loaded.adapters:
            raise ApiError(409, f"the name {body.name!r} is taken", "name", "conflict")
        try:
            await asyncio.to_thread(_load_adapter, loaded, engine, body.name, body.path)
        except LoralabError as e:
            raise ApiError(400, str(e), "path") from None
        return {"loaded": body.name, "models": [base_name, *loaded.adapters]}

    @app.delete("/admin/adapters/{name}")
    async def unload(name: str):
        if name == base_name:
            raise ApiError(400, "the base model cannot be unloaded", "name")
        adapter_of(name)
        with engine.lock:
            busy = [r for r in [*engine.active, *list(engine.waiting.queue)] if r.adapter == name]
            if busy:
                raise ApiError(409, f"{len(busy)} requests for {name!r} are in progress; retry when they finish",
                               "name", "conflict")
            delete_adapter(loaded.model, name)
            loaded.adapters.remove(name)
            loaded.adapter_settings.pop(name, None)
        return {"unloaded": name, "models": [base_name, *loaded.adapters]}

    @app.post("/v1/classify")
    async def classify(body: ClassifyBody):
        if not get_task(loaded.settings.task).LABELLED:
            raise ApiError(400, "this server holds generation adapters; /v1/classify is for classification and "
                                "tagging adapters", "model")
        name = adapter_of(body.model)
        if name is None:
            raise ApiError(400, "classification needs an adapter (its head and labels), not the base model", "model")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or any(not t for t in texts):
            raise ApiError(400, "input must be a non-empty text or list of texts", "input")
        results = await asyncio.to_thread(_classify, loaded, engine, name, texts)
        return {"object": "list", "model": body.model, "data": results}

    return app


def _load_adapter(loaded: Loaded, engine: Engine, name: str, path: str) -> None:
    settings = adapter_inference_settings(path)
    if get_task(settings.task).CAUSAL != get_task(loaded.settings.task).CAUSAL:
        raise LoralabError(f"a {settings.task} adapter needs another model head than this server's", file=path)
    with engine.lock:
        load_adapter(loaded.model, path, adapter_name=name)  # checked whole before the model is touched
        loaded.adapters.append(name)
        loaded.adapter_settings[name] = settings


def _classify(loaded: Loaded, engine: Engine, name: str, texts: list[str]) -> list[dict]:
    """Labels with scores (classification), or spans and word tags (tagging), computed as `loralab predict`."""
    with engine.lock:
        loaded.use(name)
        settings = loaded.settings
        if settings.task == "tagging":
            records = [Record({"text": t}, "request", i + 1) for i, t in enumerate(texts)]
            spans = predict_tags(loaded, records, run_config(loaded, "request", None, 32))
            return [{"index": i, "spans": [{"start": s, "end": e, "label": lab, "text": texts[i][s:e]}
                                           for s, e, lab in found]} for i, found in enumerate(spans)]
        tok = loaded.tokenizer
        batch = tok(texts, padding=True, truncation=True, max_length=settings.max_length, return_tensors="pt")
        batch = {k: v.to(loaded.device) for k, v in batch.items()}
        with torch.no_grad(), loaded.autocast():
            probs = torch.softmax(loaded.model(**batch).logits.float(), dim=-1)
        labels = settings.labels
        return [{"index": i, "label": labels[int(p.argmax())],
                 "scores": {label: round(float(v), 6) for label, v in zip(labels, p, strict=True)}}
                for i, p in enumerate(probs)]


async def _next_event(generation: Generation):
    while True:
        try:
            return generation.events.get_nowait()
        except queue.Empty:
            await asyncio.sleep(0.002)


class _Text:
    """A generation's text as its tokens arrive, cut at the first stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop, self.ids, self.sent, self.stopped = tokenizer, stop, [], "", False

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # a character cut between tokens: wait for the rest
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                text, self.stopped = text[:at], True
        # hold back what could be the start of a stop string
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        ready = text[:len(text) - held] if not self.stopped else text
        new, self.sent = ready[len(self.sent):], ready
        return new

    def rest(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stopped:
            return ""
        new, self.sent = text[len(self.sent):], text
        return new


async def _collect(generation: Generation, tokenizer, stop: list[str]) -> Choice:
    text = _Text(tokenizer, stop)
    while (token := await _next_event(generation)) is not None:
        text.add(token)
        if text.stopped:
            generation.cancelled.set()
    text.rest()
    return Choice(text.sent, "stop" if text.stopped else generation.finish_reason or "stop")


def _stream(generations: list[Generation], tokenizer, stop: list[str], model: str, chat: bool) -> StreamingResponse:
    stream_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"

    def chunk(index: int, text: str | None, finish: str | None) -> str:
        if chat:
            delta = {"content": text} if text is not None else {}
            body = {"id": stream_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                    "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
        else:
            body = {"id": stream_id, "object": "text_completion", "created": int(time.time()), "model": model,
                    "choices": [{"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}]}
        return f"data: {json.dumps(body)}\n\n"

    async def events():
        try:
            for index, generation in enumerate(generations):
                if chat:
                    yield chunk(index, "", None).replace('"delta": {"content": ""}', '"delta": {"role": "assistant"}')
                text = _Text(tokenizer, stop)
                while (token := await _next_event(generation)) is not None:
                    new = text.add(token)
                    if new:
                        yield chunk(index, new, None)
                    if text.stopped:
                        generation.cancelled.set()
                tail = text.rest()
                if tail:
                    yield chunk(index, tail, None)
                yield chunk(index, None, "stop" if text.stopped else generation.finish_reason or "stop")
            yield "data: [DONE]\n\n"
        finally:  # a client that goes away frees its rows at the engine's next step
            for generation in generations:
                generation.cancelled.set()

    return StreamingResponse(events(), media_type="text/event-stream")


def _usage(prompts: list[list[int]], generations: list[Generation]) -> dict:
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(g.generated) for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _error(error: ApiError) -> JSONResponse:
    return JSONResponse(status_code=error.status, content={"error": {
        "message": error.message, "type": error.kind, "param": error.param, "code": error.status}})


