"""Preference pairs for the demo pipeline's dpo stage: training tasks (never the held-out eval tasks), chosen =
the correct worked answer, rejected = the SFT model's own sampled answers (make_rejected), its wrong ones
preferred: a sampled answer that is right but worded differently is dropped, unless the model got every
task right, when those are all there is to learn from."""
from __future__ import annotations

import json
from pathlib import Path

from ..fsutil import atomic_write_text


def write_demo_preferences(model_dir: str | Path, out_dir: str | Path, prompts: int, samples: int = 2,
                           temperature: float = 1.0, max_new_tokens: int = 64, seed: int = 0,
                           batch_size: int = 16) -> dict:
    """Write out_dir/pairs.jsonl; returns its path and counts. Resumable: make_rejected continues a killed run,
    and a finished pairs file is reused."""
    from ..demo import answer_text, is_correct, sample_tasks
    from .make_rejected import make_rejected

    out_dir = Path(out_dir)
    pairs_path, counts_path = out_dir / "pairs.jsonl", out_dir / "pairs.json"
    if pairs_path.is_file() and counts_path.is_file():
        return json.loads(counts_path.read_text(encoding="utf-8"))
    tasks = sample_tasks(prompts, seed + 2_000_003)  # a stream other than the SFT conversations' and documents'
    source = out_dir / "prompts.jsonl"
    if not source.is_file():
        atomic_write_text(source, "".join(json.dumps({"messages": [
            {"role": "user", "content": t.question}, {"role": "assistant", "content": answer_text(t)}]},
            ensure_ascii=False) + "\n" for t in tasks))
    sampled = out_dir / "sampled.jsonl"
    if not sampled.is_file():
        make_rejected(model_dir, [source], sampled, num=samples, temperature=temperature,
                      max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, progress=False)
    by_question = {t.question: t for t in tasks}
    wrong, right = [], []
    for line in sampled.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        (right if is_correct(by_question[rec["prompt"]], rec["rejected"]) else wrong).append(line + "\n")
    kept = wrong or right
    atomic_write_text(pairs_path, "".join(kept))
    counts = {"path": str(pairs_path), "prompts": len(tasks), "sampled": len(wrong) + len(right),
              "wrong": len(wrong), "right": len(right), "pairs": len(kept)}
    atomic_write_text(counts_path, json.dumps(counts))
    return counts
