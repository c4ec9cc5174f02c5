"""The inference engine: one object that owns a model and everything needed to run it for generation.

    engine = Engine.load("runs/sft/checkpoints/best", quantize="int8")
    engine.generate([{"role": "user", "content": "你好"}], temperature=0.7, top_p=0.9)
    for piece in engine.stream("从前有座山，", max_new_tokens=64): print(piece, end="")
    out = engine.generate_batch(prompts, n=4, temperature=1.0, seed=0)   # ids, texts, log-probs, mask
    engine.score([[5, 6, 7]], [[8, 9]])[0].logprob                         # log p(8, 9 | 5, 6, 7)

`Engine(model, tokenizer)` wraps a live model (a trainer's, LoRA-injected or FSDP-sharded: see
`infer/backends.py` for how each is run); nothing is stored on the model.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..device import resolve_device
from ..errors import ZhllmError
from .backends import decode_session, sequence_logits, unwrap
from .decoder import FusedDecoderCache, can_fuse
from .loading import check_quantize, check_vocab, load_checkpoint, model_limits, stop_ids_for
from .prompts import Messages, encode_prompt
from .sampling import SamplingParams, sample_next
from .scoring import MIN_SHARED_PREFIX, SharedPrefix, can_share, plan_prefixes
from .textstream import TextStream

Prompt = str | Messages | Sequence[int]


@dataclass
class Completion:
    """One generated sample. `token_ids` end with the stop token when the row stopped on one (its log-prob
    is part of the answer's likelihood); `text` never contains it and is cut before a stop string."""
    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]  # per token of token_ids, see `sampling.sample_next`
    text: str
    finish_reason: str  # "stop_token", "stop_string" or "length" (max_new_tokens or the context end)


@dataclass
class BatchGeneration:
    """`generate_batch`'s result: completions prompt-major (prompt i's n samples at [i*n, (i+1)*n)), and the
    same as right-padded tensors (N, T): token ids (padded with `pad_id`), log-probs (0 at padding) and
    `response_mask` (True on generated tokens)."""
    completions: list[Completion]
    token_ids: torch.Tensor = field(repr=False)
    logprobs: torch.Tensor = field(repr=False)
    response_mask: torch.Tensor = field(repr=False)

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]

    @classmethod
    def of(cls, completions: list[Completion], pad_id: int) -> "BatchGeneration":
        width = max((len(c.token_ids) for c in completions), default=0)
        ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
        logprobs = torch.zeros(len(completions), width)
        mask = torch.zeros(len(completions), width, dtype=torch.bool)
        for i, c in enumerate(completions):
            n = len(c.token_ids)
            ids[i, :n], logprobs[i, :n], mask[i, :n] = torch.tensor(c.token_ids), torch.tensor(c.logprobs), True
        return cls(completions, ids, logprobs, mask)


@dataclass
class ScoreResult:
    logprob: float  # sum of token_logprobs
    token_logprobs: list[float]  # log p(continuation[j] | prompt, continuation[:j])


