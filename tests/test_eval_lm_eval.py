"""zhllm's `mc` accuracy agrees with lm-evaluation-harness's `acc` on the same items, prompts and scoring,
with the zhllm checkpoint loaded unchanged by `lm_eval --model hf`. Local task YAML, generated data, offline."""
import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from zhllm.eval.mc import HEADER, evaluate_mc, read_items  # noqa: E402
from zhllm.infer.engine import Engine  # noqa: E402

SUBJECT = "历史"
QUESTIONS = ["今天天气很好吗？", "中国的首都是哪里？", "长江有多长？", "一共有几个苹果？", "春眠不觉晓的下一句是？",
             "机器学习属于什么？", "北京是什么？", "小明买了几个苹果？", "世界你好是什么意思？", "花落知多少出自哪里？"]
OPTIONS = [("是", "否", "中国", "苹果"), ("北京", "长江", "公园", "世界"), ("6300公里", "3个", "8个", "1949年"),
           ("3", "5", "8", "9")]


def test_zhllm_mc_agrees_with_lm_eval_acc(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    rows = [{"subject": SUBJECT, "question": q, **dict(zip("ABCD", OPTIONS[i % 4])), "answer": "ABCD"[(i * 3) % 4]}
            for i, q in enumerate(QUESTIONS)]
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    # the prompt zhllm builds (mc.build_prompt), as an lm_eval template; the letter follows with no delimiter
    header = HEADER.format(subject=SUBJECT).replace("\n", "\\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "zh_mc.yaml").write_text(f"""task: zhllm_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{header}题目：{{{{question}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\n答案："
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer)}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
""", encoding="utf-8")
    from lm_eval.tasks import TaskManager
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny_model_dir},dtype=float32",
                                  tasks=["zhllm_tiny_mc"],
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                  log_samples=True, batch_size=4, device="cpu")
    samples = sorted(out["samples"]["zhllm_tiny_mc"], key=lambda s: s["doc_id"])
    theirs = [[r[0][0] for r in s["resps"]] for s in samples]

    ours = evaluate_mc(Engine.load(tiny_model_dir, device="cpu", dtype="float32"), read_items([data]))
    assert [r["scores"] for r in ours.rows] == [pytest.approx(t, abs=1e-4) for t in theirs]
    assert [r["correct"] for r in ours.rows] == [bool(s["acc"]) for s in samples]
    assert ours.to_dict()["acc"] == pytest.approx(out["results"]["zhllm_tiny_mc"]["acc,none"])
