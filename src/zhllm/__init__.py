"""zhllm: raw Chinese text to a chatting, preference-aligned small language model.

Public API (everything else is importable from its module):
    load_model(path) -> Transformer            any HF Llama/Qwen2 directory, eval mode
    load_tokenizer(path)                        AutoTokenizer.from_pretrained with clear errors
    generate(model, tokenizer, prompt_or_messages, **sampling) -> str
    stream_generate(...)                        yields text pieces as they are decoded
"""
from .errors import ConfigError, ZhllmError
from .model.io import load_model, save_model
from .tokenizer.load import load_tokenizer

__all__ = ["load_model", "save_model", "load_tokenizer", "generate", "stream_generate", "ZhllmError", "ConfigError"]


def __getattr__(name):
    if name in ("generate", "stream_generate"):
        from .infer import generate as _g
        return getattr(_g, name)
    raise AttributeError(name)
