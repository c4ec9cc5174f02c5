"""`zhllm pipeline`: corpus -> clean -> tokenizer -> tokenize -> pretrain -> sft -> eval -> report, from one config.

config.py reads the config and types its recipes; runner.py caches and resumes stages; stages.py holds the
stages in order and `run_pipeline`, which walks them; report.py writes the run's report.md.
"""
from .config import load_pipeline_config
from .stages import STAGE_ORDER, run_pipeline

__all__ = ["STAGE_ORDER", "load_pipeline_config", "run_pipeline"]
