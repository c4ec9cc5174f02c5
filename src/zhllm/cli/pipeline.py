"""`zhllm pipeline`: parsing only; the stage graph lives in zhllm.pipeline."""
from ..pipeline import STAGE_ORDER
from . import add_overwrite_flag


def register(root, groups) -> None:
    p = root.add_parser(
        "pipeline", help="run every stage (corpus to chat model) from one config, cached and resumable",
        description=f"Run {' -> '.join(STAGE_ORDER)}. A finished "
                    "stage is skipped; a changed config or input re-runs it and the stages after it; an interrupted "
                    "run resumes where it stopped. Try: zhllm pipeline configs/demo.yaml")
    p.add_argument("config", help="pipeline YAML, e.g. configs/demo.yaml (or a packaged name: demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set pretrain.train.max_steps=50 (repeatable)")
    p.add_argument("--force", action="store_true", help="re-run every stage even if cached")
    p.add_argument("--until", choices=STAGE_ORDER, help="stop after this stage")
    add_overwrite_flag(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ..pipeline import run_pipeline
    run_pipeline(args.config, args.overrides, force=args.force, until=args.until, overwrite=args.overwrite)
    return 0
