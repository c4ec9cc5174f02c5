"""ModelConfig: the model's shape, and its two-way mapping to a Hugging Face `config.json`.

zhllm writes `config.json` exactly as `transformers` would for `LlamaForCausalLM` / `Qwen2ForCausalLM` (and
`Qwen2MoeForCausalLM` for a mixture-of-experts model), so a checkpoint directory needs no conversion;
and it reads any such file, whichever transformers version wrote it
(`rope_scaling` + `rope_theta` in 4.x, `rope_parameters` in 5.x).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from ..config import PACKAGE_CONFIGS, checked, from_dict, read_yaml
from ..errors import ConfigError, ZhllmError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "mixtral": "MixtralForCausalLM"}
MOE_ARCHS = ("qwen2_moe", "mixtral")


@dataclass
class RopeScaling:
    type: Literal["linear", "yarn", "llama3", "dynamic"] = "linear"
    factor: float = 1.0
    original_max_position_embeddings: Optional[int] = None
    # YaRN
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: Optional[float] = None
    # Llama 3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0


@dataclass
class MoEConfig:
    """The mixture-of-experts feed-forward: `top_k` of `n_experts` routed SwiGLU experts per token, plus (arch
    qwen2_moe) a shared expert every token passes through, scaled by a sigmoid gate (transformers' Qwen2-MoE);
    arch mixtral has no shared expert (n_shared_experts: 0) and always renormalises the top-k weights."""
    n_experts: int = checked(8, ge=1)
    top_k: int = checked(2, ge=1)
    expert_ffn_dim: int = checked(256, ge=1)          # each routed expert's hidden size (moe_intermediate_size)
    n_shared_experts: int = checked(1, ge=0)          # the shared expert is this many experts wide ...
    shared_expert_ffn_dim: Optional[int] = checked(None, ge=1)  # ... unless its hidden size is given outright
    norm_topk_prob: bool = True                       # renormalise the top-k router probabilities to sum to 1
    router_aux_loss_coef: float = checked(0.01, ge=0)  # Switch-Transformer load balancing, as transformers computes it
    router_z_loss_coef: float = checked(0.001, ge=0)   # ST-MoE: mean squared log-sum-exp of the router logits
    dense_layers: list[int] = dataclasses.field(default_factory=list)  # layers with a dense MLP (mlp_only_layers)

    def __post_init__(self):
        if self.top_k > self.n_experts:
            raise ConfigError(f"model.moe.top_k={self.top_k} is more than model.moe.n_experts={self.n_experts}")
        if self.shared_expert_ffn_dim is None:
            self.shared_expert_ffn_dim = self.n_shared_experts * self.expert_ffn_dim


@dataclass
class ModelConfig:
    arch: Literal["llama", "qwen2", "qwen2_moe", "mixtral"] = "llama"
    vocab_size: int = 6400
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: Optional[int] = None  # default dim // n_heads
    ffn_dim: int = 1408
    max_seq_len: int = 2048
    rope_theta: float = 1e6
    rope_scaling: Optional[RopeScaling] = None
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    attention_bias: Optional[bool] = None  # q/k/v bias; default True for qwen2, False for llama
    mlp_bias: bool = False
    init_std: float = 0.02
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    moe: Optional[MoEConfig] = None  # arch qwen2_moe or mixtral only

    def __post_init__(self):
        if self.attention_bias is None:
            self.attention_bias = self.arch in ("qwen2", "qwen2_moe")
        if (self.moe is not None) != (self.arch in MOE_ARCHS):
            raise ConfigError("model.moe goes with arch: qwen2_moe or mixtral (and those need a model.moe section)")
        if self.arch == "qwen2_moe" and not self.moe.shared_expert_ffn_dim:
            raise ConfigError("arch qwen2_moe always has a shared expert (model.moe.n_shared_experts >= 1); "
                              "arch mixtral has none")
        if self.arch == "mixtral":
            m = self.moe
            if m.shared_expert_ffn_dim or not m.norm_topk_prob or m.dense_layers or self.attention_bias:
                raise ConfigError("arch mixtral has no shared expert, no dense layers and no attention bias, and "
                                  "renormalises the top-k weights: set model.moe.n_shared_experts: 0, "
                                  "norm_topk_prob: true, dense_layers: [] and attention_bias: false")
        if self.moe is not None and any(not 0 <= i < self.n_layers for i in self.moe.dense_layers):
            raise ConfigError(f"model.moe.dense_layers must be layer numbers below model.n_layers={self.n_layers}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}")
        if self.arch != "llama" and self.mlp_bias:
            raise ConfigError(f"model.mlp_bias is not supported by the {self.arch} architecture (use arch: llama)")

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer not in self.moe.dense_layers

    def num_params(self, include_embeddings: bool = True, active: bool = False) -> int:
        """Parameter count; `active`: only those one token uses (top_k routed experts, not all of them)."""
        hd, kv = self.head_dim, self.n_kv_heads * self.head_dim
        attn = self.dim * self.n_heads * hd * 2 + self.dim * kv * 2
        if self.attention_bias:
            attn += self.n_heads * hd + 2 * kv
        dense = 3 * self.dim * self.ffn_dim + (2 * self.ffn_dim + self.dim if self.mlp_bias else 0)
        body = self.dim
        for layer in range(self.n_layers):
            mlp = dense
            if self.is_moe_layer(layer):
                m = self.moe
                experts = m.top_k if active else m.n_experts
                mlp = (3 * self.dim * (experts * m.expert_ffn_dim + m.shared_expert_ffn_dim)
                       + self.dim * (m.n_experts + (1 if m.shared_expert_ffn_dim else 0)))
            body += attn + mlp + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return body + (emb if include_embeddings else 0)

    # ---- Hugging Face config.json ----
    def to_hf_dict(self) -> dict:
        rope_params = {"rope_type": "default", "rope_theta": self.rope_theta}
        rope_scaling = None
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            rope_scaling = {"rope_type": rs.type, "factor": rs.factor}
            if rs.original_max_position_embeddings:
                rope_scaling["original_max_position_embeddings"] = rs.original_max_position_embeddings
            if rs.type == "yarn":
                rope_scaling.update(beta_fast=rs.beta_fast, beta_slow=rs.beta_slow)
                if rs.attention_factor is not None:
                    rope_scaling["attention_factor"] = rs.attention_factor
            if rs.type == "llama3":
                rope_scaling.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor)
            rope_params = {**rope_scaling, "rope_theta": self.rope_theta}
        d = {
            "architectures": [ARCHITECTURES[self.arch]],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "initializer_range": self.init_std,
            "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            # transformers 4.x reads these two, 5.x reads rope_parameters; both are written.
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "rope_parameters": rope_params,
            "attention_dropout": 0.0,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        if self.arch == "llama":
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias, pretraining_tp=1)
        elif self.arch == "qwen2_moe":
            m = self.moe
            d.update(qkv_bias=bool(self.attention_bias), use_sliding_window=False, sliding_window=None,
                     max_window_layers=self.n_layers, layer_types=["full_attention"] * self.n_layers,
                     num_experts=m.n_experts, num_experts_per_tok=m.top_k, moe_intermediate_size=m.expert_ffn_dim,
                     shared_expert_intermediate_size=m.shared_expert_ffn_dim, norm_topk_prob=m.norm_topk_prob,
                     router_aux_loss_coef=m.router_aux_loss_coef, router_z_loss_coef=m.router_z_loss_coef,
                     decoder_sparse_step=1, mlp_only_layers=list(m.dense_layers), output_router_logits=False)
        elif self.arch == "mixtral":
            m = self.moe
            d.update(intermediate_size=m.expert_ffn_dim, num_local_experts=m.n_experts, num_experts_per_tok=m.top_k,
                     router_aux_loss_coef=m.router_aux_loss_coef, router_z_loss_coef=m.router_z_loss_coef,
                     router_jitter_noise=0.0, sliding_window=None, output_router_logits=False)
        else:
            if not self.attention_bias:
                raise ConfigError("the qwen2 architecture always has q/k/v bias; use arch: llama for none")
            d.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.n_layers,
                     layer_types=["full_attention"] * self.n_layers)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type not in ARCHITECTURES:
            archs = d.get("architectures") or [model_type]
            raise ZhllmError(f"{source}: unsupported architecture {archs[0]!r} (model_type {model_type!r}); "
                             f"zhllm supports {', '.join(ARCHITECTURES.values())}")
        if model_type in ("qwen2", "qwen2_moe") and d.get("use_sliding_window"):
            raise ZhllmError(f"{source}: Qwen2 sliding-window attention is not supported")
        moe = None
        if model_type == "mixtral":
            if d.get("sliding_window"):
                raise ZhllmError(f"{source}: Mixtral sliding-window attention is not supported")
            moe = MoEConfig(n_experts=d["num_local_experts"], top_k=d["num_experts_per_tok"],
                            expert_ffn_dim=d["intermediate_size"], n_shared_experts=0, norm_topk_prob=True,
                            router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001),
                            router_z_loss_coef=d.get("router_z_loss_coef", 0.0))
        if model_type == "qwen2_moe":
            n_layers, step = d["num_hidden_layers"], d.get("decoder_sparse_step", 1)
            dense = sorted(set(d.get("mlp_only_layers") or []) | {i for i in range(n_layers) if (i + 1) % step})
            shared = d.get("shared_expert_intermediate_size") or 0
            if not shared:
                raise ZhllmError(f"{source}: a Qwen2-MoE model without a shared expert is not supported")
            moe = MoEConfig(n_experts=d["num_experts"], top_k=d["num_experts_per_tok"],
                            expert_ffn_dim=d["moe_intermediate_size"], shared_expert_ffn_dim=shared,
                            norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                            router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001),
                            router_z_loss_coef=d.get("router_z_loss_coef", 0.0), dense_layers=dense)
        if d.get("hidden_act", "silu") != "silu":
            raise ZhllmError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (only silu)")
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        rope_scaling = None
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("default", None):
                if kind not in ("linear", "yarn", "llama3", "dynamic"):
                    raise ZhllmError(f"{source}: rope scaling {kind!r} is not supported "
                                     "(supported: linear, yarn, llama3, dynamic)")
                keep = {f.name for f in dataclasses.fields(RopeScaling)}
                rope_scaling = RopeScaling(type=kind, **{k: v for k, v in scaling.items()
                                                         if k in keep and k != "type" and v is not None})
        eos = d.get("eos_token_id")
        n_heads = d["num_attention_heads"]
        return cls(
            arch=model_type,
            vocab_size=d["vocab_size"],
            dim=d["hidden_size"],
            n_layers=d["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
            ffn_dim=d["intermediate_size"],
            max_seq_len=d.get("max_position_embeddings", 2048),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias={"qwen2": True, "qwen2_moe": bool(d.get("qkv_bias", True))}.get(
                model_type, bool(d.get("attention_bias", False))),
            mlp_bias=bool(d.get("mlp_bias", False)),
            init_std=d.get("initializer_range", 0.02),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) and eos else eos,
            pad_token_id=d.get("pad_token_id"),
            moe=moe,
        )


def preset_names() -> list[str]:
    return sorted(p.stem for p in (PACKAGE_CONFIGS / "model").glob("*.yaml"))


def model_config_from(preset: str | None = None, overrides: dict | None = None, source: str = "model") -> ModelConfig:
    """A ModelConfig from a preset name (or YAML path) plus field overrides, validated."""
    data: dict = {}
    if preset:
        path = Path(preset)
        if path.suffix not in (".yaml", ".yml"):
            path = PACKAGE_CONFIGS / "model" / f"{preset}.yaml"
            if not path.is_file():
                raise ConfigError(f"unknown model preset {preset!r} (presets: {', '.join(preset_names())})")
        data = read_yaml(path)
        source = str(path)
    data = {**data, **(overrides or {})}
    return from_dict(ModelConfig, data, source, "model.")

