"""The generation engine: batched KV-cache decoding with sampling, stop tokens/strings and streaming.

    model, tok = load_for_inference("runs/sft/checkpoints/best")
    generate(model, tok, [{"role": "user", "content": "你好"}], temperature=0.7, top_p=0.9)
    for piece in stream_generate(model, tok, "从前有座山，", max_new_tokens=64): print(piece, end="")
    generate_ids(model, [[5, 6, 7], [8, 9]], max_new_tokens=16)   # batches, ids in and out

One loop (`decode_steps`) serves every entry point: the prompt is prefilled through the model (left padding
with an attention mask for batches), then each new token goes through the fused decode step of
`infer/decoder.py` on the same preallocated `KVCache`.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from ..errors import ZhllmError
from ..model.transformer import KVCache, Transformer
from .decoder import fused_decoder
from .prompts import Messages, encode_prompt
from .sampling import SamplingParams, next_tokens
from .textstream import TextStream

CHAT_END = "<|im_end|>"


# ---- loading ----
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ZhllmError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ZhllmError(f"device {device!r} requested but CUDA is not available")
    return dev


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA, and on CPUs with native bf16 (AVX512-BF16/AMX), where decoding streams half the
    bytes of fp32 through oneDNN (benchmarks/bench_decode.py); fp32 on other CPUs, where bf16 is emulated."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ZhllmError(f"unknown dtype {dtype!r} (use auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def cpu_has_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def load_for_inference(path: str | Path, device: str | torch.device = "auto",
                       dtype: str | torch.dtype | None = "auto", quantize: str = "none") -> tuple[Transformer, object]:
    """(model in eval mode, tokenizer) from a checkpoint directory, checked to fit together.

    quantize="int8": the decode step uses weight-only int8 copies of the matrices (CPU; see infer/linear.py);
    the prompt is still run with the model's own weights.
    """
    from .linear import QUANTIZE
    from ..model.io import TOKENIZER_FILES, load_model
    from ..tokenizer.load import load_tokenizer

    dev = resolve_device(device)
    if quantize not in QUANTIZE:
        raise ZhllmError(f"unknown quantization {quantize!r} (use {', '.join(QUANTIZE)})")
    if quantize == "int8" and dev.type != "cpu":
        raise ZhllmError("int8 decoding runs on the CPU; on a GPU use bfloat16 (memory bandwidth is not the limit)")
    model = load_model(path, device=dev, dtype=resolve_dtype(dtype, dev))
    if not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise ZhllmError(f"{path} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...); "
                         "a checkpoint for generation needs its tokenizer")
    tokenizer = load_tokenizer(path)
    check_vocab(model, tokenizer)
    model.generation_eos_ids = _generation_config_eos(Path(path))
    model.decode_quantize = quantize
    return model, tokenizer


def check_vocab(model: Transformer, tokenizer) -> None:
    if len(tokenizer) > model.config.vocab_size:
        raise ZhllmError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has only "
                         f"{model.config.vocab_size}; they do not belong together")


def _generation_config_eos(path: Path) -> list[int]:
    f = path / "generation_config.json"
    try:
        eos = json.loads(f.read_text(encoding="utf-8")).get("eos_token_id") if f.is_file() else None
    except (json.JSONDecodeError, AttributeError):
        raise ZhllmError(f"{f}: invalid JSON") from None
    eos = [eos] if isinstance(eos, int) else (eos or [])
    return [i for i in eos if isinstance(i, int)]


def default_stop_ids(tokenizer, model: Transformer | None = None) -> list[int]:
    """The tokenizer's EOS, ChatML's end of turn, and the eos list of generation_config.json."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    im_end = tokenizer.convert_tokens_to_ids(CHAT_END)
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.append(im_end)
    ids += getattr(model, "generation_eos_ids", None) or []
    return list(dict.fromkeys(ids))


