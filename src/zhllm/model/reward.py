"""A reward model: the decoder with a scalar head read at each sequence's last real token.

It is transformers' `LlamaForSequenceClassification` / `Qwen2ForSequenceClassification` with `num_labels: 1`:
the same `model.*` backbone weights as the causal LM, `score.weight` (1, dim) instead of `lm_head`, and a
config.json that names that class, so `AutoModelForSequenceClassification.from_pretrained(DIR)` loads a
saved reward model unchanged and scores a right-padded batch as zhllm does (transformers reads the last token
that is not `pad_token_id`; here the attention mask says where each row ends).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ZhllmError
from .config import ModelConfig
from .transformer import Transformer

HF_HEADS = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification"}


class RewardModel(Transformer):
    """`forward(input_ids, attention_mask)` -> one score per row (B,)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.lm_head = None  # no vocabulary head: `score` reads the hidden state instead
        self.score = nn.Linear(cfg.dim, 1, bias=False)

    @property
    def hf_config_extra(self) -> dict:
        """What config.json says beyond the causal LM's keys (save_model merges it)."""
        return {"architectures": [HF_HEADS[self.config.arch]], "num_labels": 1,
                "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of right-padded rows (attention_mask 1 on real tokens; None: every token is real)."""
        h = self.hidden_states(input_ids, attention_mask=attention_mask)
        last = (attention_mask.long().sum(1) - 1 if attention_mask is not None
                else torch.full((h.shape[0],), h.shape[1] - 1, device=h.device))
        return self.score(h[torch.arange(h.shape[0], device=h.device), last]).squeeze(-1).float()


def default_pad_token_id(tokenizer) -> int:
    """The `pad_token_id` a reward model's config.json names, which transformers uses to find each row's last
    token: the tokenizer's pad token, else its end-of-text token, else 0 (zhllm's batches pad with the same)."""
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return (tokenizer.eos_token_id if tokenizer is not None else None) or 0


def is_reward_model_dir(path: str | Path) -> bool:
    import json
    from ..pointers import resolve_model_dir
    cfg = resolve_model_dir(path) / "config.json"
    try:
        archs = json.loads(cfg.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in archs)


def load_reward_model(path: str | Path, dtype: torch.dtype | None = torch.float32, train: bool = False,
                      seed: int = 0) -> RewardModel:
    """A reward model directory as it was saved, or a causal LM (an SFT checkpoint) with a new score head
    (normal(0, init_std), seeded) in place of its vocabulary head."""
    from ..pointers import resolve_model_dir
    from .io import IGNORED_KEYS, read_model_config, read_state_dict
    path = resolve_model_dir(path)
    cfg = read_model_config(path)
    state = {k: v for k, v in read_state_dict(path).items() if not k.endswith(IGNORED_KEYS) and k != "lm_head.weight"}
    if "score.weight" not in state:
        gen = torch.Generator().manual_seed(seed)
        state["score.weight"] = torch.randn(1, cfg.dim, generator=gen) * cfg.init_std
    with torch.device("meta"):
        model = RewardModel(cfg)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ZhllmError(f"{path}: weights do not fit a reward model of this config.json ({what})")
    if tuple(state["score.weight"].shape) != (1, cfg.dim):
        raise ZhllmError(f"{path}: score.weight has shape {tuple(state['score.weight'].shape)}; a reward model has "
                         f"one output (1, {cfg.dim})")
    target = dtype or state["model.embed_tokens.weight"].dtype
    model.load_state_dict({k: v.to(target) for k, v in state.items()}, strict=True, assign=True)
    from .transformer import rope_frequencies
    model.inv_freq = rope_frequencies(cfg)[0]
    return model.train(train)
