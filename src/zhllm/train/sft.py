"""`zhllm sft`: supervised fine-tuning = the shared Trainer + a masked causal-LM objective + chat examples.

Nothing here is a training loop or launch code (rule 2; train/run.py launches the `SFT` stage record): this
module types the SFT recipe, turns chat records into a deterministic `SFTDataset`, sets up LoRA / freezing /
NEFTune on the model, and tells the trainer how to write checkpoints of a LoRA model (the merged HF model for
chat and evaluation, plus the PEFT adapter in `adapter/` for `PeftModel.from_pretrained` and for exact resume).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Literal, Optional

import torch

from ..config import checked
from ..errors import ConfigError, ZhllmError
from .config import EvalSection, StageConfig, TrainSection, load_stage_config
from .lora import LORA_TARGETS
from .objectives import MaskedCausalLM
from .run import Stage, StageRun, run_stage

ADAPTER_DIR = "adapter"


@dataclass
class SftDataSection:
    path: list[str] = checked(default_factory=list, nonblank=True)  # chat files, dirs or globs; or one SFT shard dir
    format: Literal["auto", "alpaca", "sharegpt", "messages", "prompt_response"] = "auto"
    max_len: Optional[int] = checked(None, ge=2)  # longest conversation in tokens; default train.seq_len
    packing: bool = True              # several conversations per row, no attention across them
    val_fraction: float = checked(0.02, ge=0, lt=1)  # a seeded random subset of conversations; shards: 0 or their own
    overflow: Literal["truncate", "skip"] = "truncate"  # too long: drop whole earliest turns, or skip
    strict: bool = False


@dataclass
class LoraSection:
    enabled: bool = False
    r: int = checked(16, ge=1)
    alpha: float = checked(32, gt=0)
    # peft's own default; on a CPU each targeted layer's dropout mask is a full pass over its input: 0.05 made a
    # tiny-model LoRA step 1.44x slower for the same loss after 100 steps (README, SFT section)
    dropout: float = checked(0.0, ge=0, lt=1)
    target: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    rslora: bool = False
    qlora: bool = False               # 4-bit base (bitsandbytes, CUDA only)

    def check(self, train: TrainSection, source: str) -> None:
        """The LoRA settings every stage that trains a LoRA policy rejects."""
        if self.qlora and not self.enabled:
            raise ConfigError(f"{source}: lora.qlora needs lora.enabled: true")
        if self.enabled and train.bf16_weights:
            # fp32 masters of a frozen base would only cost memory, and adapters train under autocast anyway
            raise ConfigError(f"{source}: train.bf16_weights is for full fine-tuning; with lora.enabled set "
                              "train.bf16_weights=false")


@dataclass
class FreezeSection:
    embeddings: bool = False
    first_layers: int = checked(0, ge=0)


@dataclass
class SftConfig(StageConfig):
    """The SFT recipe: the shared sections (SFT's own defaults), chat data, and LoRA / freezing / NEFTune."""
    model: dict = field(default_factory=dict)   # init_from: DIR (any zhllm or HF Llama/Qwen2 checkpoint)
    train: TrainSection = field(default_factory=lambda: TrainSection(max_steps=200, lr=1e-4, warmup_steps=10))
    eval: EvalSection = field(default_factory=lambda: EvalSection(every=100, batches=8))
    out_dir: str = checked("runs/sft", nonblank=True)
    data: SftDataSection = field(default_factory=SftDataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    freeze: FreezeSection = field(default_factory=FreezeSection)
    neftune_alpha: float = checked(0.0, ge=0)  # 0 = off; 5 is the NEFTune paper's usual value

    def validate(self, source: str) -> "SftConfig":
        if set(self.model) != {"init_from"}:
            raise ConfigError(f"{source}: the sft model section takes exactly `init_from: DIR` "
                              f"(got keys {sorted(self.model) or 'none'})")
        if not isinstance(self.model["init_from"], str) or not self.model["init_from"].strip():
            raise ConfigError(f"{source}: 'model.init_from' must name a model directory, "
                              f"got {self.model['init_from']!r}")
        if not self.data.path:
            raise ConfigError(f"{source}: data.path must name chat files or an SFT shard directory")
        super().validate(source)
        self.lora.check(self.train, source)
        return self


def load_sft_config(path: str | Path, overrides: list[str] | None = None) -> tuple[SftConfig, str]:
    return load_stage_config(SftConfig, path, overrides, "sft")


def open_sft_data(cfg: SftConfig, tokenizer, log=print):
    """(train, val or None) SFTDataset from the configured chat files or SFT shard directory, with the
    skip/truncation counts logged. Shards come with their encode options and val split (see sft_shards)."""
    from ..data.sft_batches import build_sft_datasets
    from ..data.sft_shards import ENCODE_OPTIONS, find_sft_shards, sft_shard_datasets
    d, t = cfg.data, cfg.train
    if d.max_len and d.max_len > t.seq_len:
        raise ConfigError(f"data.max_len={d.max_len} exceeds train.seq_len={t.seq_len}")
    shards = find_sft_shards(list(d.path))
    if shards is not None:
        default = SftDataSection()
        requested = {k: getattr(d, k) for k in ENCODE_OPTIONS if getattr(d, k) != getattr(default, k)}
        train, val, stats, read_stats = sft_shard_datasets(shards, tokenizer, t.seq_len, packing=d.packing,
                                                           seed=t.seed, val_fraction=d.val_fraction,
                                                           requested=requested)
        log(f"sft data: SFT shards {shards} (encoded by zhllm data tokenize-sft; val split as stored)")
    else:
        train, val, stats, read_stats = build_sft_datasets(
            tokenizer, list(d.path), t.seq_len, fmt=d.format, max_len=d.max_len, packing=d.packing,
            val_fraction=d.val_fraction, seed=t.seed, overflow=d.overflow, strict=d.strict)
    log(f"sft data: {read_stats.summary().splitlines()[0]}")
    log(f"sft data: {stats.summary()}")
    return train, val


def load_policy(run: StageRun, load: Callable[[str | Path], torch.nn.Module] | None = None) -> torch.nn.Module:
    """Base weights (or a full-FT checkpoint to resume) with LoRA as `run.cfg.lora` says, in train mode: what
    SFT, DPO, GRPO, PPO and the reward model train. `load(dir)` reads a model (default: the causal LM in fp32;
    the reward model stage passes its own)."""
    from ..model.io import load_model
    from .lora import apply_lora, load_adapter
    load = load or (lambda path: load_model(path, dtype=torch.float32, train=True))
    lora, resume_dir = run.cfg.lora, run.resume_dir
    full_resume = resume_dir is not None and not lora.enabled
    model = load(resume_dir if full_resume else run.init_from)
    if len(run.tokenizer) > model.config.vocab_size:
        raise ZhllmError(f"{run.init_from}: tokenizer has {len(run.tokenizer)} tokens, the model only "
                         f"{model.config.vocab_size}")
    if lora.enabled:
        for p in model.parameters():
            p.requires_grad_(False)
        if resume_dir is not None:
            model = load_adapter(model, resume_dir / ADAPTER_DIR)
            for n, p in model.named_parameters():
                p.requires_grad_("lora_" in n)
        else:
            model = apply_lora(model, lora.r, lora.alpha, lora.dropout, lora.target, lora.rslora, lora.qlora)
    return model.train()


def build_sft_model(run: StageRun, train) -> torch.nn.Module:
    """The policy (load_policy), then freezing / NEFTune as configured."""
    from .lora import enable_neftune, freeze_params
    cfg: SftConfig = run.cfg
    model = load_policy(run)
    if cfg.freeze.embeddings or cfg.freeze.first_layers:
        freeze_params(model, cfg.freeze.embeddings, cfg.freeze.first_layers)
    if cfg.neftune_alpha > 0:
        enable_neftune(model, cfg.neftune_alpha)
    return model


def merged_model(model: torch.nn.Module) -> torch.nn.Module:
    """A plain model of the same class (a Transformer, a RewardModel) whose weights are base + LoRA delta; the
    training model is left untouched."""
    from peft.tuners.lora import LoraLayer

    from ..model.io import model_from_state_dict
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            # LoRA on a parameter (MoE experts) wraps its module once per parameter: name it from the base.
            param = getattr(module, "parameter_name", None) or "weight"
            owner = name.replace(".base_layer", "")
            state[f"{owner}.{param}"] = getattr(base, param).detach() + module.get_delta_weight("default").detach()
            if getattr(base, "bias", None) is not None:
                state[f"{owner}.bias"] = base.bias.detach()
    for name, p in model.state_dict().items():
        if "lora_" in name or ".base_layer." in name:
            continue
        state.setdefault(name, p.detach())
    with torch.device("meta"):
        plain = type(model)(model.config)
    return model_from_state_dict(model.config, state, plain)


def lora_checkpoint_hooks(base_dir: str, modules_to_save: tuple[str, ...] = ()):
    """(export, extra_writer) for the trainer: write the merged model, and the adapter under adapter/ (with the
    modules trained whole beside it, as a reward model's head)."""
    from .lora import save_adapter

    def extra(model: torch.nn.Module, tmp: Path) -> None:
        save_adapter(model, tmp / ADAPTER_DIR, base_model_dir=base_dir, modules_to_save=modules_to_save)

    return merged_model, extra


def resolve_init_from(run: StageRun) -> None:
    """The base model directory and its tokenizer, checked before any process group exists."""
    from ..pointers import resolve_model_dir
    from ..tokenizer.load import load_tokenizer
    init_from = str(resolve_model_dir(run.cfg.model["init_from"]))  # checkpoints/latest: the step it names now
    if not Path(init_from).is_dir():  # before the tokenizer: its "not found" would blame the wrong thing
        raise ConfigError(f"{run.source}: model.init_from {init_from}: no such model directory")
    run.init_from = run.tokenizer_dir = init_from
    run.tokenizer = load_tokenizer(init_from)


SFT = Stage(
    name="sft", config=SftConfig, objective=lambda run, model: MaskedCausalLM(), prepare=resolve_init_from,
    open_data=lambda run: open_sft_data(run.cfg, run.tokenizer, log=run.echo), build_model=build_sft_model,
    checkpoint_hooks=lambda run: lora_checkpoint_hooks(run.init_from) if run.cfg.lora.enabled else (None, None))


def run_sft(config: str | Path, overrides: list[str] | None = None, resume: str | None = None) -> dict:
    """Fine-tune from a recipe; returns the run summary. Works under torchrun like pretraining."""
    return run_stage(SFT, config, overrides, resume)
