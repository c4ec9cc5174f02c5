"""Helpers for the `zhllm eval` tests: a planted model whose next token is known whatever the input."""
import torch
from torch import nn

from zhllm.infer.engine import Engine
from zhllm.model.io import load_model
from zhllm.tokenizer.encode import encode_text
from zhllm.tokenizer.load import load_tokenizer


class BiasedHead(nn.Linear):
    """An lm_head with zero weights and a bias: the model's next-token distribution is softmax(bias) at every
    position. A subclass, so the engine runs the model's own forward (the fused decoder knows no bias)."""


def planted_engine(model_dir, favourite: str, strength: float = 8.0) -> tuple[Engine, torch.Tensor]:
    """An engine whose model always prefers the single token of `favourite`; also the log-probs it assigns."""
    model, tok = load_model(model_dir, dtype=torch.float32), load_tokenizer(model_dir)
    vocab = model.config.vocab_size
    head = BiasedHead(model.config.dim, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.linspace(0, 1, vocab))  # distinct values: no ties among the other tokens
        (fav,) = encode_text(tok, favourite)
        head.bias[fav] = strength
    model.lm_head = head
    return Engine(model, tok), head.bias.detach().log_softmax(-1)
