"""`zhllm eval` from the command line: tables, --out policy, generation tasks, one-line errors."""
import json

import pytest

from zhllm.cli import main
from zhllm.eval.gen import JsonlGenTask, first_number, matches
from zhllm.eval.tasks import Sampling, pass_at_k, run_task, sampled_metrics

from eval_support import planted_engine


def test_matching_rules():
    assert matches("北京。\n后面的话", "北京", "exact") and not matches("北京市", "北京", "exact")
    assert matches("答：一共8个苹果", "8", "numeric") and matches("1,200.0元", "1200", "numeric")
    assert not matches("没有数字", "3", "numeric") and first_number("x=-2.5") == -2.5
    assert matches("我觉得是长江吧", "长江", "contains") and not matches("黄河", "长江", "contains")


def test_gen_task_on_a_planted_model_and_bad_rows(tmp_path, tiny_model_dir):
    engine, _ = planted_engine(tiny_model_dir, "7")
    data = tmp_path / "gen.jsonl"
    data.write_text("\n".join([
        json.dumps({"prompt": "三加四等于几？", "answer": "7777"}, ensure_ascii=False),
        json.dumps({"prompt": "二加二等于几？", "answer": "4"}, ensure_ascii=False),
        json.dumps({"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "7777"}]},
                   ensure_ascii=False),
        json.dumps({"prompt": "没有答案"}, ensure_ascii=False)]) + "\n", encoding="utf-8")
    task = JsonlGenTask([data], match="exact")
    assert len(task.items()) == 3 and task.stats.bad == {"missing_field": 1}
    assert task.stats.examples[0].startswith(f"{data}:4: missing_field")
    rows = run_task(task, engine.model, engine.tokenizer, chat=False, max_new_tokens=4, engine=engine)
    assert [r["output"] for r in rows] == ["7777"] * 3
    assert [r["correct"] for r in rows] == [True, False, True]
    numeric = run_task(JsonlGenTask([data], match="numeric"), engine.model, engine.tokenizer, chat=False,
                       max_new_tokens=4, engine=engine)
    assert [r["correct"] for r in numeric] == [True, False, True]


def test_pass_at_k_is_the_share_of_k_subsets_holding_a_right_answer():
    from itertools import combinations
    for n, right in [(1, 0), (1, 1), (4, 1), (5, 2), (8, 3), (8, 8)]:
        samples = [True] * right + [False] * (n - right)
        for k in range(1, n + 1):
            subsets = list(combinations(samples, k))
            assert pass_at_k(n, right, k) == pytest.approx(sum(any(c) for c in subsets) / len(subsets))
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    rows = [{"correct": [True, False, False, False]}, {"correct": [False] * 4}, {"correct": [True] * 4}]
    m = sampled_metrics(rows, 4)
    assert m["acc"] == pytest.approx(5 / 12) and m["pass@4"] == pytest.approx(2 / 3)
    assert m["pass@2"] == pytest.approx((0.5 + 0 + 1) / 3) and "pass@1" not in m and m["n"] == 3


def test_sampled_answers_follow_the_models_distribution(tmp_path, tiny_model_dir):
    """The planted model says "7" with probability p at every position, so four new tokens are "7777" with
    probability p**4: pass@1 over many sampled answers must land near it (greedy would give 1, noise 0)."""
    from zhllm.tokenizer.encode import encode_text
    engine, logps = planted_engine(tiny_model_dir, "7")
    (fav,) = encode_text(engine.tokenizer, "7")
    q = float(logps[fav].exp()) ** 4
    assert 0.2 < q < 0.8  # the check below can tell sampling from greedy and from noise
    data = tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"第{i}题", "answer": "7777"}, ensure_ascii=False) + "\n"
                            for i in range(3)), encoding="utf-8")
    task = JsonlGenTask([data], match="exact")
    sampling = Sampling(48, temperature=1.0, seed=0)
    rows = run_task(task, engine.model, engine.tokenizer, chat=False, max_new_tokens=4, engine=engine,
                    batch_size=2, sampling=sampling)
    assert [len(r["outputs"]) for r in rows] == [48] * 3 and all(len(r["correct"]) == 48 for r in rows)
    assert all(ok == (out == "7777") for r in rows for out, ok in zip(r["outputs"], r["correct"]))
    m = sampled_metrics(rows, 48)
    assert abs(m["acc"] - q) < 0.15 and m["pass@48"] == 1.0 and m["pass@2"] > m["acc"]
    again = run_task(task, engine.model, engine.tokenizer, chat=False, max_new_tokens=4, engine=engine,
                     batch_size=2, sampling=sampling)
    assert [r["outputs"] for r in again] == [r["outputs"] for r in rows]  # seeded


