"""Continuous batching: one background thread owns the model and decodes every running request together.

Requests join the decode batch between steps and leave it when they finish, each with its own sampling
parameters, stop conditions, generator and KV-cache slot. The cache is preallocated as [max_batch, context]
(`KVCache`); running requests occupy rows 0..n-1 so that a step attends over a plain slice, and a request that
leaves has the last row's keys moved into its slot. A new prompt is prefilled on its own, in chunks of at most
`prefill_chunk` tokens per scheduler iteration with a decode step for the running rows after each, so a long
prompt does not stall the streams already running; its keys are then copied into a free slot, and into one
for each request queued right behind it with the same prompt (an API request's `n` choices).

Each token goes through the same path as `Engine.stream` (sample_next on the row's logits, stop ids, then
`TextStream` for stop strings and whole characters), so a greedy answer equals `zhllm generate`'s.

Other threads talk to the scheduler only through `submit` (a thread-safe inbox) and `Request.cancel`; results
come back through each request's `sink`, called from the scheduler thread (the server forwards them to its
event loop).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ZhllmError
from ..infer.backends import eager
from ..infer.decoder import FusedDecoderCache, can_fuse
from ..infer.engine import Engine
from ..infer.sampling import SamplingParams, sample_next
from ..infer.textstream import TextStream
from ..model.transformer import KVCache
from .metrics import Metrics

log = logging.getLogger("zhllm.serve")


class QueueFull(ZhllmError):
    """The waiting queue is at its limit (the server answers 429)."""


@dataclass
class Event:
    kind: str  # "text" (a piece of the answer), "done" (finish_reason set) or "error" (message set)
    text: str = ""
    finish_reason: str = ""  # "stop", "length" or "cancelled"
    message: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Request:
    """One generation. `sink(event)` is called from the scheduler thread; it must not block."""
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    stop_strings: Sequence[str] = ()
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # ... and this times how often it was generated
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop generating (a client went away); the slot is freed at the next scheduler iteration."""
        self.cancelled = True


class _Prefill:
    """A prompt being prefilled chunk by chunk into its own batch-1 cache."""

    def __init__(self, req: Request, cache: KVCache):
        self.req, self.cache, self.done, self.logits = req, cache, 0, None


class _Row:
    """A running request: its state between decode steps. `length` positions of its slot hold keys."""

    def __init__(self, req: Request, engine: Engine, vocab: int, device: torch.device):
        self.req, self.length = req, len(req.prompt_ids)
        p = req.params
        self.max_new = min(p.max_new_tokens, engine.max_seq_len - self.length)
        self.text = TextStream(engine.tokenizer, req.stop_strings)
        self.generated = 0
        self.first_token_at: float | None = None
        self.seen = None
        if p.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(req.prompt_ids, device=device)] = True
        self.counts = None
        if req.presence_penalty or req.frequency_penalty:
            self.counts = torch.zeros(1, vocab, device=device)
        self.generator = None
        if not p.greedy:
            self.generator = torch.Generator(device)
            if p.seed is not None:
                self.generator.manual_seed(p.seed)
            else:
                self.generator.seed()
        self.token = -1  # the last sampled token, fed to the next step
        self.finished = ""

    @property
    def plain_greedy(self) -> bool:
        return self.req.params.greedy and self.seen is None and self.counts is None

    def sample(self, logits: torch.Tensor) -> int:
        """The next token from this row's (1, V) logits, as `Engine` samples it."""
        if self.counts is not None:
            logits = logits.float() - self.req.frequency_penalty * self.counts \
                - self.req.presence_penalty * (self.counts > 0).float()
        token, _ = sample_next(logits, self.req.params, self.seen, self.generator)
        return int(token[0])

    def accept(self, token: int, stops: set[int]) -> str:
        """Record a sampled token; return the text it releases. Sets `finished` when the row is done."""
        self.token = token
        self.generated += 1
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if self.seen is not None:
            self.seen[0, token] = True
        if self.counts is not None:
            self.counts[0, token] += 1
        piece = ""
        if token in stops:
            self.finished = "stop"
        else:
            piece = self.text.push(token)
            if self.text.stopped:
                self.finished = "stop"
        if not self.finished and self.generated >= self.max_new:
            self.finished = "length"
        if self.finished:
            piece += self.text.finish()
        return piece


