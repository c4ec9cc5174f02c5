"""zhllm eval --task mc: items in CMMLU/C-Eval layouts, k-shot prompts from dev only, planted scoring, bad rows."""
import json

import pytest

from zhllm.corpus.read_stats import ReadStats
from zhllm.eval.mc import McItem, build_prompt, evaluate_mc, read_items, subject_from_path, wilson_interval
from zhllm.tokenizer.encode import encode_text

from eval_support import planted_engine

ANSWERS = "ABCCDACBCA"  # 4 of 10 are C


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def items_rows(subject: str, answers: str, tag: str = "题"):
    return [{"subject": subject, "question": f"{tag}{subject}{i}：今天天气很好吗？", "A": "是", "B": "否",
             "C": "中国", "D": "苹果", "answer": a} for i, a in enumerate(answers)]


def test_a_planted_model_picks_its_letter_and_scores_exactly_as_expected(tmp_path, tiny_model_dir):
    engine, logp = planted_engine(tiny_model_dir, "C")
    path = write_jsonl(tmp_path / "test.jsonl", items_rows("history", ANSWERS) + items_rows("biology", "CCAB"))
    items = read_items([path])
    res = evaluate_mc(engine, items)
    assert [r["pick"] for r in res.rows] == ["C"] * 14
    assert res.overall.correct == 6 and res.overall.total == 14
    d = res.to_dict()
    assert d["acc"] == pytest.approx(6 / 14) and d["chance"] == pytest.approx(0.25)
    assert d["subjects"]["history"]["acc"] == pytest.approx(0.4) and d["subjects"]["biology"]["acc"] == 0.5
    letter_ids = [encode_text(engine.tokenizer, x)[0] for x in "ABCD"]
    assert res.rows[0]["scores"] == pytest.approx([float(logp[i]) for i in letter_ids], abs=1e-5)
    # options scoring: each option's text log-likelihood per character, under the same planted distribution
    opt = evaluate_mc(engine, items[:1], score="options")
    want = [sum(float(logp[t]) for t in encode_text(engine.tokenizer, o)) / len(o) for o in items[0].options]
    assert opt.rows[0]["scores"] == pytest.approx(want, abs=1e-5)


def test_an_items_letters_share_one_forward_and_score_as_separately(tiny_model_dir, monkeypatch):
    engine, _ = planted_engine(tiny_model_dir, "A")
    rows_seen = []
    real = engine._score_batch
    monkeypatch.setattr(engine, "_score_batch", lambda inputs, targets, *rest: rows_seen.append(len(inputs)) or
                        real(inputs, targets, *rest))
    prompt = "题目：一加一等于几？\n答案："
    together = engine.score([prompt] * 4, list("ABCD"))
    assert rows_seen == [1]
    alone = [engine.score([prompt], [x])[0].logprob for x in "ABCD"]
    assert [r.logprob for r in together] == pytest.approx(alone, abs=1e-6)


def test_k_shot_prompts_come_from_the_dev_split_of_the_same_subject_only(tmp_path, tiny_model_dir, monkeypatch):
    engine, _ = planted_engine(tiny_model_dir, "C")
    test = read_items([write_jsonl(tmp_path / "t.jsonl", items_rows("history", "AB") + items_rows("art", "C"))])
    dev = read_items([write_jsonl(tmp_path / "d.jsonl", items_rows("history", "DDD", tag="例")
                                  + items_rows("art", "BB", tag="例"))])
    prompts = []
    real = engine.score
    monkeypatch.setattr(engine, "score", lambda p, c, **kw: prompts.extend(p[::4]) or real(p, c, **kw))
    evaluate_mc(engine, test, dev=dev, shots=2)
    texts = [engine.tokenizer.decode(p) for p in prompts]
    assert len(texts) == 3
    for text, item in zip(texts, test):
        assert text.endswith(item.question + "\nA. 是\nB. 否\nC. 中国\nD. 苹果\n答案：")
        shown = [q for q in (x.question for x in dev) if q in text]
        assert shown == [x.question for x in dev if x.subject == item.subject][:2]
        assert not any(t.question in text for t in test if t is not item)
    assert "答案：D\n\n" in texts[0] and "答案：B\n\n" in texts[2]
    with pytest.raises(Exception, match="fewer than 3 items for subject"):
        evaluate_mc(engine, test, dev=dev, shots=3)


def test_chat_prompts_put_each_example_in_its_own_turn():
    item = McItem("history", "问？", ("甲", "乙"), "B")
    shot = McItem("history", "例？", ("丙", "丁"), "A")
    msgs = build_prompt(item, [shot], chat=True)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1]["content"] == "A" and msgs[2]["content"].endswith("问？\nA. 甲\nB. 乙\n答案：")


def test_upstream_csv_layouts_and_bad_rows_counted_with_file_and_line(tmp_path):
    cmmlu = tmp_path / "chinese_history.csv"
    cmmlu.write_text(",Question,A,B,C,D,Answer\n0,问一,甲,乙,丙,丁,B\n1,问二,甲,乙,丙,,A\n2,问三,甲,乙,丙,丁,E\n",
                     encoding="utf-8")
    ceval = tmp_path / "computer_network_val.csv"
    ceval.write_text("id,question,A,B,C,D,answer,explanation\n0,问四,甲,乙,丙,丁,d,\n", encoding="utf-8")
    bad_json = tmp_path / "x.jsonl"
    bad_json.write_text('{"question": "问五", "A": "1", "B": "2", "answer": "B"}\n{oops\n'
                        '{"A": "1", "B": "2", "answer": "A"}\n', encoding="utf-8")
    stats = ReadStats()
    items = read_items([cmmlu, ceval, bad_json], stats)
    assert [(i.subject, i.question, i.answer) for i in items] == [
        ("chinese_history", "问一", "B"), ("computer_network", "问四", "D"), ("x", "问五", "B")]
    assert items[2].options == ("1", "2")  # a record may have fewer options; an empty cell is a bad row
    assert stats.bad == {"bad_answer": 1, "invalid_json": 1, "missing_field": 2}
    assert any(e.startswith(f"{cmmlu}:3: missing_field (option D is empty)") for e in stats.examples)
    assert any(e.startswith(f"{cmmlu}:4: bad_answer") for e in stats.examples)
    assert any(e.startswith(f"{bad_json}:2: invalid_json") for e in stats.examples)
    assert any(e.startswith(f"{bad_json}:3: missing_field") for e in stats.examples)
    assert subject_from_path("a/high_school_biology_test.csv.gz") == "high_school_biology"


def test_wilson_interval():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
