"""LoRA on zhllm's model via `peft`, adapters in PEFT's own format, merging, QLoRA, NEFTune, freezing.

zhllm's module names are transformers' (`model.layers.N.self_attn.q_proj`, ...), so `peft` injects its LoRA
layers into our model directly and the adapter keys are the ones `PeftModel` writes for an HF CausalLM once
the `base_model.model.` prefix of its wrapper is added. An adapter saved here therefore loads with
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir)`.
"""
from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import ZhllmError
from ..fsutil import atomic_directory
from ..model.moe import Experts

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# In a mixture-of-experts model these targets name the routed experts' stacked weights too.
EXPERT_PARAMS = {"gate_proj": "mlp.experts.gate_up_proj", "up_proj": "mlp.experts.gate_up_proj",
                 "down_proj": "mlp.experts.down_proj"}
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers CausalLM
MERGE_COMMAND = "lora merge"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def lora_config(r: int = 8, alpha: float = 16, dropout: float = 0.0, target: Sequence[str] = LORA_TARGETS,
                rslora: bool = False):
    from peft import LoraConfig

    if r <= 0:
        raise ZhllmError(f"lora.r must be positive, got {r}")
    if not 0 <= dropout < 1:
        raise ZhllmError(f"lora.dropout must be in [0, 1), got {dropout}")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target),
                      use_rslora=rslora, bias="none", task_type="CAUSAL_LM")


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               target: Sequence[str] = LORA_TARGETS, rslora: bool = False, qlora: bool = False) -> nn.Module:
    """Inject LoRA layers in place; afterwards only the LoRA matrices require grad. In a mixture-of-experts model,
    targets `gate_proj`/`up_proj`/`down_proj` cover the stacked routed experts too (peft's `target_parameters`:
    a rank-r pair per expert, without dropout), besides the shared expert's linear layers."""
    config = lora_config(r, alpha, dropout, target, rslora)
    experts = sorted({EXPERT_PARAMS[t] for t in target if t in EXPERT_PARAMS})
    if experts and any(isinstance(m, Experts) for m in model.modules()):
        if dropout > 0:  # peft has no dropout for LoRA on parameters
            print(f"warning: lora.dropout={dropout}: peft's LoRA on stacked expert weights has no dropout, so the "
                  "routed experts stay frozen (attention and the shared expert get LoRA); set lora.dropout=0 to "
                  "adapt the experts too", file=sys.stderr)
        else:
            config.target_parameters = experts
    return inject_lora(model, config, qlora=qlora)


def inject_lora(model: nn.Module, config, qlora: bool = False) -> nn.Module:
    from peft import inject_adapter_in_model

    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(config.target_modules) - present)
    if unknown:
        raise ZhllmError(f"lora.target names {unknown} are not linear layers of this model "
                         f"(choose from {', '.join(sorted(present - {'lm_head'}))})")
    if qlora:
        quantize_base_4bit(model)
    model = inject_adapter_in_model(config, model)
    model.peft_config = {"default": config}  # where PeftModel keeps it too; save_adapter reads it back
    return model


def quantize_base_4bit(model: nn.Module) -> None:
    """QLoRA's base: every linear layer but lm_head becomes a frozen NF4 `bitsandbytes` layer on the GPU."""
    if not torch.cuda.is_available():
        raise ZhllmError("QLoRA needs a CUDA GPU (bitsandbytes 4-bit weights); "
                         "on CPU use plain LoRA (lora.qlora=false)")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ZhllmError("QLoRA needs bitsandbytes: pip install bitsandbytes") from None
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.endswith("lm_head"):
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=torch.bfloat16, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(module.weight.data.cpu(), requires_grad=False, quant_type="nf4")
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data, requires_grad=False)
        _replace_module(model, name, q)
    model.cuda()  # Params4bit quantises when moved to the GPU


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    lora = sys.modules.get("peft.tuners.lora")  # not imported yet: no model holds a LoRA layer (and peft costs ~1 s)
    if lora is None:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, lora.LoraLayer)]