class Scheduler:
    """Continuous batching over one engine's model. `start()`, then `submit` requests; `stop()` to end."""

    def __init__(self, engine: Engine, *, max_batch: int = 16, max_queue: int = 64, prefill_chunk: int = 256,
                 metrics: Metrics | None = None):
        if engine.tokenizer is None:
            raise ZhllmError("serving needs a checkpoint with its tokenizer")
        if not can_fuse(engine.module):
            raise ZhllmError(f"serving needs a plain zhllm model; this one is {type(engine.module).__name__} "
                             "(merge a LoRA adapter first)")
        if max_batch < 1 or max_queue < 1 or prefill_chunk < 1:
            raise ZhllmError("max_batch, max_queue and prefill_chunk must be >= 1")
        self.engine, self.max_batch, self.max_queue, self.prefill_chunk = engine, max_batch, max_queue, prefill_chunk
        self.metrics = metrics or Metrics()
        self.module = engine.module
        self.stops = set(engine.stop_ids)
        self.vocab = engine.vocab_size
        self._decoder_cache = FusedDecoderCache(engine.quantize)
        # Zeros, not torch.empty: a short row attends over the longest row's span with its tail masked, and a
        # masked key or value that happens to be NaN garbage still poisons the row (0 * NaN in the softmax-V
        # product). Keys left by a finished row are finite, so only the first use needs this.
        shape = (self.module.config.n_layers, max_batch, self.module.config.n_kv_heads, engine.max_seq_len,
                 self.module.config.head_dim)
        self._cache = KVCache(torch.zeros(shape, dtype=engine.dtype, device=engine.device),
                              torch.zeros(shape, dtype=engine.dtype, device=engine.device))
        self._inbox: queue.Queue[Request] = queue.Queue()
        self._waiting: deque[Request] = deque()
        self._pending = 0  # submitted, not yet running or gone: what max_queue limits
        self._pending_lock = threading.Lock()
        self._prefill: _Prefill | None = None
        self._rows: list[_Row] = []  # row i lives in cache slot i
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the other threads' side ----
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="zhllm-scheduler", daemon=True)
        self._thread.start()

    def submit(self, requests: Sequence[Request]) -> None:
        """Queue requests (all or none: QueueFull when they do not fit in the waiting queue)."""
        if self._stopping.is_set():
            raise QueueFull("the server is shutting down")
        for r in requests:
            if not 0 < len(r.prompt_ids) < self.engine.max_seq_len:
                raise ZhllmError(f"the prompt is {len(r.prompt_ids)} tokens; the model's context is "
                                 f"{self.engine.max_seq_len} and must leave room for one new token")
        with self._pending_lock:
            if self._pending + len(requests) > self.max_queue:
                raise QueueFull(f"the server's queue is full ({self.max_queue} requests waiting); retry later")
            self._pending += len(requests)
            self.metrics.queue_depth = self._pending
        for r in requests:
            self._inbox.put(r)

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel whatever still runs or waits (each gets a "done" event with finish_reason "cancelled") and
        end the thread."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the scheduler thread ----
    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping.is_set():
                try:
                    self._iteration()
                except Exception:  # a bug must not kill the server silently: fail what runs, keep serving
                    log.exception("scheduler iteration failed; failing the requests in it")
                    self._fail_all("internal error while generating")
            self._cancel_all()

    def _iteration(self) -> None:
        idle = not self._rows and self._prefill is None and not self._waiting
        try:
            while True:
                self._waiting.append(self._inbox.get(timeout=0.05) if idle else self._inbox.get_nowait())
                idle = False
        except queue.Empty:
            pass
        self._drop_cancelled()
        budget = self.prefill_chunk
        while budget > 0 and len(self._rows) < self.max_batch:
            if self._prefill is None:
                if not self._waiting:
                    break
                req = self._waiting.popleft()
                self._prefill = _Prefill(req, KVCache.empty(self.module.config, 1, len(req.prompt_ids),
                                                             self.engine.dtype, self.engine.device))
            budget -= self._prefill_chunk(budget)
            if self._prefill.done == len(self._prefill.req.prompt_ids):
                prefilled, self._prefill = self._prefill, None
                self._start_row(prefilled.req, prefilled)
                # The n choices of one API request (or clients asking the same thing) arrive as requests with
                # the same prompt: they start from this prefill's keys instead of computing them again.
                while (self._waiting and len(self._rows) < self.max_batch
                       and self._waiting[0].prompt_ids == prefilled.req.prompt_ids):
                    self._start_row(self._waiting.popleft(), prefilled)
        if self._rows:
            self._decode_step()

    def _prefill_chunk(self, budget: int) -> int:
        p = self._prefill
        ids = p.req.prompt_ids[p.done:p.done + budget]
        with eager():
            hidden = self.module.hidden_states(torch.tensor([ids], device=self.engine.device), cache=p.cache)
        p.done += len(ids)
        if p.done == len(p.req.prompt_ids):
            p.logits = self.module.lm_head(hidden[:, -1])
        return len(ids)

    def _start_row(self, req: Request, p: _Prefill) -> None:
        """Run `req` in the next free slot from prefill `p` (of `req`'s prompt: its keys and last logits)."""
        with self._pending_lock:
            self._pending -= 1
            self.metrics.queue_depth = self._pending
        row = _Row(req, self.engine, self.vocab, self.engine.device)
        slot, n = len(self._rows), len(req.prompt_ids)
        self._cache.k[:, slot, :, :n] = p.cache.k[:, 0]
        self._cache.v[:, slot, :, :n] = p.cache.v[:, 0]
        self._rows.append(row)
        self._emit(row, row.accept(row.sample(p.logits), self.stops))
        if row.finished:
            self._remove([slot])

    def _decode_step(self) -> None:
        rows = self._rows
        self.metrics.batch_size = self.metrics.running = len(rows)
        device = self.engine.device
        tokens = torch.tensor([r.token for r in rows], device=device)
        lengths = torch.tensor([r.length for r in rows], device=device)
        logits = self._decoder_cache.get(self.module).step_rows(tokens, lengths, self._cache)
        for r in rows:
            r.length += 1
        greedy = [i for i, r in enumerate(rows) if r.plain_greedy]
        chosen: dict[int, int] = {}
        if greedy:
            picks = logits[greedy].float().argmax(-1).tolist()
            chosen = dict(zip(greedy, picks))
        done = []
        for i, r in enumerate(rows):
            try:
                token = chosen[i] if i in chosen else r.sample(logits[i:i + 1])
            except Exception:  # one request's sampling settings must not take the others down
                log.exception("sampling failed for one request; failing it")
                r.req.sink(Event("error", message="sampling failed"))
                done.append(i)
                continue
            self._emit(r, r.accept(token, self.stops))
            if r.finished:
                done.append(i)
        self._remove(done)

    def _emit(self, row: _Row, piece: str) -> None:
        if piece:
            row.req.sink(Event("text", text=piece))
        if row.finished:
            self._finish(row, row.finished)

    def _finish(self, row: _Row, reason: str) -> None:
        now = time.monotonic()
        req = row.req
        ttft = row.first_token_at - req.submitted if row.first_token_at is not None else None
        self.metrics.generation_done(len(req.prompt_ids), row.generated, ttft, now - req.submitted)
        req.sink(Event("done", finish_reason=reason, prompt_tokens=len(req.prompt_ids),
                       completion_tokens=row.generated))

    def _remove(self, slots: list[int]) -> None:
        """Free slots; the last running row moves into each freed one so rows stay 0..n-1."""
        for s in sorted(slots, reverse=True):
            last = len(self._rows) - 1
            if s != last:
                n = self._rows[last].length
                self._cache.k[:, s, :, :n] = self._cache.k[:, last, :, :n]
                self._cache.v[:, s, :, :n] = self._cache.v[:, last, :, :n]
                self._rows[s] = self._rows[last]
            self._rows.pop()
        self.metrics.running = len(self._rows)

    def _drop_cancelled(self) -> None:
        gone = [r for r in self._waiting if r.cancelled]
        if gone:
            self._waiting = deque(r for r in self._waiting if not r.cancelled)
            self._release_pending(len(gone))
        if self._prefill is not None and self._prefill.req.cancelled:
            self._prefill = None
            self._release_pending(1)
        cancelled = [i for i, r in enumerate(self._rows) if r.req.cancelled]
        for i in cancelled:
            self._finish(self._rows[i], "cancelled")
        self._remove(cancelled)

    def _release_pending(self, n: int) -> None:
        with self._pending_lock:
            self._pending -= n
            self.metrics.queue_depth = self._pending

    def _cancel_all(self) -> None:
        for r in list(self._rows):
            self._finish(r, "cancelled")
        self._remove(list(range(len(self._rows))))
        leftovers = list(self._waiting) + ([self._prefill.req] if self._prefill else [])
        while True:
            try:
                leftovers.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for req in leftovers:
            req.sink(Event("done", finish_reason="cancelled", prompt_tokens=len(req.prompt_ids)))
        self._waiting.clear()
        self._prefill = None
        self._release_pending(len(leftovers))

    def _fail_all(self, message: str) -> None:
        reqs = [r.req for r in self._rows] + list(self._waiting) + ([self._prefill.req] if self._prefill else [])
        self._release_pending(len(self._waiting) + (1 if self._prefill else 0))
        self._rows, self._waiting, self._prefill = [], deque(), None
        self.metrics.running = 0
        for req in reqs:
            req.sink(Event("error", message=message))