# ---- the decode loop ----
def _eager():
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def decode_steps(model: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 stop_ids: Iterable[int] = (), pad_id: int = 0,
                 finished: list[bool] | None = None) -> Iterator[list[int | None]]:
    """Yield, per step, the new token of every row (None for rows that are done).

    A row is done after a stop token (which is not yielded) or when the caller sets `finished[i] = True`
    (e.g. on a stop string). Stops when every row is done, after `max_new_tokens`, or at the context end.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ZhllmError("every prompt needs at least one token")
    cfg = model.config
    lens = [len(p) for p in prompts]
    longest = max(lens)
    if longest >= cfg.max_seq_len:
        raise ZhllmError(f"the prompt is {longest} tokens but the model's context is {cfg.max_seq_len} "
                         "(it must leave room for at least one new token)")
    top = max(max(p) for p in prompts)
    if top >= cfg.vocab_size or min(min(p) for p in prompts) < 0:
        raise ZhllmError(f"prompt token id {top} is outside the model's vocabulary ({cfg.vocab_size})")
    max_new = min(params.max_new_tokens, cfg.max_seq_len - longest)
    B = len(prompts)
    finished = finished if finished is not None else [False] * B
    stop_set = set(stop_ids)
    weight = model.model.embed_tokens.weight
    device, dtype = weight.device, weight.dtype
    padded = any(n != longest for n in lens)

    # inference_mode is entered per block, never held across a yield: the caller's code between steps
    # (a trainer, a web server) must not find itself in inference mode.
    with torch.inference_mode():
        ids = torch.full((B, longest), pad_id, dtype=torch.long)
        key_mask = torch.zeros(B, longest + max_new, dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
            key_mask[i, longest - len(p):] = True
        ids, key_mask = ids.to(device), key_mask.to(device)
        cache = KVCache.empty(cfg, B, longest + max_new, dtype, device)
        with _eager():  # layers compiled for training would recompile for every new cache shape
            hidden = model.hidden_states(ids, attention_mask=key_mask[:, :longest] if padded else None, cache=cache)
        logits = model.lm_head(hidden[:, -1])
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(B, logits.shape[-1], dtype=torch.bool, device=device)
            for i, p in enumerate(prompts):
                seen[i, torch.tensor(p, device=device)] = True
        decoder = fused_decoder(model)
        positions = torch.tensor(lens, dtype=torch.long, device=device)
        step_mask = key_mask[:, None, None, :] if padded else None
    generator = torch.Generator(device).manual_seed(params.seed) if params.seed is not None else None
    for step in range(max_new):
        with torch.inference_mode():
            tokens = next_tokens(logits, params, seen, generator)
        out: list[int | None] = []
        for i, t in enumerate(tokens.tolist()):
            if not finished[i] and t in stop_set:
                finished[i] = True
            out.append(None if finished[i] else t)
        yield out
        if all(finished) or step == max_new - 1:
            return
        with torch.inference_mode():
            if seen is not None:
                seen.scatter_(1, tokens[:, None], True)
            mask = step_mask[..., :cache.length + 1] if padded else None
            logits = decoder.step(tokens, positions, cache, mask)
            positions += 1


def generate_ids(model: Transformer, input_ids_list: Sequence[Sequence[int]], *,
                 stop_token_ids: Iterable[int] = (), pad_id: int = 0, **sampling) -> list[list[int]]:
    """New token ids per prompt (stop tokens excluded). No stop tokens unless given: ids know no tokenizer."""
    params = SamplingParams(**sampling)
    out: list[list[int]] = [[] for _ in input_ids_list]
    for tokens in decode_steps(model, [list(p) for p in input_ids_list], params, stop_token_ids, pad_id):
        for row, t in zip(out, tokens):
            if t is not None:
                row.append(t)
    return out


# ---- text in, text out ----
def _stream_rows(model, tokenizer, prompts: Sequence[str | Messages], stop_strings: Sequence[str],
                 stop_token_ids: Iterable[int] | None, sampling: dict) -> Iterator[tuple[int, str]]:
    check_vocab(model, tokenizer)
    params = SamplingParams(**sampling)
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    stops = default_stop_ids(tokenizer, model) if stop_token_ids is None else list(stop_token_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    streams = [TextStream(tokenizer, stop_strings) for _ in prompts]
    finished = [False] * len(prompts)
    for tokens in decode_steps(model, ids, params, stops, pad, finished):
        for i, t in enumerate(tokens):
            if t is None:
                continue
            piece = streams[i].push(t)
            if piece:
                yield i, piece
            if streams[i].stopped:
                finished[i] = True
    for i, s in enumerate(streams):
        piece = s.finish()
        if piece:
            yield i, piece


def stream_generate(model: Transformer, tokenizer, prompt_or_messages: str | Messages, *,
                    stop_strings: Sequence[str] = (), stop_token_ids: Iterable[int] | None = None,
                    **sampling) -> Iterator[str]:
    """Yield the answer as text pieces while it is generated; pieces never split a character.

    sampling: max_new_tokens, temperature (0 = greedy), top_k, top_p, repetition_penalty, seed.
    stop_token_ids: default `default_stop_ids` (EOS, <|im_end|>, generation_config.json); stop_strings
    end the answer at their first occurrence and are not included.
    """
    for _, piece in _stream_rows(model, tokenizer, [prompt_or_messages], stop_strings, stop_token_ids, sampling):
        yield piece


def generate(model: Transformer, tokenizer, prompt_or_messages: str | Messages, *,
             stop_strings: Sequence[str] = (), stop_token_ids: Iterable[int] | None = None, **sampling) -> str:
    """The answer to a prompt (str: plain text; list of messages: rendered with the chat template)."""
    return "".join(stream_generate(model, tokenizer, prompt_or_messages, stop_strings=stop_strings,
                                   stop_token_ids=stop_token_ids, **sampling))


def generate_batch(model: Transformer, tokenizer, prompts: Sequence[str | Messages], *,
                   stop_strings: Sequence[str] = (), stop_token_ids: Iterable[int] | None = None,
                   **sampling) -> list[str]:
    """Answers to several prompts decoded together in one batch (left padding)."""
    texts = [""] * len(prompts)
    for i, piece in _stream_rows(model, tokenizer, prompts, stop_strings, stop_token_ids, sampling):
        texts[i] += piece
    return texts