def adapter_state_dict(model: nn.Module, modules_to_save: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """LoRA weights under the keys PeftModel.save_pretrained would write for an HF CausalLM (or
    SequenceClassification model), plus the weights of `modules_to_save` (modules trained whole beside the
    adapter, as a reward model's `score` head) under the keys peft gives them."""
    from peft import get_peft_model_state_dict

    if not _lora_layers(model):
        raise ZhllmError("the model has no LoRA layers to save (apply_lora first)")
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    for name in modules_to_save:
        state.update({f"{name}.{k}": v for k, v in model.get_submodule(name).state_dict().items()})
    return {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_dir: str | Path | None = None,
                 modules_to_save: Sequence[str] = ()) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (PEFT format) atomically. With `modules_to_save`
    (a reward model's head) it is a SEQ_CLS adapter: `PeftModel.from_pretrained` over transformers'
    `*ForSequenceClassification` of the base loads it, head included."""
    from safetensors.torch import save_file

    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        raise ZhllmError("the model has no LoRA config to save (apply_lora first)")
    state = adapter_state_dict(model, modules_to_save)
    config_dict = config.to_dict()
    config_dict["base_model_name_or_path"] = str(base_model_dir) if base_model_dir else None
    config_dict["task_type"] = "SEQ_CLS" if modules_to_save else "CAUSAL_LM"
    config_dict["modules_to_save"] = list(modules_to_save) or None
    config_dict["target_modules"] = sorted(config.target_modules)  # a set in memory; JSON wants a list
    with atomic_directory(out_dir) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config_dict, indent=2, default=str) + "\n")
    return Path(out_dir)


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Inject the adapter's LoRA layers into `model` and load its weights (any PEFT LoRA adapter directory); the
    weights of its `modules_to_save` (a reward model's head) load into the model's own modules, unwrapped."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise ZhllmError(f"{adapter_dir} is not a PEFT adapter directory ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    try:
        config = LoraConfig.from_pretrained(str(adapter_dir))
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise ZhllmError(f"{adapter_dir / ADAPTER_CONFIG}: not a LoRA config ({str(e).splitlines()[0]})") from None
    config.inference_mode = False
    heads = tuple(f"{name}." for name in config.modules_to_save or ())
    config.modules_to_save = None  # trained whole: plain weights of the model's own modules (below), not wrapped
    model = inject_lora(model, config)
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(adapter_dir / ADAPTER_WEIGHTS)).items()}
    head = {k: state.pop(k) for k in list(state) if k.startswith(heads)}
    if heads and not head:  # else a reward model's head would stay the new, random one
        raise ZhllmError(f"{adapter_dir}: adapter names modules_to_save {[h[:-1] for h in heads]} "
                         f"but holds no weights for them")
    if head:
        own = model.state_dict()
        unknown = sorted(k for k in head if k not in own or own[k].shape != head[k].shape)
        if unknown:
            raise ZhllmError(f"{adapter_dir}: adapter does not match the base model (module to save {unknown[0]})")
        model.load_state_dict(head, strict=False)
    result = set_peft_model_state_dict(model, state)
    expected = {k.removeprefix(PEFT_PREFIX) for k in adapter_state_dict(model)}
    missing = sorted(expected - set(state))
    if missing or getattr(result, "unexpected_keys", None):
        what = f"missing {missing[:2]}" if missing else f"unexpected {result.unexpected_keys[:2]}"
        raise ZhllmError(f"{adapter_dir}: adapter does not match the base model ({what})")
    return model


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base weight and put the plain module back: a normal model again. (peft nests
    one wrapper per targeted parameter of a module, e.g. MoE experts: all merge, the outermost is replaced.)"""
    layers = _lora_layers(model)
    for _, layer in layers:
        layer.merge(safe_merge=True)
    names = [name for name, _ in layers]
    for name, layer in layers:
        if not any(name.startswith(other + ".") for other in names):
            _replace_module(model, name, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


@contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Inside the block the LoRA model computes as its base model: the reference of DPO, GRPO and PPO without a
    second copy of the weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ZhllmError("an adapter reference needs a LoRA model (lora.enabled: true); use a frozen copy instead")
    # peft's enable_adapters toggles the adapters' requires_grad both ways; keep the run's flags throughout
    # (the forward skips a disabled adapter anyway): FSDP2 settles each group's gradient dtype at its first
    # forward from the parameters then trainable, and a first forward here would otherwise see none.
    grads = {p: p.requires_grad for p in model.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    for p, g in grads.items():
        p.requires_grad_(g)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, g in grads.items():
            p.requires_grad_(g)


def folded_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The plain model's state (its own parameter names) with each LoRA layer's active adapters added to its base
    weight, in fp32 then rounded once to the base's dtype; `model` is left as it is (`merge_adapter` rewrites it).
    None when the model has no LoRA layer, or one this cannot fold: not over a plain nn.Linear (a 4-bit base, MoE
    experts), DoRA, a LoRA bias, an adapter already merged, a weight tied to another, or sharded weights."""
    layers = _lora_layers(model)
    if not layers:
        return None
    from peft.tuners.lora import Linear as LoraLinear
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    folded = {}
    for name, layer in layers:
        base = layer.get_base_layer()
        if (type(layer) is not LoraLinear or type(base) is not nn.Linear or layer.merged
                or any(layer.use_dora.values()) or any(getattr(layer, "lora_bias", {}).values())
                or any(type(p.data) is not torch.Tensor for p in layer.parameters())
                or uses[id(base.weight)] > 1):  # a tied lm_head: folding would change the embeddings too
            return None
        weight = base.weight.detach()
        if not layer.disable_adapters:
            deltas = [layer.get_delta_weight(a).float() for a in layer.active_adapters if a in layer.lora_A]
            weight = (weight.float() + sum(deltas)).to(weight.dtype) if deltas else weight
        folded[f"{name}.weight"] = weight
    state = {}
    for key, value in model.state_dict().items():
        if ".lora_" not in key:
            key = key.replace(".base_layer.", ".")
            state[key] = folded.get(key, value)
    return state


def merge_lora(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Base checkpoint + adapter -> full HF-native checkpoint (with the tokenizer) in the base's dtype: a causal
    LM, or for a reward model's SEQ_CLS adapter a sequence-classification model with the adapter's head."""
    from ..model.io import TOKENIZER_FILES, load_model, read_state_dict, save_model
    from ..model.reward import default_pad_token_id, load_reward_model
    from ..outputs import check_output_dir
    from ..pointers import resolve_model_dir
    from ..tokenizer.load import load_tokenizer

    base_dir, adapter_dir = resolve_model_dir(base_dir), resolve_model_dir(adapter_dir)  # checkpoints/latest

    check_output_dir(out_dir, MERGE_COMMAND, inputs=[base_dir, adapter_dir], overwrite=overwrite)

    base_dtype = next(iter(read_state_dict(base_dir).values())).dtype
    # a reward model's adapter (zhllm rm with LoRA) merges onto the base's backbone with the head it carries
    reward = _task_type(adapter_dir) == "SEQ_CLS"
    load = load_reward_model if reward else load_model
    model = load(base_dir, dtype=torch.float32)  # merge in fp32, store in the base's dtype
    model = merge_adapter(load_adapter(model, adapter_dir))
    tokenizer = next((d for d in (Path(adapter_dir), Path(base_dir))
                      if any((d / f).is_file() for f in TOKENIZER_FILES)), None)
    if reward and model.config.pad_token_id is None:
        model.config.pad_token_id = default_pad_token_id(load_tokenizer(tokenizer) if tokenizer else None)
    return save_model(model, out_dir, tokenizer=tokenizer, dtype=base_dtype, command=MERGE_COMMAND)


def _task_type(adapter_dir: Path) -> str | None:
    """The adapter config's task_type; None where it cannot be read (load_adapter then says why)."""
    try:
        return json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("task_type")
    except (OSError, ValueError, AttributeError):
        return None


def enable_neftune(model: nn.Module, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """NEFTune: uniform noise of scale alpha/sqrt(seq_len*dim) on the input embeddings, in training mode only.

    Returns the hook handle; `.remove()` turns it off. The noise draws from torch's global RNG, which the
    trainer seeds, so runs stay reproducible.
    """
    if alpha <= 0:
        raise ZhllmError(f"neftune_alpha must be positive, got {alpha}")

    def add_noise(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        scale = alpha / math.sqrt(output.shape[-2] * output.shape[-1])
        return output + torch.empty_like(output).uniform_(-scale, scale)

    return model.model.embed_tokens.register_forward_hook(add_noise)


def freeze_params(model: nn.Module, embeddings: bool = False, first_layers: int = 0) -> int:
    """Stop training the token embeddings (and a tied lm_head with them) and/or the first N decoder layers.

    Returns how many parameters remain trainable.
    """
    layers = model.model.layers
    if not 0 <= first_layers <= len(layers):
        raise ZhllmError(f"freeze.first_layers must be between 0 and {len(layers)}, got {first_layers}")
    if embeddings:
        model.model.embed_tokens.weight.requires_grad_(False)
    for layer in list(layers)[:first_layers]:
        for p in layer.parameters():
            p.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
