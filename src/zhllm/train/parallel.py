"""Distributed setup and everything applied to the model from the outside (rule 1).

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single process. gloo on CPU, nccl on CUDA.
`parallelize` is the one place a model is prepared for training, in this order (torchtitan's):
1. activation checkpointing: each decoder layer's forward recomputes its activations in the backward;
2. torch.compile per decoder layer: it then compiles the checkpointed forward, recomputation included;
3. DDP (optionally with the PowerSGD comm hook; ZeRO-1 is the optimizer's part) or FSDP2 (`fully_shard` per
   decoder layer, then the root, with a MixedPrecisionPolicy): last, because it wraps (DDP) or shards (FSDP)
   the modules as they will run, checkpointed and compiled.
Steps 1 and 2 replace each layer's forward in place, so parameter names (and so checkpoints) are unchanged.
"""
from __future__ import annotations

import copy
import functools
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..device import pick_device
from ..errors import ZhllmError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(requested_device: str = "auto") -> Dist:
    """Join the torchrun process group if launched by torchrun, else a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return Dist(rank, world, local_rank, device)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        if dist.get_backend() == "gloo":
            # A gloo worker thread frees a finished collective's tensors under the GIL, and the process group's
            # destructor (run later with the GIL held, when the DDP reducer is freed) joins those threads: an
            # exit right after a collective could deadlock (seen on an error exit; pytorch issue 56297).
            # Sleeping releases the GIL so the workers finish first.
            time.sleep(0.1)
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_reduce_sum(d: Dist, values: list[float]) -> list[float]:
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(d: Dist, obj) -> list:
    """Every rank's `obj` (picklable; tensors on the CPU), in rank order, on every rank."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_flag(d: Dist, flag: bool) -> bool:
    """True on every rank if any rank raised the flag (e.g. received SIGTERM)."""
    return bool(all_reduce_sum(d, [float(flag)])[0]) if d.enabled else flag


def decoder_stacks(model: nn.Module) -> list[nn.Module]:
    """Every decoder (embeddings, `layers`, final `norm`) in the trained module: one for a causal LM or reward
    model, two for PPO's policy-and-value module."""
    return [m for m in model.modules() if isinstance(getattr(m, "layers", None), nn.ModuleList) and hasattr(m, "norm")]


def apply_activation_checkpointing(model: nn.Module) -> None:
    from torch.utils.checkpoint import checkpoint
    for stack in decoder_stacks(model):
        for layer in stack.layers:
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each decoder layer and the final norm in place (parameter names unchanged, so checkpoints
    stay HF-native).

    Per layer, as torchtitan does: identical layers share one compiled graph, so compiling takes seconds, and
    on a CPU the fused elementwise kernels (norms, RoPE, SwiGLU) make a 26m step 1.15-1.3x faster. If the
    compiler cannot run (e.g. no C++ compiler for inductor on a CPU), dynamo warns and the layers run eagerly.
    """
    import torch._dynamo
    torch._dynamo.config.suppress_errors = True
    for stack in decoder_stacks(model):
        for layer in stack.layers:
            layer.compile()
        stack.norm.compile()  # eagerly its fp32 upcast, square, mean and scale are ~1% of a 26m CPU step


def wrap_model(model: nn.Module, d: Dist, parallel: str, precision: str, powersgd: bool = False) -> nn.Module:
    """The module to call in the training step (DDP/FSDP wrapped, or the model itself)."""
    if parallel == "none":
        if d.enabled:
            raise ZhllmError(f"launched with {d.world} processes but train.parallel is none; set ddp or fsdp")
        return model
    if not d.enabled:
        return model  # ddp/fsdp recipes also run as a single process
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        if powersgd:
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
            state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=10)
            ddp.register_comm_hook(state, psgd.powerSGD_hook)
        return ddp
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    mp = MixedPrecisionPolicy(param_dtype=dtypes[precision], reduce_dtype=torch.float32)
    for layer in (layer for stack in decoder_stacks(model) for layer in stack.layers):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def parallelize(model: nn.Module, train, d: Dist) -> nn.Module:
    """Apply `train` (the TrainSection)'s activation checkpointing, compile and DDP/FSDP to `model`, in the
    order of the module docstring; returns the module the training step calls."""
    if train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if train.compile:
        apply_compile(model)
    return wrap_model(model, d, train.parallel, train.precision, train.ddp_powersgd)


def no_sync(wrapped: nn.Module, last_micro_step: bool):
    """DDP: skip the gradient all-reduce on non-final accumulation micro-steps."""
    if not last_micro_step and hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2's equivalent
        wrapped.set_requires_gradient_sync(last_micro_step)
    return nullcontext()


def reshard(model: nn.Module) -> None:
    """After no-grad forwards (eval, samples) FSDP2's root keeps its unsharded parameters registered
    (nothing runs a backward to reshard them); optimizer and checkpoint code expect the sharded ones."""
    for m in model.modules():
        if hasattr(m, "reshard") and hasattr(m, "set_requires_gradient_sync"):
            m.reshard()


def is_fsdp(model: nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")


def full_model_state(model: nn.Module, every_rank: bool = False) -> dict:
    """Unsharded model weights (collective under FSDP: every rank must call it): on CPU on rank 0 (others get
    none), or with `every_rank` on every rank, on the model's device."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=not every_rank)
    return get_model_state_dict(model, options=options)


