"""The tokenizer part of a GGUF file: a byte-level BPE vocabulary as llama.cpp's "gpt2" tokenizer model reads it.

Read straight from `tokenizer.json` / `tokenizer_config.json` (no transformers), so what is written is exactly
what the HF tokenizer holds: tokens in id order (already in GPT-2's byte-to-unicode spelling, which llama.cpp
expects), merges as "a b", and a type per token. Special added tokens become CONTROL (llama.cpp then only
parses `<|im_start|>` typed in text as that token when asked to parse specials, like zhllm's rule 10); other
added tokens USER_DEFINED. Rows of the embedding beyond the tokenizer (zhllm rounds the vocabulary up to a
multiple of 64) get UNUSED placeholder tokens, which llama.cpp never produces from text.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ZhllmError
from ..tokenizer.special import IM_END
from ..tokenizer.train import SPLIT_PATTERN

# llama.cpp names its pre-tokenizers (the regex splitting text before BPE) rather than reading the regex from
# the file. zhllm's pattern is Qwen2's (letters in runs, digits one by one), which llama.cpp calls "qwen2";
# a tokenizer extended from Qwen2's keeps it. Any other pattern would tokenize differently there, so it is
# refused rather than written under a guessed name.
KNOWN_PRE_TOKENIZERS = {SPLIT_PATTERN: "qwen2"}
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # gguf.TokenType values


@dataclass
class GGUFVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/eot/pad -> id
    add_bos: bool = False
    chat_template: str | None = None


def read_vocab(model_dir: Path, vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary of the tokenizer in `model_dir`, padded to the model's `vocab_size` rows."""
    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise ZhllmError(f"{model_dir}: no tokenizer.json; GGUF export needs the model's fast (byte-level BPE) "
                         "tokenizer in the checkpoint directory")
    data = _read_json(tok_file)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict) or not _is_byte_level(data):
        raise ZhllmError(f"{tok_file}: GGUF export supports byte-level BPE tokenizers (zhllm tokenizer train's "
                         "default backend, Qwen2's); this one is not (a SentencePiece-style tokenizer?)")
    pre = _pre_tokenizer_name(data, tok_file)

    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types: dict[int, int] = {}
    for added in data.get("added_tokens") or []:
        by_id[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    n_tok = max(by_id) + 1
    if n_tok > vocab_size:
        raise ZhllmError(f"{model_dir}: the tokenizer has {n_tok} tokens but the model's vocabulary (config.json "
                         f"vocab_size) has {vocab_size} rows; this tokenizer does not belong to this model "
                         "(after `zhllm tokenizer extend`, grow the model with `zhllm model resize`)")
    tokens, token_types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            token_types.append(types.get(i, NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            token_types.append(UNUSED)
    if len(set(tokens)) != len(tokens):
        raise ZhllmError(f"{tok_file}: two ids share one token text, which llama.cpp cannot tell apart")

    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    cfg = _read_json(model_dir / "tokenizer_config.json") if (model_dir / "tokenizer_config.json").is_file() else {}
    ids = {t: i for i, t in enumerate(tokens)}
    special_ids = {}
    for key in ("bos", "eos", "pad", "unk"):
        text = _token_text(cfg.get(f"{key}_token"))
        if text is not None:
            if text not in ids:
                raise ZhllmError(f"{model_dir / 'tokenizer_config.json'}: {key}_token {text!r} "
                                 "is not in the vocabulary")
            special_ids[key] = ids[text]
    if IM_END in ids:  # llama.cpp stops a chat turn at eot; ChatML's end of turn is <|im_end|>
        special_ids["eot"] = ids[IM_END]
    return GGUFVocab(tokens=tokens, types=token_types, merges=merges, pre=pre, special_ids=special_ids,
                     add_bos=bool(cfg.get("add_bos_token")) and "bos" in special_ids,
                     chat_template=_chat_template(model_dir, cfg))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ZhllmError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None


def _pre_tokenizers(data: dict) -> list[dict]:
    pre = data.get("pre_tokenizer") or {}
    return (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]


def _is_byte_level(data: dict) -> bool:
    return (any(p.get("type") == "ByteLevel" for p in _pre_tokenizers(data))
            and (data.get("decoder") or {}).get("type") == "ByteLevel")


def _pre_tokenizer_name(data: dict, source: Path) -> str:
    splits = [p for p in _pre_tokenizers(data) if p.get("type") == "Split"]
    byte_level = [p for p in _pre_tokenizers(data) if p.get("type") == "ByteLevel"]
    pattern = (splits[0].get("pattern") or {}).get("Regex") if len(splits) == 1 else None
    if pattern in KNOWN_PRE_TOKENIZERS and not any(p.get("use_regex", True) for p in byte_level):
        return KNOWN_PRE_TOKENIZERS[pattern]
    raise ZhllmError(f"{source}: its pre-tokenizer ({pattern or 'no single Split regex'}) is not zhllm's/Qwen2's, "
                     "the one llama.cpp knows as \"qwen2\"; llama.cpp would split text differently, so it is "
                     "not exported")


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(model_dir: Path, cfg: dict) -> str | None:
    template = cfg.get("chat_template")
    jinja = model_dir / "chat_template.jinja"
    if not template and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return template if isinstance(template, str) and template else None
