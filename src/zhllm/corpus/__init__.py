"""Reading corpora: input expansion, per-format record readers and bad-record accounting.

Sits below both data/ and tokenizer/ (both read corpora through it); imports nothing from zhllm but errors.
"""
