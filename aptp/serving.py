"""Serving routed experts: requests queue per expert; a group runs when it is full or has waited.

::

    pipe = RoutedPipeline.from_run("runs/world", shared=True)      # K experts over one dense copy
    with ExpertScheduler(pipe, max_batch=8, max_wait_s=0.05, num_inference_steps=25) as server:
        futures = [server.submit(p, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(prompts)]
        images = [f.result().image for f in futures]                # (3, H, W) in [0, 1], per request

A request's initial noise is drawn when it is submitted, from its own generator (or given as
``latents=``), so its image does not depend on the requests it is batched with: it equals
``pipe([prompt], generator=[g])`` (deterministic samplers such as DDIM; see
:mod:`aptp.pipeline`). New requests are encoded and routed together (one call per drain of the
inbox) and appended to their expert's queue. Each prompt is encoded once: the backbone's text
states are computed at routing time and handed to the group's generation (``reuse_text``), and
when the router's prompt encoder is the backbone's text encoder with a pooling on top (the world
backbone conditions on MiniLM token states; the router embeds prompts with the same MiniLM,
mean-pooled), the routing embedding is pooled from those states instead of running the encoder a
second time (prompts longer than the backbone's ``text_len`` tokens, whose states are truncated,
are still encoded by the router's encoder). ``text_cache`` keeps the encodings of that many recent
distinct prompts (0: every request is encoded). A queue runs as one batch when it holds ``max_batch``
requests, or when its oldest request has waited ``max_wait_s``; of several ready queues the one
with the oldest request runs first. Used either with its worker thread (``start`` / ``close`` or
``with``) or driven by hand with :meth:`poll` (and a ``clock`` of your own, e.g. in tests).
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from aptp.pipeline import RoutedPipeline, check_prompts, initial_noise
from aptp.pruners.expert import gathered

__all__ = ["ExpertScheduler", "ServedImage", "TextStates"]


@dataclass
class ServedImage:
    """One request's result and its timings (seconds on the scheduler's clock)."""

    image: torch.Tensor  # (3, H, W) in [0, 1]
    expert_id: int
    batch_size: int  # requests in the group it ran in
    submitted_s: float
    started_s: float
    finished_s: float

    @property
    def latency_s(self) -> float:
        return self.finished_s - self.submitted_s


@dataclass
class _Request:
    prompt: str
    latents: torch.Tensor  # (1, C, H, W)
    future: Future
    submitted_s: float
    expert_id: int = -1
    text: torch.Tensor | None = None  # (L, D_text) the backbone's text states, when encoded at routing


@dataclass
class _Stats:
    groups: list[tuple[int, int]] = field(default_factory=list)  # (expert id, group size) in run order
    cpu_s: float = 0.0  # CPU time of the thread(s) that routed and ran the groups (time.thread_time)
    route_cpu_s: float = 0.0  # the part of it spent encoding and routing prompts (text states included)
    pooled: int = 0  # requests whose routing embedding was pooled from the backbone's text states
    encoded: int = 0  # requests whose routing embedding came from the router's own encoder
    text_cache_hits: int = 0  # requests whose encodings came from the scheduler's text cache


class TextStates:
    """Encodes prompts once for a :class:`RoutedPipeline`: the backbone's text states (B, L, D_text),
    and the routing embeddings (B, D) pooled from them when the router's encoder shares the backbone's
    text transformer (checked once on probe prompts: ``self.pooling`` is then True)."""

    PROBE = ("a red circle above a small blue square", "the letter A", "two green stars")

    def __init__(self, pipeline: RoutedPipeline, tolerance: float = 1e-5) -> None:
        self.pipeline = pipeline
        modules = pipeline.modules
        self.available = modules.text_encoder is not None and modules.tokenizer is not None
        self.pooling = False
        if self.available and pipeline.router.num_experts > 1 and hasattr(pipeline.encoder, "pool_token_states"):
            try:
                states, mask, fits = self.states(list(self.PROBE))
                z = self._pool(states, mask)
                ref = pipeline.encoder.encode(list(self.PROBE))
                self.pooling = bool(all(fits) and z.shape == ref.shape and torch.allclose(z, ref, atol=tolerance))
            except Exception:  # another encoder / tokenizer: route with the router's own encoder
                self.pooling = False

    def _pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.pipeline.encoder.pool_token_states(states, mask)  # type: ignore[attr-defined]

    def states(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """(text states (B, L, D_text) as the backbone encodes them for generation, their attention
        mask (B, L), whether each prompt fits in L tokens untruncated)."""
        pipe = self.pipeline
        states = pipe.backbone.encode_prompts(pipe.modules, prompts)  # (B, L, D_text)
        L = states.shape[1]
        tok = pipe.modules.tokenizer(prompts, padding="max_length", max_length=L, truncation=True, return_tensors="pt")
        lengths = [len(ids) for ids in pipe.modules.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]
        limit = min(L, int(getattr(pipe.encoder, "max_tokens", L)))
        return states, tok["attention_mask"], [n <= limit for n in lengths]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(text states (B, L, D_text), routing embeddings (B, D) or None for a one-expert pipeline,
        how many embeddings were pooled from the states)."""
        states, mask, fits = self.states(prompts)
        if self.pipeline.router.num_experts == 1:
            return states, None, 0
        if not self.pooling:
            return states, self.pipeline.encoder.encode(prompts), 0
        z = self._pool(states, mask)  # (B, D)
        rest = [i for i, ok in enumerate(fits) if not ok]  # truncated in the backbone's states
        if rest:
            z = z.clone()
            z[rest] = self.pipeline.encoder.encode([prompts[i] for i in rest])
        return states, z, len(prompts) - len(rest)


