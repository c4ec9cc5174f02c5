"""The pipeline's config: one YAML file with a section per stage, loaded and checked before any stage runs.

The pretrain, SFT, DPO and GRPO recipes inside it are typed by their stages' own config classes here too
(`typed_recipes`), so a typo in either fails when the file loads, naming the key, instead of after the four
stages before them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..config import checked, from_dict, load_config, merge

if TYPE_CHECKING:
    from ..train.config import RunConfig
    from ..train.dpo import DpoConfig
    from ..train.grpo import GrpoConfig
    from ..train.sft import SftConfig

BUILTIN_DEMO = "builtin:demo"


@dataclass
class CorpusSection:
    inputs: list[str] = field(default_factory=lambda: [BUILTIN_DEMO])  # files/dirs/globs, or builtin:demo
    field: Optional[str] = None
    task_docs: int = 3000          # built-in demo only: task documents added to the prose


@dataclass
class CleanSection:
    config: Optional[str] = None   # a clean recipe (configs/clean/*.yaml); default filters otherwise
    set: list[str] = field(default_factory=list)
    workers: int = checked(0, ge=0)  # 0 = all cores, as `zhllm data clean`


@dataclass
class TokenizerSection:
    path: Optional[str] = None     # use this tokenizer instead of training one
    vocab_size: int = 4096
    max_chars: int = 50_000_000
    backend: str = "bpe"
    # false: the vocabulary is learned from the cleaned text alone, not from the demo's generated task documents,
    # whose templates would otherwise take its merges and fuse each name into a different token per phrase
    task_docs: bool = False


@dataclass
class TokenizeSection:
    val_fraction: float = 0.02
    workers: int = checked(0, ge=0)  # 0 = all cores


@dataclass
class SftSection:
    enabled: bool = True
    inputs: list[str] = field(default_factory=lambda: [BUILTIN_DEMO])  # chat files, or builtin:demo tasks
    demo_conversations: int = 3000
    recipe: dict[str, Any] = field(default_factory=dict)  # an SFT recipe (configs/sft/*.yaml shape)


@dataclass
class DpoPipelineSection:
    enabled: bool = True           # runs after sft (skipped when sft is disabled)
    # builtin:demo = training tasks with the SFT model's wrong answers as rejected; files = records with a
    # prompt and a chosen answer (preference or SFT records)
    inputs: list[str] = field(default_factory=lambda: [BUILTIN_DEMO])
    make_rejected: bool = True     # files: rejected = the SFT model's own answers; false: the files' own pairs
    prompts: int = 300             # builtin:demo: training tasks asked
    samples: int = 2               # answers sampled per prompt
    temperature: float = 1.0
    max_new_tokens: int = 64
    recipe: dict[str, Any] = field(default_factory=dict)  # a DPO recipe (configs/dpo/*.yaml shape)


@dataclass
class GrpoPipelineSection:
    enabled: bool = True           # runs after dpo (after sft when dpo is off; skipped without sft)
    # builtin:demo = training tasks with their answers (the exact-answer reward); files = prompt records with
    # an `answer` where the recipe's rewards need one
    inputs: list[str] = field(default_factory=lambda: [BUILTIN_DEMO])
    prompts: int = 256             # builtin:demo: training tasks
    recipe: dict[str, Any] = field(default_factory=dict)  # a GRPO recipe (configs/grpo/*.yaml shape)


@dataclass
class PipelineEvalSection:
    tasks: int = 100               # held-out demo tasks answered greedily by each model
    max_new_tokens: int = 48       # the longest worked demo answer is 43 tokens
    val_batches: Optional[int] = None  # of pretraining's batch size; None: the windows of its periodic eval
    samples: int = 3               # sample chats shown in the report


@dataclass
class PipelineConfig:
    """The file as written: the recipes stay plain mappings so the stages' fingerprints hash what the user wrote."""
    name: str = "demo"
    out_dir: str = "runs/demo"
    seed: int = 0
    corpus: CorpusSection = field(default_factory=CorpusSection)
    clean: CleanSection = field(default_factory=CleanSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    tokenize: TokenizeSection = field(default_factory=TokenizeSection)
    pretrain: dict[str, Any] = field(default_factory=dict)  # a pretrain recipe (configs/pretrain/*.yaml shape)
    sft: SftSection = field(default_factory=SftSection)
    dpo: DpoPipelineSection = field(default_factory=DpoPipelineSection)
    grpo: GrpoPipelineSection = field(default_factory=GrpoPipelineSection)
    eval: PipelineEvalSection = field(default_factory=PipelineEvalSection)


@dataclass(frozen=True)
class StageRecipes:
    """The recipes as their stages read them; only the paths the pipeline fills in (`*_paths`) differ."""
    pretrain: RunConfig
    sft: SftConfig
    dpo: DpoConfig
    grpo: GrpoConfig


def pretrain_paths(shards: str, run_dir: str) -> dict:
    """What the pipeline writes into the pretrain recipe when the stage runs: its data and its run directory."""
    return {"data": {"path": [shards]}, "out_dir": run_dir}


def sft_paths(init_from: str, inputs: list[str], run_dir: str) -> dict:
    """What the pipeline writes into the SFT recipe: the pretrained checkpoint, the chat files, the run directory."""
    return {"model": {"init_from": init_from}, "data": {"path": inputs}, "out_dir": run_dir}


def dpo_paths(init_from: str, inputs: list[str], run_dir: str) -> dict:
    """What the pipeline writes into the DPO recipe: the SFT checkpoint, the preference pairs, the run directory."""
    return {"model": {"init_from": init_from}, "data": {"path": inputs}, "out_dir": run_dir}


def grpo_paths(init_from: str, inputs: list[str], run_dir: str) -> dict:
    """What the pipeline writes into the GRPO recipe: the model before it, the prompt files, the run directory."""
    return {"model": {"init_from": init_from}, "data": {"path": inputs}, "out_dir": run_dir}


def grpo_recipe(section: GrpoPipelineSection) -> dict:
    """The section's recipe, rewarded by the exact answer unless it names its own rewards: the demo's prompts
    carry the answers their judge reads."""
    return merge({"rewards": [{"type": "exact", "weight": 1.0}]}, section.recipe)


def typed_recipes(cfg: PipelineConfig, source: str) -> StageRecipes:
    """The training recipes built into their stages' config classes and validated as `zhllm pretrain` / `zhllm sft` do,
    with placeholders for the paths only a finished earlier stage knows.

    The one place that knows how a stage types its recipe: when train/ changes that, only this changes."""
    from ..train.config import RunConfig
    from ..train.dpo import DpoConfig
    from ..train.grpo import GrpoConfig
    from ..train.sft import SftConfig
    pretrain = merge(cfg.pretrain, pretrain_paths("<tokenize stage's shards>", "<pretrain stage's run>"))
    sft = merge(cfg.sft.recipe, sft_paths("<pretrain stage's checkpoint>", ["<sft inputs>"], "<sft stage's run>"))
    return StageRecipes(
        pretrain=from_dict(RunConfig, pretrain, source, "pretrain.").validate(f"{source}, pretrain"),
        sft=from_dict(SftConfig, sft, source, "sft.recipe.").validate(f"{source}, sft.recipe"),
        dpo=from_dict(DpoConfig, merge(cfg.dpo.recipe, dpo_paths("<sft stage's checkpoint>", ["<dpo pairs>"],
                                                                 "<dpo stage's run>")),
                      source, "dpo.recipe.").validate(f"{source}, dpo.recipe"),
        grpo=from_dict(GrpoConfig, merge(grpo_recipe(cfg.grpo), grpo_paths("<dpo or sft stage's checkpoint>",
                                                                     ["<grpo prompts>"], "<grpo stage's run>")),
                       source, "grpo.recipe.").validate(f"{source}, grpo.recipe"))


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None
                         ) -> tuple[PipelineConfig, StageRecipes]:
    """The config (a path, or a packaged name like `demo`) with its `--set` overrides, and its typed recipes."""
    from ..train.config import resolve_recipe
    path = resolve_recipe(path, ".")
    cfg = load_config(PipelineConfig, path, overrides)
    return cfg, typed_recipes(cfg, str(path) + (" (with --set overrides)" if overrides else ""))
