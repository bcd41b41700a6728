"""Continuous batching of decode steps: every active request advances one token per forward pass, new requests
join between steps, finished ones leave, and each row uses its own adapter (or none) in the same batch.

The prompts of the requests that arrived since the last step are prefilled together (each row with its own
adapter), then their key-value caches join the batch's, padded on the left to the batch's length; attention masks
keep the padding out. One thread owns the model: HTTP handlers
only put requests in the bounded queue and read their tokens from each request's own queue.
"""

from __future__ import annotations

import contextlib
import inspect
import queue
import threading
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from loralab.lora.inject import row_adapters


@dataclass
class Request:
    prompt_ids: list[int]
    adapter: str | None  # None: the base model
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    events: queue.Queue = field(default_factory=queue.Queue)  # token ids, then None at the end
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class QueueFull(Exception):
    """More requests are waiting than the server admits: answered with HTTP 429."""


class Engine:
    def __init__(self, model, eos_ids: set[int], device: torch.device, max_batch: int = 32, max_waiting: int = 256,
                 autocast=contextlib.nullcontext):
        self.model, self.eos_ids, self.device, self.autocast = model, eos_ids, device, autocast
        # transformers 5 names the key-value cache `cache`; earlier versions `past_key_values`
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.max_batch = max_batch
        self.waiting: queue.Queue[Request] = queue.Queue(maxsize=max_waiting)
        self.lock = threading.Lock()  # held while the model runs; adapter loads take it too
        self.active: list[Request] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, cached length]: 0 for left padding
        self.last: torch.Tensor | None = None  # [rows, 1]: each row's newest token
        self.largest_batch = 0  # the most requests one decode step has advanced together
        self.generated_tokens = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)

    def submit(self, request: Request) -> Request:
        try:
            self.waiting.put_nowait(request)
        except queue.Full:
            raise QueueFull from None
        return request

    # the loop -----------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self.stopped.is_set():
            new = []
            if not self.active:
                try:
                    new.append(self.waiting.get(timeout=0.05))
                except queue.Empty:
                    continue
            while len(self.active) + len(new) < self.max_batch:
                try:
                    new.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            if new:
                self._admit(new)
            if self.active:
                self._step()

    @torch.no_grad()
    def _admit(self, requests: list[Request]) -> None:
        """Prefill the new requests' prompts together (left-padded, each with its own adapter), then join them."""
        for request in requests:
            if request.cancelled.is_set():
                request.events.put(None)
        requests = [r for r in requests if not r.cancelled.is_set()]
        if not requests:
            return
        length = max(len(r.prompt_ids) for r in requests)
        ids = torch.zeros(len(requests), length, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(requests), length, dtype=torch.long, device=self.device)
        for row, request in enumerate(requests):
            ids[row, length - len(request.prompt_ids):] = torch.tensor(request.prompt_ids, device=self.device)
            mask[row, length - len(request.prompt_ids):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        with self.lock, row_adapters(self.model, [r.adapter for r in requests]), self.autocast():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        tokens = self._sample(out.logits[:, -1], requests)
        layers = [(layer.keys, layer.values) for layer in self._cache_of(out).layers]
        self._join(layers, mask, requests)
        first = len(self.active) - len(requests)
        for row, token in enumerate(tokens):
            self._emit(first + row, token)
        self._drop_finished()

    def _join(self, layers, mask: torch.Tensor, requests: list[Request]) -> None:
        new_last = torch.zeros(len(requests), 1, dtype=torch.long, device=self.device)
        if self.cache is None:
            self.cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
            self.mask, self.active, self.last = mask, list(requests), new_last
            return
        length = max(self.mask.shape[1], mask.shape[1])
        joined = []
        for (k, v), layer in zip(layers, self.cache.layers, strict=True):
            joined.append((torch.cat([_left_pad(layer.keys, length), _left_pad(k, length)]),
                           torch.cat([_left_pad(layer.values, length), _left_pad(v, length)])))
        self.cache = DynamicCache(ddp_cache_data=joined, config=self.model.config)
        self.mask = torch.cat([_left_pad(self.mask, length, dim=1), _left_pad(mask, length, dim=1)])
        self.last = torch.cat([self.last, new_last])
        self.active.extend(requests)

    @torch.no_grad()
    def _step(self) -> None:
        self.largest_batch = max(self.largest_batch, len(self.active))
        mask = torch.cat([self.mask, torch.ones(len(self.active), 1, dtype=torch.long, device=self.device)], dim=1)
        positions = (self.mask.sum(1, keepdim=True))  # each row's real tokens so far: the next position
        with self.lock, row_adapters(self.model, [r.adapter for r in self.active]), self.autocast():
            out = self.model(input_ids=self.last, attention_mask=mask, position_ids=positions, use_cache=True,
                             **{self.cache_arg: self.cache})
        self.cache, self.mask = self._cache_of(out), mask
        tokens = self._sample(out.logits[:, -1], self.active)
        for row, token in enumerate(tokens):
            self._emit(row, token)
        self._drop_finished()

    @staticmethod
    def _cache_of(output) -> DynamicCache:
        cache = getattr(output, "cache", None)
        return cache if cache is not None else output.past_key_values

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        tokens = []
        for row, request in enumerate(requests):
            scores = logits[row].float()
            if request.temperature <= 0:
                tokens.append(int(scores.argmax()))
                continue
            probs = torch.softmax(scores / request.temperature, dim=-1)
            if request.top_p < 1:
                sorted_probs, order = probs.sort(descending=True)
                cut = sorted_probs.cumsum(0) - sorted_probs > request.top_p
                sorted_probs[cut] = 0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            generator = None
            if request.seed is not None:
                generator = torch.Generator(device=probs.device).manual_seed(request.seed + len(request.generated))
            tokens.append(int(torch.multinomial(probs, 1, generator=generator)))
        return tokens

    def _emit(self, row: int, token: int) -> None:
        request = self.active[row]
        self.last[row, 0] = token
        if request.cancelled.is_set():
            request.finish_reason = "cancelled"
            return
        if token in self.eos_ids:  # stop strings are matched on the text, by the HTTP layer
            request.finish_reason = "stop"
            return
        request.generated.append(token)
        self.generated_tokens += 1
        request.events.put(token)
        if len(request.generated) >= request.max_tokens:
            request.finish_reason = "length"

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self.active) if r.finish_reason is None]
        if len(keep) == len(self.active):
            return
        for request in self.active:
            if request.finish_reason is not None:
                request.events.put(None)
        if not keep:
            self.active, self.cache, self.mask, self.last = [], None, None, None
            return
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.last = self.mask[index], self.last[index]
        self.active = [self.active[i] for i in keep]


def _left_pad(tensor: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
