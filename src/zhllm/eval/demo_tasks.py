"""The pipeline's eval stage: val loss / bits per byte per model, and exact-match accuracy of greedy answers
on held-out demo tasks (the pretrained model is asked in its documents' "问：…\\n答：" form, the SFT model in
chat form, so each is asked the way it was trained)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..fsutil import atomic_write_text


@torch.no_grad()
def val_loss(model, shards_dir: str, seq_len: int, batches: int, batch_size: int = 4) -> dict:
    """Mean next-token loss over the first windows of the val split (train split if there is none)."""
    from ..data.shards import PackedTokenDataset
    from ..errors import ZhllmError
    try:
        data = PackedTokenDataset([shards_dir], seq_len, split="val", shuffle=False)
    except ZhllmError:
        data = PackedTokenDataset([shards_dir], seq_len, split="train", shuffle=False)
    n = max(1, min(batches, len(data) // batch_size))
    total, count = 0.0, 0
    for i in range(n):
        batch = data.batch(i * batch_size, batch_size)
        logits = model(batch[:, :-1]).float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
        count += batch[:, 1:].numel()
    loss = total / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_bpb": loss / math.log(2) / data.bytes_per_token}


def answer_tasks(model, tokenizer, tasks, chat: bool, max_new_tokens: int, batch_size: int = 16) -> list[dict]:
    """Greedy answers, decoded in batches; the pretrained model stops where its documents start a new item."""
    from ..demo import is_correct
    from ..demo.tasks import pretrain_prompt
    from ..infer.generate import generate_batch
    prompts = [[{"role": "user", "content": t.question}] if chat else pretrain_prompt(t) for t in tasks]
    outputs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        outputs += generate_batch(model, tokenizer, prompts[i:i + batch_size], max_new_tokens=max_new_tokens,
                                  temperature=0.0, stop_strings=() if chat else ("\n\n", "问："))
    return [{"question": t.question, "answer": t.answer, "output": out, "correct": bool(is_correct(t, out))}
            for t, out in zip(tasks, outputs)]


def evaluate_pipeline_models(models: dict[str, str], shards_dir: str, out_dir: Path, cfg, seq_len: int,
                             seed: int, log=print) -> dict:
    from ..demo import eval_tasks
    from ..model.io import load_model
    from ..tokenizer.load import load_tokenizer
    tasks = eval_tasks(cfg.tasks, seed)
    table = {}
    for stage, path in models.items():
        model, tok = load_model(path), load_tokenizer(path)
        metrics = val_loss(model, shards_dir, seq_len, cfg.val_batches)
        rows = answer_tasks(model, tok, tasks, chat=stage != "pretrain", max_new_tokens=cfg.max_new_tokens)
        metrics["task_accuracy"] = sum(r["correct"] for r in rows) / max(len(rows), 1)
        metrics["tasks"] = len(rows)
        atomic_write_text(out_dir / f"answers_{stage}.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        log(f"[eval] {stage}: val_loss {metrics['val_loss']:.4f}  bpb {metrics['val_bpb']:.4f}  "
            f"task accuracy {metrics['task_accuracy']:.1%} ({len(rows)} held-out tasks)")
        table[stage] = {**metrics, "checkpoint": path}
    atomic_write_text(out_dir / "eval.json", json.dumps(table, indent=2, ensure_ascii=False))
    return table
