"""make-rejected: preference records from the model's own samples; equal answers skipped and counted; a killed
run re-run with the same command gives the same bytes as an uninterrupted one; atomic output; CLI errors."""
import json

import pytest

from zhllm.align import make_rejected as mr
from zhllm.cli import main
from zhllm.infer.engine import Engine
from zhllm.model.config import model_config_from
from zhllm.model.io import new_model, save_model
from zhllm.tokenizer.load import load_tokenizer

RECORDS = [
    {"system": "", "history": [], "prompt": "今天天气怎么样？", "chosen": "今天天气很好。", "rejected": "不知道。"},
    {"instruction": "介绍北京", "input": "", "output": "北京是中国的首都。"},
    {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
                       {"from": "human", "value": "长江有多长？"}, {"from": "gpt", "value": "约6300公里。"}]},
    {"prompt": "春眠不觉晓的下一句？", "chosen": "处处闻啼鸟。", "rejected": "处处闻啼鸟。"},  # bad pair, good prompt
    {"messages": [{"role": "user", "content": "1+1等于几？"}, {"role": "assistant", "content": "2"}]},
    {"prompt": "没有回答"},
] + [{"instruction": f"第{i}个问题：机器学习是什么？", "output": "机器学习是人工智能的一个分支。"} for i in range(7)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    vocab = len(load_tokenizer(tokenizer_dir))
    cfg = model_config_from("tiny", {"vocab_size": vocab, "init_std": 0.3})
    return save_model(new_model(cfg, seed=2), tmp_path_factory.mktemp("mr") / "m", tokenizer=tokenizer_dir)


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.load(model_dir, device="cpu", dtype="float32")


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "src.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
    return path


OPTS = dict(num=2, temperature=1.0, top_p=0.95, max_new_tokens=12, seed=7, batch_size=3, progress=False)


def test_writes_preference_records_keeping_system_and_history(engine, source, tmp_path):
    out = tmp_path / "pairs.jsonl"
    stats = mr.make_rejected(engine, source, out, **OPTS)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert stats.records == len(RECORDS) and stats.prompts == len(RECORDS) - 1  # the unanswered prompt is skipped
    assert stats.bad.bad_total == 1 and f"{source}:6" in stats.bad.examples[0]
    assert stats.written == len(rows) > 0
    assert stats.written + stats.equal_to_chosen + stats.repeated == 2 * stats.prompts
    assert all(r["rejected"].strip() != r["chosen"].strip() for r in rows)
    by_prompt = {r["prompt"]: r for r in rows}
    first = by_prompt["今天天气怎么样？"]
    assert list(first) == ["system", "history", "prompt", "chosen", "rejected"] and first["chosen"] == "今天天气很好。"
    assert list(by_prompt["介绍北京"]) == ["prompt", "chosen", "rejected"]  # alpaca source: no system/history keys
    assert by_prompt["长江有多长？"]["history"] == [["你好", "你好！"]]  # earlier ShareGPT turns become history
    assert by_prompt["春眠不觉晓的下一句？"]["chosen"] == "处处闻啼鸟。"
    assert not list(tmp_path.glob(".pairs.jsonl.partial*"))  # nothing left beside the finished file


def test_answers_equal_to_chosen_are_skipped_and_counted(engine, tmp_path):
    greedy = engine.generate([{"role": "user", "content": "你好"}], max_new_tokens=8)
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"prompt": "你好", "chosen": greedy, "rejected": "x"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    stats = mr.make_rejected(engine, path, tmp_path / "o.jsonl", num=3, temperature=0, max_new_tokens=8,
                             progress=False)
    assert stats.equal_to_chosen == 3 and stats.written == 0
    assert (tmp_path / "o.jsonl").read_text() == ""


def test_killed_run_rerun_is_byte_identical(engine, source, tmp_path, monkeypatch):
    whole = tmp_path / "whole.jsonl"
    mr.make_rejected(engine, source, whole, **OPTS)
    assert whole.read_text(encoding="utf-8").count("\n") > 6

    out = tmp_path / "resumed.jsonl"
    real = Engine.generate_batch
    calls = []

    def dying(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while sampling the third batch
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        mr.make_rejected(engine, source, out, **OPTS)
    monkeypatch.setattr(Engine, "generate_batch", real)
    partial, state = mr._paths(out)
    assert not out.exists() and partial.exists() and json.loads(state.read_text())["records"] == 6
    with open(partial, "ab") as fh:  # and half a line written after the last recorded batch
        fh.write(b'{"prompt": "half')
    calls.clear()
    monkeypatch.setattr(Engine, "generate_batch", lambda self, *a, **k: (calls.append(1), real(self, *a, **k))[1])
    mr.make_rejected(engine, source, out, **OPTS)
    assert len(calls) == 2  # 12 prompts in batches of 3: only the two unfinished batches were sampled again
    assert out.read_bytes() == whole.read_bytes()
    assert not partial.exists() and not state.exists()


def test_other_options_do_not_resume_and_existing_output_needs_overwrite(engine, source, tmp_path, monkeypatch):
    out = tmp_path / "o.jsonl"
    real, calls = Engine.generate_batch, []

    def dying(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # after one finished batch
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        mr.make_rejected(engine, source, out, **OPTS)
    monkeypatch.setattr(Engine, "generate_batch", real)
    with pytest.raises(mr.ZhllmError, match="other inputs or options"):
        mr.make_rejected(engine, source, out, **{**OPTS, "seed": 8})
    mr.make_rejected(engine, source, out, **{**OPTS, "seed": 8}, overwrite=True)
    with pytest.raises(mr.ZhllmError, match="exists; pass --overwrite"):
        mr.make_rejected(engine, source, out, **OPTS)
    with pytest.raises(mr.ZhllmError, match="is an input"):
        mr.make_rejected(engine, source, source, **OPTS)


def test_cli_writes_the_file_and_errors_are_one_line(model_dir, source, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    assert main(["dpo", "make-rejected", "--model", str(model_dir), "--input", str(source), "--out", str(out),
                 "--num", "1", "--max-new-tokens", "6", "--batch-size", "4", "--no-progress"]) == 0
    assert "preference records written" in capsys.readouterr().out and out.stat().st_size > 0
    assert main(["dpo", "make-rejected", "--model", str(model_dir), "--input", str(source), "--out", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zhllm: error:") and len(err.strip().splitlines()) == 1
    assert main(["dpo", "make-rejected", "--model", str(model_dir), "--input", str(source), "--out",
                 str(tmp_path / "x.jsonl"), "--strict", "--no-progress"]) == 2
    assert f"{source}:6" in capsys.readouterr().err
