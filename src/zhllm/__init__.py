"""zhllm: raw Chinese text to a chatting, preference-aligned small language model.

Public API (everything else is importable from its module):
    load_model(path) -> Transformer            any HF Llama/Qwen2 directory, eval mode
    load_tokenizer(path)                        AutoTokenizer.from_pretrained with clear errors
    Engine.load(path) / Engine(model, tok)      generate, stream, generate_batch (n samples, log-probs), score
    generate(model, tokenizer, prompt_or_messages, **sampling) -> str   one call on a fresh Engine
    stream_generate(...)                        yields text pieces as they are decoded
Heavy modules (torch, transformers) load on first use, so `zhllm data ... --help` and worker processes
start fast.
"""
from .errors import ConfigError, ZhllmError

__all__ = ["load_model", "save_model", "load_tokenizer", "Engine", "generate", "stream_generate", "ZhllmError",
           "ConfigError"]

_LAZY = {"load_model": "model.io", "save_model": "model.io", "load_tokenizer": "tokenizer.load",
         "Engine": "infer.engine", "generate": "infer.generate", "stream_generate": "infer.generate"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'zhllm' has no attribute {name!r}")