class Engine:
    """Generation and scoring for one model: it owns the model, tokenizer, stop ids, dtype, quantization and
    the fused decode weights (rebuilt when the model's weights change, e.g. between a trainer's steps).

    Sampling is reproducible: each call draws from its own torch.Generator (seeded with `seed`, or randomly),
    never from the global RNG. Prompts are text, a list of chat messages, or token ids.

    Thread safety: any thread may call any method, also while other calls are in progress. Each call has its
    own KV cache, generator and text stream; the model work (a prefill, one decode step, one scoring batch)
    runs under the engine's lock, so concurrent calls interleave step by step and never run the model at the
    same time. The model's weights must not change during a call (a trainer steps between calls).
    """

    def __init__(self, model: nn.Module, tokenizer=None, *, stop_ids: Iterable[int] | None = None,
                 quantize: str = "none"):
        self.model, self.tokenizer = model, tokenizer
        self.module = unwrap(model)
        self.vocab_size, self.max_seq_len = model_limits(self.module)
        if tokenizer is not None:
            check_vocab(self.module, tokenizer)
        weight = next(self.module.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        check_quantize(quantize, self.device)
        self.quantize = quantize
        self.stop_ids = list(stop_ids) if stop_ids is not None else stop_ids_for(tokenizer) if tokenizer else []
        self.pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
        self._fused = FusedDecoderCache(quantize) if can_fuse(self.module) else None
        # inference_mode is the cheaper of the two, but FSDP cannot unshard parameters under it.
        self._no_grad = torch.inference_mode if self._fused is not None else torch.no_grad
        if quantize != "none" and self._fused is None:
            raise ZhllmError(f"{quantize} decoding needs a plain zhllm model; this one is "
                             f"{type(self.module).__name__} with LoRA or sharded weights (merge the adapter first)")
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype | None = "auto",
             quantize: str = "none") -> "Engine":
        """An engine for a checkpoint directory (model in eval mode, its tokenizer, generation_config's eos).
        quantize="int8": the decode step uses weight-only int8 copies of the matrices (CPU; infer/linear.py);
        the prompt still runs with the model's own weights."""
        check_quantize(quantize, resolve_device(device))  # before the slow load
        model, tokenizer, eos = load_checkpoint(path, device, dtype)
        return cls(model, tokenizer, stop_ids=stop_ids_for(tokenizer, eos), quantize=quantize)

    # ---- text ----
    def stream(self, prompt: Prompt, *, stop_strings: Sequence[str] = (), stop_token_ids: Iterable[int] | None = None,
               **sampling) -> Iterator[str]:
        """Yield the answer as text pieces while it is generated; pieces never split a character.

        sampling: max_new_tokens, temperature (0 = greedy), top_k, top_p, repetition_penalty, seed.
        stop_token_ids: default the engine's stop ids; stop_strings end the answer at their first occurrence
        and are not included.
        """
        text = TextStream(self._need_tokenizer(), stop_strings)
        stops = self._stops(stop_token_ids)
        finished = [False]
        for tokens, _ in self._steps([self._encode(prompt)], SamplingParams(**sampling), finished, False):
            if tokens[0] in stops:
                finished[0] = True
                continue
            piece = text.push(tokens[0])
            finished[0] = text.stopped
            if piece:
                yield piece
        piece = text.finish()
        if piece:
            yield piece

    def generate(self, prompt: Prompt, *, stop_strings: Sequence[str] = (),
                 stop_token_ids: Iterable[int] | None = None, **sampling) -> str:
        """The answer to a prompt (str: plain text; list of messages: rendered with the chat template)."""
        return "".join(self.stream(prompt, stop_strings=stop_strings, stop_token_ids=stop_token_ids, **sampling))

    def generate_batch(self, prompts: Sequence[Prompt], *, n: int = 1, stop_strings: Sequence[str] = (),
                       stop_token_ids: Iterable[int] | None = None, **sampling) -> BatchGeneration:
        """`n` samples per prompt decoded together in one batch (left padding); each row stops on its own at a
        stop token, a stop string or max_new_tokens. Without a tokenizer, texts are empty."""
        if n < 1:
            raise ZhllmError(f"n must be >= 1, got {n}")
        if stop_strings and self.tokenizer is None:
            raise ZhllmError("stop_strings need a tokenizer; this engine has none")
        encoded = [self._encode(p) for p in prompts]
        rows = [(i, ids) for i, ids in enumerate(encoded) for _ in range(n)]
        if not rows:
            return BatchGeneration.of([], self.pad_id)
        stops = self._stops(stop_token_ids)
        texts = [TextStream(self.tokenizer, stop_strings) if self.tokenizer is not None else None for _ in rows]
        out = [Completion(i, [], [], "", "length") for i, _ in rows]
        finished = [False] * len(rows)
        for tokens, logprobs in self._steps([ids for _, ids in rows], SamplingParams(**sampling), finished, True):
            for r, (t, lp) in enumerate(zip(tokens, logprobs)):
                if finished[r]:
                    continue
                out[r].token_ids.append(t)
                out[r].logprobs.append(lp)
                if t in stops:
                    finished[r], out[r].finish_reason = True, "stop_token"
                elif texts[r] is not None:
                    texts[r].push(t)
                    if texts[r].stopped:
                        finished[r], out[r].finish_reason = True, "stop_string"
        for c, t in zip(out, texts):
            if t is not None:
                t.finish()
                c.text = t.text
        return BatchGeneration.of(out, self.pad_id)

    # ---- scoring ----
    def score(self, prompts: Sequence[Prompt], continuations: Sequence[str | Sequence[int]], *,
              batch_size: int = 16, min_shared_prefix: int | None = MIN_SHARED_PREFIX) -> list[ScoreResult]:
        """Log-probs of each continuation after its prompt, in batches of similar lengths (right padding,
        which a causal model's earlier positions never see). A text continuation is encoded as plain text.

        Pairs that feed the model the same tokens share one row: the last continuation token is only a target,
        so the choices of a multiple-choice item ("A".."D" after one prompt) cost one forward of the prompt.
        Rows that start with the same `min_shared_prefix` or more tokens (k-shot prompts of one subject) run
        that prefix once and only their own suffixes after it (infer/scoring.py; zhllm models only, None
        turns it off). `batch_size` counts rows."""
        if len(prompts) != len(continuations):
            raise ZhllmError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        pairs = [(self._encode(p), self._encode_continuation(c)) for p, c in zip(prompts, continuations)]
        for p, c in pairs:
            if len(p) + len(c) > self.max_seq_len:
                raise ZhllmError(f"a prompt and continuation of {len(p) + len(c)} tokens exceed the model's "
                                 f"context of {self.max_seq_len}")
        rows: dict[tuple[int, ...], list[int]] = {}  # model input -> the pairs it scores
        for i, (p, c) in enumerate(pairs):
            if c:
                rows.setdefault(tuple(p + c[:-1]), []).append(i)
        keys = list(rows)
        groups, alone = [], list(range(len(keys)))
        if min_shared_prefix is not None and can_share(self.module):
            # a row's prefix must end before the position that predicts its first continuation token
            caps = [min(len(pairs[i][0]) for i in rows[key]) - 1 for key in keys]
            groups, alone = plan_prefixes(keys, caps, max(1, min_shared_prefix))
        results: list[ScoreResult] = [ScoreResult(0.0, []) for _ in pairs]
        step = max(1, batch_size)
        for skip, members in [(0, alone)] + groups:
            prefix = None
            if skip:
                with self._lock, self._no_grad():
                    prefix = SharedPrefix(self.module, torch.tensor(keys[members[0]][:skip], device=self.device))
            order = sorted(members, key=lambda r: len(keys[r]))
            for start in range(0, len(order), step):
                chunk = order[start:start + step]
                targets = [(j, i) for j, r in enumerate(chunk) for i in rows[keys[r]]]
                scored = self._score_batch([keys[r][skip:] for r in chunk],
                                           [(j, len(pairs[i][0]) - skip, pairs[i][1]) for j, i in targets], prefix)
                for (_, i), res in zip(targets, scored):
                    results[i] = res
        return results

    def _score_batch(self, inputs: list[tuple[int, ...]], targets: list[tuple[int, int, list[int]]],
                     prefix: SharedPrefix | None = None) -> list[ScoreResult]:
        """`targets`: (row of `inputs`, prompt length, continuation) per pair scored on those rows; with a
        `prefix`, inputs and prompt lengths count from its end."""
        ids = torch.full((len(inputs), max(map(len, inputs))), self.pad_id, dtype=torch.long)
        for r, seq in enumerate(inputs):
            ids[r, :len(seq)] = torch.tensor(seq)
        rows, cols, flat_targets = [], [], []
        for r, n, c in targets:
            rows += [r] * len(c)
            cols += range(n - 1, n + len(c) - 1)  # the position that predicts each continuation token
            flat_targets += c
        with self._lock, self._no_grad():
            ids, rows, cols = (torch.as_tensor(x, device=self.device) for x in (ids, rows, cols))
            logits = (prefix.logits(ids, rows, cols) if prefix is not None
                      else sequence_logits(self.module, ids, rows, cols))
            logprobs = logits.float().log_softmax(-1).gather(
                1, torch.tensor(flat_targets, device=self.device)[:, None])
        flat = logprobs[:, 0].tolist()
        out, k = [], 0
        for _, _, c in targets:
            token_logprobs = flat[k:k + len(c)]
            k += len(c)
            out.append(ScoreResult(sum(token_logprobs), token_logprobs))
        return out

    # ---- the decode loop ----
    def _steps(self, prompts: list[list[int]], params: SamplingParams, finished: list[bool],
               with_logprobs: bool) -> Iterator[tuple[list[int], list[float] | None]]:
        """Yield, per step, the new token (and its log-prob) of every row, finished rows included. The caller
        marks rows done in `finished`; decoding ends when all are, after max_new_tokens, or at the context end.

        The lock and no-grad mode are held per block, never across a yield: the caller's code between
        steps (a trainer, a web server, another call) must find neither.
        """
        lens = [len(p) for p in prompts]
        longest = max(lens)
        if longest >= self.max_seq_len:
            raise ZhllmError(f"the prompt is {longest} tokens but the model's context is {self.max_seq_len} "
                             "(it must leave room for at least one new token)")
        max_new = min(params.max_new_tokens, self.max_seq_len - longest)
        padded = any(n != longest for n in lens)
        with self._lock, self._no_grad():
            ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
            key_mask = torch.zeros(len(prompts), longest + max_new, dtype=torch.bool) if padded else None
            for i, p in enumerate(prompts):
                ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
                if padded:
                    key_mask[i, longest - len(p):] = True
            ids = ids.to(self.device)
            key_mask = key_mask.to(self.device) if padded else None
            session = decode_session(self.module, self._fused, key_mask, lens, longest + max_new)
            logits = session.prefill(ids)
            seen = None
            if params.repetition_penalty != 1.0:
                seen = torch.zeros(len(prompts), logits.shape[-1], dtype=torch.bool, device=self.device)
                seen.scatter_(1, ids, True)
                if padded:  # the pad id is not part of the prompt
                    seen[:, self.pad_id] = torch.tensor([self.pad_id in p for p in prompts], device=self.device)
        generator = None
        if not params.greedy:
            generator = torch.Generator(self.device)
            if params.seed is not None:
                generator.manual_seed(params.seed)
            else:
                generator.seed()
        alive = list(range(len(prompts)))  # the prompt row of each row the session still decodes
        rows = None  # (batch, alive as a tensor) once finished rows have left
        for step in range(max_new):
            with self._lock, self._no_grad():
                tokens, logprobs = sample_next(logits, params, seen, generator, with_logprobs, rows)
                token_list = tokens.tolist()
                logprob_list = logprobs.tolist() if logprobs is not None else None
            if rows is not None:  # dropped rows were finished: the caller ignores what they get
                token_list = _scatter(token_list, alive, len(prompts), self.pad_id)
                logprob_list = _scatter(logprob_list, alive, len(prompts), 0.0) if logprob_list else None
            yield token_list, logprob_list
            if all(finished) or step == max_new - 1:
                return
            with self._lock, self._no_grad():
                if seen is not None:
                    seen.scatter_(1, tokens[:, None], True)
                still = [i for i, r in enumerate(alive) if not finished[r]]
                # Finished rows leave the batch once they are a quarter of it: a batch of sampled answers runs
                # as long as its longest, and its short rows would otherwise ride along to the end.
                if len(still) <= len(alive) * 3 // 4:
                    keep = torch.tensor(still, device=tokens.device)
                    session.keep(keep)
                    tokens = tokens[keep]
                    seen = seen[keep] if seen is not None else None
                    alive = [alive[i] for i in still]
                    rows = (len(prompts), torch.tensor(alive, device=tokens.device))
                logits = session.step(tokens)

    # ---- helpers ----
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ZhllmError("this engine has no tokenizer: text prompts and text output need one")
        return self.tokenizer

    def _stops(self, stop_token_ids: Iterable[int] | None) -> set[int]:
        return set(self.stop_ids if stop_token_ids is None else stop_token_ids)

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, Sequence) and not isinstance(prompt, str) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            ids = encode_prompt(self._need_tokenizer(), prompt)
        if not ids:
            raise ZhllmError("every prompt needs at least one token")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ZhllmError(f"prompt token id {max(ids) if max(ids) >= self.vocab_size else min(ids)} is outside "
                             f"the model's vocabulary ({self.vocab_size})")
        return ids

    def _encode_continuation(self, continuation: str | Sequence[int]) -> list[int]:
        if isinstance(continuation, str):
            from ..tokenizer.encode import encode_text
            ids = encode_text(self._need_tokenizer(), continuation)
        else:
            ids = list(continuation)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise ZhllmError(f"continuation token id outside the model's vocabulary ({self.vocab_size})")
        return ids


def _scatter(values: list, rows: list[int], n: int, fill) -> list:
    """`values` of `rows` spread into a list of `n`, `fill` elsewhere."""
    out = [fill] * n
    for r, v in zip(rows, values):
        out[r] = v
    return out
