"""Speed of `zhllm eval` against the standard tools, on the same model, items and machine.

- mc: items/s on the shared CMMLU sample (first --items of cmmlu_test.jsonl, zero-shot, letter scoring) for
  zhllm's `evaluate_mc` against lm-evaluation-harness's hf backend (HFLM) running a task YAML with the very
  same prompt and choices; both accuracies are printed, and they must agree.
- bpb: scored tokens/s of zhllm's `bits_per_byte` against a plain transformers loop (AutoModelForCausalLM,
  the same windows right-padded in batches of the same token budget, log_softmax over the logits, gather).

The model is the 26m preset with random weights (speed does not depend on what the weights say) and the
shared MiniMind tokenizer (6400 tokens, the preset's vocabulary), in float32 on the CPU. Loading is not timed.

    python benchmarks/bench_eval.py [--items 200] [--docs 40] [--chars 1500]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def build_model(out: Path) -> Path:
    from zhllm.model.config import model_config_from
    from zhllm.model.io import new_model, save_model
    from zhllm.tokenizer.load import load_tokenizer
    tok_dir = SHARED / "tokenizers" / "minimind"
    cfg = model_config_from("26m", {"vocab_size": max(6400, len(load_tokenizer(tok_dir)))})
    return save_model(new_model(cfg, seed=0), out / "m26", tokenizer=tok_dir)


def bench_mc_zhllm(model_dir: Path, items_file: Path, batch: int) -> tuple[float, float]:
    from zhllm.eval.mc import evaluate_mc, read_items
    from zhllm.infer.engine import Engine
    engine = Engine.load(model_dir, device="cpu", dtype="float32")
    items = read_items([items_file])
    t = time.perf_counter()
    res = evaluate_mc(engine, items, batch_size=batch)
    return len(items) / (time.perf_counter() - t), res.overall.correct / res.overall.total


def bench_mc_lm_eval(model_dir: Path, items_file: Path, work: Path, batch: int) -> tuple[float, float]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from zhllm.eval.mc import HEADER
    n = sum(1 for _ in items_file.open(encoding="utf-8"))
    # zhllm's prompt: the subject header, then the question block; the letter follows without a delimiter
    header = HEADER.replace("\n", "\\n").replace("{subject}", "{{subject.replace('_', ' ')}}")
    (work / "tasks").mkdir(exist_ok=True)
    (work / "tasks" / "cmmlu_sample.yaml").write_text(f"""task: cmmlu_sample
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items_file}
test_split: test
output_type: multiple_choice
doc_to_text: "{header}题目：{{{{question}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\n答案："
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer)}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
""", encoding="utf-8")
    lm = HFLM(pretrained=str(model_dir), dtype="float32", batch_size=batch, device="cpu")
    manager = TaskManager(include_path=str(work / "tasks"))
    t = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=["cmmlu_sample"], task_manager=manager)
    return n / (time.perf_counter() - t), out["results"]["cmmlu_sample"]["acc,none"]


def bench_bpb_zhllm(model_dir: Path, texts: list[str]) -> tuple[float, float]:
    from zhllm.eval.bpb import bits_per_byte
    from zhllm.infer.engine import Engine
    engine = Engine.load(model_dir, device="cpu", dtype="float32")
    t = time.perf_counter()
    res = bits_per_byte(engine, texts)
    return res.tokens / (time.perf_counter() - t), res.bits_per_byte


def bench_bpb_transformers(model_dir: Path, texts: list[str], batch_tokens: int = 8192) -> tuple[float, float]:
    """The same windows as zhllm (context 1024, stride 512), scored by a transformers forward loop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from zhllm.eval.bpb import document_windows, start_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    context = model.config.max_position_embeddings - 1
    t = time.perf_counter()
    windows = []
    for d, text in enumerate(texts):
        ids = [start_token(tok)] + tok(text, add_special_tokens=False)["input_ids"]  # BOS, else EOS
        windows += list(document_windows(d, ids, context, context // 2))
    windows.sort(key=lambda w: len(w.tokens))
    nll, scored, i = 0.0, 0, 0
    with torch.inference_mode():
        while i < len(windows):
            j = i + 1
            while j < len(windows) and (j - i + 1) * len(windows[j].tokens) <= batch_tokens:
                j += 1
            batch = windows[i:j]
            width = max(len(w.tokens) for w in batch) - 1
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for r, w in enumerate(batch):
                ids[r, :len(w.tokens) - 1] = torch.tensor(w.tokens[:-1])
                mask[r, :len(w.tokens) - 1] = 1
            logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            for r, w in enumerate(batch):
                n = len(w.tokens) - 1
                targets = torch.tensor(w.tokens[1:])[n - w.scored:]
                nll -= float(logp[r, n - w.scored:n].gather(1, targets[:, None]).sum())
                scored += w.scored
            i = j
    nbytes = sum(len(x.encode("utf-8")) for x in texts)
    return scored / (time.perf_counter() - t), nll / math.log(2) / nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--docs", type=int, default=40)
    ap.add_argument("--chars", type=int, default=1500, help="characters per document")
    ap.add_argument("--batch", type=int, default=16, help="rows per forward for both tools")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from zhllm.corpus.readers import iter_texts
    from zhllm.eval.bpb import limited_texts
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(work / "hf_cache")
        model_dir = build_model(work)
        items_file = work / "cmmlu_sample.jsonl"
        with open(SHARED / "eval" / "cmmlu_test.jsonl", encoding="utf-8") as src:
            items_file.write_text("".join(line for _, line in zip(range(args.items), src)), encoding="utf-8")
        texts = list(limited_texts(iter_texts([SHARED / "pretrain" / "web_wiki_news_zh.jsonl"]), args.docs,
                                   args.chars))
        z_mc, z_acc = bench_mc_zhllm(model_dir, items_file, args.batch)
        l_mc, l_acc = bench_mc_lm_eval(model_dir, items_file, work, args.batch)
        z_bpb, z_bits = bench_bpb_zhllm(model_dir, texts)
        t_bpb, t_bits = bench_bpb_transformers(model_dir, texts)
    rows = [("mc items/s (CMMLU, 0-shot)", z_mc, l_mc, "lm_eval hf", f"acc {z_acc:.3f} vs {l_acc:.3f}"),
            ("bpb tokens/s", z_bpb, t_bpb, "transformers loop", f"bpb {z_bits:.4f} vs {t_bits:.4f}")]
    print(f"26m preset (random init), float32, CPU threads {torch.get_num_threads()}; {args.items} CMMLU items, "
          f"{len(texts)} documents of <= {args.chars} characters")
    print("| measure | zhllm | reference | ratio | reference tool | check |")
    print("|---|---:|---:|---:|---|---|")
    for name, ours, ref, tool, check in rows:
        print(f"| {name} | {ours:.1f} | {ref:.1f} | {ours / ref:.2f}x | {tool} | {check} |")
    print(json.dumps({"mc": [z_mc, l_mc], "bpb": [z_bpb, t_bpb]}))


if __name__ == "__main__":
    main()