def empty_like(model: nn.Module) -> nn.Module:
    """A weightless (meta) module of `model`'s own class, unsharded, with its LoRA layers when it has them: what
    a full state dict (gathered FSDP shards, fp32 masters) loads into, so a checkpoint of a reward model or a LoRA
    policy is saved as one and not as a plain causal LM missing weights. A module made of several models (PPO's
    policy and value) builds its own from its parts' (its `empty_like` method)."""
    if hasattr(model, "empty_like"):
        return model.empty_like()
    from torch.distributed.fsdp import FSDPModule
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # fully_shard subclasses it
    with torch.device("meta"):
        empty = cls(model.config)
    lora = getattr(model, "peft_config", {}).get("default")
    if lora is not None:
        from .lora import inject_lora
        empty = inject_lora(empty, copy.deepcopy(lora))
    return empty


def module_from_state(model: nn.Module, state: dict) -> nn.Module:
    """An unsharded module like `model` (its class, its LoRA layers) holding `state`, a full state dict."""
    from ..model.io import model_from_state_dict
    return model_from_state_dict(model.config, state, empty_like(model))


def unsharded_copy(model: nn.Module) -> nn.Module:
    """The whole of an FSDP-sharded model (or of one model inside it: PPO's policy) as a plain module on every
    rank, on its device, sharing nothing with it (collective: every rank must call it). What a rank decodes from:
    through the shards every token would gather every layer, and ranks whose rows stop at different lengths would
    wait for each other for ever."""
    return module_from_state(model, full_model_state(model, every_rank=True))


def full_optimizer_state(model: nn.Module, optimizer, d: Dist, positional: list[str] | None = None) -> dict:
    """Unsharded optimizer state keyed by parameter name, so a checkpoint resumes on any number of
    processes. Collective under DDP+ZeRO and FSDP: every rank must call it. `positional`: the names of the
    optimizer's parameters in its group order, where it must be keyed by position (ZeRO, or an optimizer holding
    copies of the model's parameters: bf16 master weights)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.optim import ZeroRedundancyOptimizer
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)
        return _indices_to_names(positional, optimizer.state_dict()) if d.is_main else {}
    if positional is not None:
        return _indices_to_names(positional, optimizer.state_dict())
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_full(model: nn.Module, optimizer, optim_sd: dict, positional: list[str] | None = None) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    if positional is not None:
        optimizer.load_state_dict(_names_to_indices(positional, optim_sd))
        return
    set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))


def _indices_to_names(order: list[str], sd: dict) -> dict:
    """A position-keyed state in the name-keyed layout of get_optimizer_state_dict, so ZeRO and bf16-master
    checkpoints resume without them, on any number of processes, and the other way round."""
    return {"state": {order[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]]}


def _names_to_indices(order: list[str], sd: dict) -> dict:
    index = {n: i for i, n in enumerate(order)}
    return {"state": {index[n]: v for n, v in sd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]}