def test_cli_sampled_pass_at_k_table_and_rows(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "gen.jsonl"
    data.write_text(json.dumps({"prompt": "三加四等于几？", "answer": "7"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    out = tmp_path / "res"
    assert main(["eval", str(tiny_model_dir), "--task", "gen", "--input", str(data), "--samples", "4",
                 "--temperature", "1.0", "--max-new-tokens", "3", "--out", str(out), "--no-progress"]) == 0
    assert "| n | pass@2 | pass@4 |" in capsys.readouterr().out
    result = json.loads((out / "results.json").read_text(encoding="utf-8"))["models"][str(tiny_model_dir)]
    assert result["samples"] == 4 and 0 <= result["acc"] <= result["pass@2"] <= result["pass@4"] <= 1
    (row,) = [json.loads(line) for line in (out / f"rows-0-{tiny_model_dir.name}.jsonl").read_text(
        encoding="utf-8").splitlines()]
    assert len(row["outputs"]) == 4 and len(row["correct"]) == 4
    with pytest.raises(SystemExit) as exit_:  # argparse's own one-line usage error
        main(["eval", str(tiny_model_dir), "--task", "gen", "--input", str(data), "--samples", "2",
              "--temperature", "0"])
    assert exit_.value.code == 2 and "--temperature: must be > 0" in capsys.readouterr().err


def test_cli_mc_table_and_out(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "history.csv"
    data.write_text(",Question,A,B,C,D,Answer\n0,问一,甲,乙,丙,丁,B\n1,问二,甲,乙,丙,丁,C\n", encoding="utf-8")
    out = tmp_path / "res"
    assert main(["eval", str(tiny_model_dir), "--task", "mc", "--input", str(data), "--out", str(out), "--dtype",
                 "float32", "--no-progress"]) == 0
    shown = capsys.readouterr().out
    assert "| accuracy | 95% CI | chance | n |" in shown and "25.0%" in shown
    report = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert report["models"][str(tiny_model_dir)]["n"] == 2
    assert len((out / f"rows-0-{tiny_model_dir.name}.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    # re-running replaces its own output; a directory zhllm did not write is refused in one line
    assert main(["eval", str(tiny_model_dir), "--task", "mc", "--input", str(data), "--out", str(out),
                 "--no-progress"]) == 0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    assert main(["eval", str(tiny_model_dir), "--task", "mc", "--input", str(data), "--out", str(foreign)]) == 2
    assert "was not written by zhllm" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--task", "mc"], "--task mc needs --input"),
    (["--task", "mc", "--input", "{data}", "--shots", "2"], "--shots needs a dev split"),
    (["--task", "bpb", "--input", "{missing}"], "input not found"),
])
def test_cli_mistakes_are_one_line(tmp_path, tiny_model_dir, capsys, argv, message):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "A": "1", "B": "2", "answer": "A"}\n', encoding="utf-8")
    argv = [a.format(data=data, missing=tmp_path / "nope.jsonl") for a in argv]
    assert main(["eval", str(tiny_model_dir), *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zhllm: error: ") and message in err and len(err.strip().splitlines()) == 1
