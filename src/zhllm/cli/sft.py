"""Parsers for `zhllm sft`, SFT data preview and LoRA adapters; see cli/__init__.py."""
from __future__ import annotations

from ..data.chat import FORMATS
from . import add_overwrite_flag, add_progress_flag, add_recipe_options


def _preview(args) -> None:
    from ..data.sft_preview import preview_sft

    color = None if args.color == "auto" else args.color == "always"
    print(preview_sft(args.tokenizer, args.input, n=args.n, fmt=args.format, max_len=args.max_len,
                      overflow=args.overflow, strict=args.strict, color=color, progress=not args.no_progress))


def _merge(args) -> None:
    from ..train.lora import merge_lora

    print(merge_lora(args.base, args.adapter, args.out, overwrite=args.overwrite))


def _sft(args) -> None:
    from ..train.sft import run_sft

    summary = run_sft(args.config, args.set, resume=args.resume)
    print(f"sft finished at step {summary['step']}/{summary['max_steps']}; val loss {summary.get('val_loss')}")


def register(root, groups) -> None:
    p = root.add_parser(
        "sft", help="supervised fine-tuning on chat data (full or LoRA)",
        description="Fine-tune a checkpoint on alpaca / ShareGPT / messages / prompt-response records (detected per "
                    "record), rendered with the tokenizer's chat template; only assistant replies carry loss. Same "
                    "loop, checkpoints, resume and torchrun support as `zhllm pretrain`.")
    add_recipe_options(p, "SFT", example="model.init_from=DIR")
    p.set_defaults(func=_sft)

    p = groups["data"].add_parser(
        "preview-sft", help="render SFT samples with the trained (loss) spans highlighted",
        description="Render the first N conversations of SFT files exactly as training sees them (the tokenizer's "
                    "chat template), with the tokens that carry loss highlighted, then count formats, skipped "
                    "records (with file:line) and truncations over the whole input.")
    p.add_argument("--tokenizer", required=True, help="tokenizer (or checkpoint) directory with a chat_template")
    p.add_argument("--input", required=True, nargs="+", help="SFT files (json, jsonl, parquet)")
    p.add_argument("--n", type=int, default=2, help="samples to show (default 2)")
    p.add_argument("--format", default="auto", choices=FORMATS, help="record format (default: detect per record)")
    p.add_argument("--max-len", type=int, default=None, help="token limit; longer conversations lose earlier turns")
    p.add_argument("--overflow", default="truncate", choices=("truncate", "skip"),
                   help="too long: drop whole earlier turns (default) or skip the conversation")
    p.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping it")
    p.add_argument("--color", default="auto", choices=("auto", "always", "never"),
                   help="ANSI colour for trained spans (auto: on a terminal; otherwise [[...]] brackets)")
    add_progress_flag(p)
    p.set_defaults(func=_preview)

    lora = root.add_parser("lora", help="LoRA adapters: merge into a full checkpoint",
                           description="Work with LoRA adapters saved in PEFT format.")
    sub = lora.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    m = sub.add_parser("merge", help="fold a LoRA adapter into its base model",
                       description="Write base + adapter as one HF-native checkpoint (config.json, model.safetensors, "
                                   "tokenizer) that loads with AutoModelForCausalLM and zhllm alike; a reward model's "
                                   "adapter (zhllm rm with LoRA, its head inside) gives a sequence-classification "
                                   "model that loads with AutoModelForSequenceClassification.")
    m.add_argument("--base", required=True, help="base model directory (zhllm or HF Llama/Qwen2)")
    m.add_argument("--adapter", required=True,
                   help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    m.add_argument("--out", required=True, help="output checkpoint directory")
    add_overwrite_flag(m)
    m.set_defaults(func=_merge)