class ExpertScheduler:
    """Per-expert request queues over a :class:`~aptp.pipeline.RoutedPipeline` (dynamic batching).

    ``max_batch``: the largest group one call runs; ``max_wait_s``: how long a request may wait for
    its group to fill; ``compile``: ``torch.compile`` each expert on first use (``compile_options``
    are passed on, e.g. ``{"mode": "reduce-overhead"}`` for CUDA graphs on a GPU). ``reuse_text``:
    encode each prompt once at routing time (text states for generation, and the routing embedding
    pooled from them where the encoders are shared; see the module's docstring); False: the router
    encodes and each group's generation encodes again, as :class:`RoutedPipeline` does.
    ``text_cache``: how many distinct recent prompts' encodings to keep (LRU; 0 = none).
    """

    def __init__(self, pipeline: RoutedPipeline, max_batch: int = 8, max_wait_s: float = 0.05,
                 num_inference_steps: int = 25, guidance_scale: float = 1.0, compile: bool = False,
                 compile_options: dict[str, Any] | None = None, clock: Callable[[], float] = time.monotonic,
                 reuse_text: bool = True, text_cache: int = 0) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}.")
        if not max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}.")
        if text_cache < 0:
            raise ValueError(f"text_cache must be >= 0 (0 disables it), got {text_cache}.")
        self.pipeline = pipeline
        self.max_batch, self.max_wait_s = int(max_batch), float(max_wait_s)
        self.num_inference_steps, self.guidance_scale = int(num_inference_steps), float(guidance_scale)
        self.compile, self.compile_options = bool(compile), dict(compile_options or {})
        self.clock = clock
        self.stats = _Stats()
        self._inbox: deque[_Request] = deque()
        self._queues: dict[int, deque[_Request]] = {k: deque() for k in range(pipeline.router.num_experts)}
        self._denoisers: dict[int, nn.Module] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._sample_shape = tuple(pipeline.backbone.conditioning().sample_shape)
        self.text = TextStates(pipeline) if reuse_text else None
        if self.text is not None and not self.text.available:  # no text encoder: nothing to reuse
            self.text = None
        self.text_cache = int(text_cache)
        self._text_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()

    # --- requests --------------------------------------------------------------------------------
    def submit(self, prompt: str, generator: torch.Generator | None = None,
               latents: torch.Tensor | None = None) -> Future:
        """Queue one prompt; the future's result is a :class:`ServedImage`. The initial noise comes
        from ``latents`` (1, C, H, W) or (C, H, W), else from ``generator`` (else the global RNG), now."""
        (prompt,) = check_prompts([prompt])
        if latents is not None and latents.dim() == len(self._sample_shape):
            latents = latents.unsqueeze(0)
        noise = initial_noise((1, *self._sample_shape), generator, latents).cpu()  # (1, C, H, W)
        request = _Request(prompt, noise, Future(), self.clock())
        with self._cond:
            if self._closing:
                raise RuntimeError("this scheduler is closed; start a new one to submit requests.")
            self._inbox.append(request)
            self._cond.notify()
        return request.future

    def submit_many(self, prompts: Sequence[str], generators: Sequence[torch.Generator] | None = None) -> list[Future]:
        gens = list(generators) if generators is not None else [None] * len(prompts)
        if len(gens) != len(prompts):
            raise ValueError(f"got {len(gens)} generators for {len(prompts)} prompts; pass one per prompt.")
        return [self.submit(p, g) for p, g in zip(prompts, gens)]

    # --- scheduling --------------------------------------------------------------------------------
    def _route_inbox(self) -> None:
        with self._cond:
            new = list(self._inbox)
            self._inbox.clear()
        if not new:
            return
        cpu = time.thread_time()
        if self.text is None:
            ids = self.pipeline.route([r.prompt for r in new]).tolist()  # one encoder call for all new requests
        else:
            ids = self._encode_and_route(new)
        self.stats.route_cpu_s += time.thread_time() - cpu
        for r, k in zip(new, ids):
            r.expert_id = int(k)
            self._queues[int(k)].append(r)

    @torch.no_grad()
    def _encode_and_route(self, new: list[_Request]) -> list[int]:
        """Set each request's text states; its expert id, from one encoding of the distinct new prompts."""
        assert self.text is not None
        distinct = list(dict.fromkeys(r.prompt for r in new))
        todo = [p for p in distinct if p not in self._text_cache]
        got: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {p: self._text_cache[p] for p in distinct if p in self._text_cache}
        self.stats.text_cache_hits += sum(1 for r in new if r.prompt in got)
        if todo:
            states, z, pooled = self.text.encode(todo)
            self.stats.pooled += pooled
            self.stats.encoded += 0 if z is None else len(todo) - pooled
            for i, p in enumerate(todo):
                got[p] = (states[i], None if z is None else z[i])
        if self.text_cache:
            for p in distinct:  # refresh recency, insert new, evict the oldest
                self._text_cache[p] = got[p]
                self._text_cache.move_to_end(p)
            while len(self._text_cache) > self.text_cache:
                self._text_cache.popitem(last=False)
        for r in new:
            r.text = got[r.prompt][0]
        if self.pipeline.router.num_experts == 1:
            return [0] * len(new)
        z = torch.stack([got[p][1] for p in distinct])  # (P, D)
        self.pipeline.router.eval()
        ids = dict(zip(distinct, self.pipeline.router.route(z).expert_ids.tolist()))
        return [int(ids[r.prompt]) for r in new]

    def pending(self) -> int:
        """Requests submitted and not yet run."""
        with self._cond:
            return len(self._inbox) + sum(len(q) for q in self._queues.values())

    def _ready(self, now: float, flush: bool = False) -> int | None:
        """The expert whose group should run now (full, else waited long enough), or None."""
        full = [k for k, q in self._queues.items() if len(q) >= self.max_batch]
        if full:
            return min(full, key=lambda k: self._queues[k][0].submitted_s)
        waited = [k for k, q in self._queues.items() if q and (flush or now - q[0].submitted_s >= self.max_wait_s)]
        return min(waited, key=lambda k: self._queues[k][0].submitted_s) if waited else None

    def _next_deadline(self) -> float | None:
        heads = [q[0].submitted_s for q in self._queues.values() if q]
        return min(heads) + self.max_wait_s if heads else None

    def poll(self, now: float | None = None, flush: bool = False) -> int:
        """Route new requests and run every group that is ready at ``now`` (default: the clock);
        ``flush=True`` runs every queued request. Returns the number of groups run."""
        ran = 0
        cpu = time.thread_time()
        try:
            while True:
                self._route_inbox()
                k = self._ready(self.clock() if now is None else now, flush)
                if k is None:
                    return ran
                q = self._queues[k]
                group = [q.popleft() for _ in range(min(self.max_batch, len(q)))]
                self._run(k, group)
                ran += 1
        finally:
            self.stats.cpu_s += time.thread_time() - cpu

    def _denoiser(self, k: int) -> nn.Module:
        if k not in self._denoisers:
            module = self.pipeline.expert(k)
            self._denoisers[k] = torch.compile(module, **self.compile_options) if self.compile else module
        return self._denoisers[k]

    @torch.no_grad()
    def _run(self, k: int, group: list[_Request]) -> None:
        started = self.clock()
        self.stats.groups.append((k, len(group)))
        try:
            denoiser = self._denoiser(k)
            backbone = self.pipeline.backbone
            if all(r.text is not None for r in group):  # the states encoded at routing time
                backbone = _with_text_states(backbone, [r.prompt for r in group], torch.stack([r.text for r in group]))
            with gathered(denoiser):  # a shared expert gathers its weights once for all the steps
                images = backbone.generate(
                    self.pipeline.modules, [r.prompt for r in group], denoiser=denoiser,
                    num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                    generator=None, latents=torch.cat([r.latents for r in group]),
                ).cpu()  # (b, 3, H, W)
        except BaseException as exc:  # every request of the group learns why
            for r in group:
                r.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        finished = self.clock()
        for r, image in zip(group, images):
            r.future.set_result(ServedImage(image, k, len(group), r.submitted_s, started, finished))

    # --- worker thread -------------------------------------------------------------------------------
    def start(self) -> ExpertScheduler:
        """Run the scheduler in a background thread until :meth:`close`."""
        if self._thread is not None:
            return self
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="aptp-expert-scheduler", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            self.poll()
            with self._cond:
                if self._closing and not self._inbox and not any(self._queues.values()):
                    return
                if self._inbox:
                    continue
                if self._closing:  # drain: run what is left without waiting
                    flush = True
                else:
                    deadline = self._next_deadline()
                    timeout = None if deadline is None else max(0.0, deadline - self.clock())
                    self._cond.wait(timeout)
                    continue
            if flush:
                self.poll(flush=True)

    def close(self) -> None:
        """Run every queued request, then stop the worker thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        else:
            self.poll(flush=True)

    def __enter__(self) -> ExpertScheduler:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _with_text_states(backbone: Any, prompts: list[str], states: torch.Tensor) -> Any:
    """A shallow copy of ``backbone`` whose ``encode_prompts`` returns ``states`` (B, L, D_text) for
    exactly ``prompts`` (any other list, e.g. classifier-free guidance's empty prompts, is encoded as
    usual), so ``generate`` conditions on states computed once at routing time."""
    view = copy.copy(backbone)
    encode = backbone.encode_prompts

    def encode_prompts(modules: Any, ps: Sequence[str]) -> torch.Tensor:
        return states if list(ps) == prompts else encode(modules, ps)

    view.encode_prompts = encode_prompts
    return view
