"""Evaluation, in one place: loss.py (validation loss / perplexity / bits per byte, shared by the training loop,
the pipeline and `zhllm eval`), tasks.py (the Task shape and how tasks run through the inference engine), and one
module per task family (demo_tasks.py: the built-in demo tasks and the pipeline's eval stage; bpb.py: bits per
byte on any corpus; mc.py: CMMLU/C-Eval multiple choice; gen.py: generation tasks from JSONL). compare.py runs
`zhllm eval` over several models and writes the side-by-side table."""
