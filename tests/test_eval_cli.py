"""`zhllm eval` from the command line: tables, --out policy, generation tasks, one-line errors."""
import json

import pytest

from zhllm.cli import main
from zhllm.eval.gen import JsonlGenTask, first_number, matches
from zhllm.eval.tasks import run_task

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
