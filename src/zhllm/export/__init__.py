"""Exports of a checkpoint into other runtimes' formats: `gguf` (llama.cpp, Ollama, LM Studio) with its
tokenizer part in `gguf_vocab`. Each reads an HF-native checkpoint directory and writes one file atomically.

Kept free of imports so the CLI can offer the choices below without loading torch."""

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # storage of a GGUF file's weight matrices
