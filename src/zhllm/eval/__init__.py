"""Evaluation, in one place: loss.py (validation loss / perplexity / bits per byte, shared by the training loop,
the pipeline and `zhllm eval`), tasks.py (the Task shape and how tasks run through the inference engine), and one
module per task family (demo_tasks.py: the built-in demo tasks and the pipeline's eval stage)."""
