"""Loading tokenizers: every zhllm tokenizer is a plain HF directory that AutoTokenizer reads."""
from __future__ import annotations

from pathlib import Path

from ..errors import ZhllmError
from ..pointers import resolve_model_dir

# Every file a tokenizer directory may hold (HF fast and slow formats, SentencePiece, the chat template):
# what checkpoints and shard directories copy to carry their tokenizer along.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def load_tokenizer(path: str | Path):
    """`AutoTokenizer.from_pretrained(path)` with a clear error for a missing or broken directory."""
    from transformers import AutoTokenizer

    path = resolve_model_dir(path)
    if not path.is_dir():
        raise ZhllmError(f"tokenizer directory not found: {path}")
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        raise ZhllmError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
