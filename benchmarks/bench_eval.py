"""Speed of `zhllm eval` against the standard tools, on the same model, items and machine.

- mc: items/s on the shared CMMLU sample (first --items of cmmlu_test.jsonl, letter scoring; 0-shot and
  5-shot with the examples from cmmlu_dev.jsonl, as `zhllm eval --shots 5 --dev` builds them) for zhllm's
  `evaluate_mc` against lm-evaluation-harness's hf backend (HFLM) running a task YAML over the very same
  prompts (zhllm's rendered prompt text is the YAML's `doc_to_text` field) and choices; both accuracies are
  printed, and they must agree.
- bpb: scored tokens/s of zhllm's `bits_per_byte` against a plain transformers loop (AutoModelForCausalLM,
  the same windows right-padded in batches of the same token budget, log_softmax over the logits, gather).

The model is the 26m preset with random weights (speed does not depend on what the weights say) and the
shared MiniMind tokenizer (6400 tokens, the preset's vocabulary), in float32 on the CPU. Loading is not timed.

    python benchmarks/bench_eval.py [--items 200] [--shots 0 5] [--docs 40] [--chars 1500]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

from bench_support import SHARED

import torch



def build_model(out: Path) -> Path:
    from zhllm.model.config import model_config_from
    from zhllm.model.io import new_model, save_model
    from zhllm.tokenizer.load import load_tokenizer
    tok_dir = SHARED / "tokenizers" / "minimind"
    cfg = model_config_from("26m", {"vocab_size": max(6400, len(load_tokenizer(tok_dir)))})
    return save_model(new_model(cfg, seed=0), out / "m26", tokenizer=tok_dir)


def bench_mc_zhllm(model_dir: Path, items_file: Path, dev_file: Path, shots: int,
                   batch: int) -> tuple[float, float]:
    from zhllm.eval.mc import evaluate_mc, read_items
    from zhllm.infer.engine import Engine
    engine = Engine.load(model_dir, device="cpu", dtype="float32")
    items, dev = read_items([items_file]), read_items([dev_file])
    t = time.perf_counter()
    res = evaluate_mc(engine, items, dev=dev, shots=shots, batch_size=batch)
    elapsed = time.perf_counter() - t
    assert res.skipped_too_long == 0, "an item's prompt lost examples to the context: lm_eval's would differ"
    return len(items) / elapsed, res.overall.correct / res.overall.total


def rendered_items(items_file: Path, dev_file: Path, shots: int, out: Path) -> Path:
    """The items as JSONL with zhllm's full prompt text (subject line, k examples, question) and the answer's
    index, so lm_eval scores exactly the prompts zhllm does."""
    from zhllm.eval.mc import build_prompt, dev_shots, read_items
    examples = dev_shots(read_items([dev_file]), shots)
    with out.open("w", encoding="utf-8") as f:
        for it in read_items([items_file]):
            prompt = build_prompt(it, examples.get(it.subject, []), chat=False)
            f.write(json.dumps({"prompt": prompt, "label": "ABCD".index(it.answer)}, ensure_ascii=False) + "\n")
    return out


def bench_mc_lm_eval(model_dir: Path, items_file: Path, dev_file: Path, shots: int, work: Path,
                     batch: int) -> tuple[float, float]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    data = rendered_items(items_file, dev_file, shots, work / f"cmmlu_{shots}shot.jsonl")
    n = sum(1 for _ in data.open(encoding="utf-8"))
    task = f"cmmlu_sample_{shots}shot"
    (work / "tasks").mkdir(exist_ok=True)
    # doc_to_text names a field, which lm_eval passes through verbatim; the letter follows without a delimiter
    (work / "tasks" / f"{task}.yaml").write_text(f"""task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
""", encoding="utf-8")
    lm = HFLM(pretrained=str(model_dir), dtype="float32", batch_size=batch, device="cpu")
    manager = TaskManager(include_path=str(work / "tasks"))
    t = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager)
    return n / (time.perf_counter() - t), out["results"][task]["acc,none"]


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
    ap.add_argument("--shots", type=int, nargs="+", default=[0, 5],
                    help="examples per prompt from the dev file; one mc row per value")
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
        dev_file = SHARED / "eval" / "cmmlu_dev.jsonl"
        rows, mc = [], {}
        for shots in args.shots:
            z_mc, z_acc = bench_mc_zhllm(model_dir, items_file, dev_file, shots, args.batch)
            l_mc, l_acc = bench_mc_lm_eval(model_dir, items_file, dev_file, shots, work, args.batch)
            rows.append((f"mc items/s (CMMLU, {shots}-shot)", z_mc, l_mc, "lm_eval hf",
                         f"acc {z_acc:.3f} vs {l_acc:.3f}"))
            mc[f"{shots}-shot"] = [z_mc, l_mc]
        z_bpb, z_bits = bench_bpb_zhllm(model_dir, texts)
        t_bpb, t_bits = bench_bpb_transformers(model_dir, texts)
    rows.append(("bpb tokens/s", z_bpb, t_bpb, "transformers loop", f"bpb {z_bits:.4f} vs {t_bits:.4f}"))
    print(f"26m preset (random init), float32, CPU threads {torch.get_num_threads()}; {args.items} CMMLU items, "
          f"{len(texts)} documents of <= {args.chars} characters")
    print("| measure | zhllm | reference | ratio | reference tool | check |")
    print("|---|---:|---:|---:|---|---|")
    for name, ours, ref, tool, check in rows:
        print(f"| {name} | {ours:.1f} | {ref:.1f} | {ours / ref:.2f}x | {tool} | {check} |")
    print(json.dumps({"mc": mc, "bpb": [z_bpb, t_bpb]}))


if __name__ == "__main__":
    main()
