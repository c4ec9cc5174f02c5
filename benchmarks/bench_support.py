"""What several benchmarks share: where the sample data lives, and a random-weight model at a preset with the
MiniMind tokenizer (speed does not depend on the weights)."""
from __future__ import annotations

from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def random_model_dir(preset: str, tmp: Path) -> Path:
    """tmp/model-PRESET: written once, reused by later runs and by each variant's process."""
    from zhllm.model.config import model_config_from
    from zhllm.model.io import new_model, save_model
    from zhllm.tokenizer.load import load_tokenizer
    out = tmp / f"model-{preset}"
    if not (out / "model.safetensors").is_file():
        tok_dir = SHARED / "tokenizers" / "minimind"
        save_model(new_model(model_config_from(preset, {"vocab_size": len(load_tokenizer(tok_dir))}), seed=0), out,
                   tokenizer=tok_dir)
    return out
