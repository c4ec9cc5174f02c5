"""The built-in demo data: prose corpus quality and the task generators' exact, independently checked answers."""
import datetime
import json
import re

import pytest

from zhllm.demo import (DATA_DIR, TASK_KINDS, Task, eval_tasks, extract_answer, is_correct, iter_prose,
                        load_eval_tasks, pretrain_prompt, prose_files, sample_tasks, task_conversations, task_documents,
                        write_demo_corpus, write_demo_eval, write_demo_sft)
from zhllm.errors import ZhllmError

WEEKDAYS = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
HAN = re.compile(r"[\u4e00-\u9fff]")


# ---------------------------------------------------------------- prose corpus

def test_prose_corpus_is_big_valid_and_varied():
    files = prose_files()
    assert files and all(f.parent == DATA_DIR and f.name.startswith("prose_") for f in files)
    assert sum(f.stat().st_size for f in files) >= 300 * 1024
    texts, topics = [], set()
    for path in files:
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            record = json.loads(line)
            assert set(record) == {"text", "topic"}, f"{path.name}:{line_no}"
            text = record["text"]
            assert isinstance(text, str) and text.strip(), f"{path.name}:{line_no}"
            # Chinese prose: mostly Han characters, full-width punctuation, no leftover half-width commas
            assert len(HAN.findall(text)) >= 0.6 * len(text), f"{path.name}:{line_no} is not mostly Chinese"
            assert "，" in text or "。" in text, f"{path.name}:{line_no}"
            assert 100 <= len(text) <= 2000, f"{path.name}:{line_no} has {len(text)} characters"
            texts.append(text)
            topics.add(record["topic"])
    assert len(texts) == len(set(texts)), "exact duplicate documents"
    assert len(topics) >= 8
    assert sum(len(t) for t in texts) >= 100_000
    assert [r["text"] for r in iter_prose()] == texts


def test_prose_has_few_repeated_sentences():
    # Variety: a model's held-out loss means little if documents share their sentences.
    sentences = [s for r in iter_prose() for s in re.split(r"[。！？]", r["text"]) if len(s) >= 12]
    assert len(set(sentences)) >= 0.97 * len(sentences)


# ---------------------------------------------------------------- independent answer checks

UNIT_FACTORS = {("千米", "米"): 1000, ("米", "厘米"): 100, ("千克", "克"): 1000, ("小时", "分钟"): 60,
                ("分钟", "秒"): 60, ("元", "角"): 10, ("角", "分"): 10}
UNIT = "千米|厘米|米|千克|克|小时|分钟|秒|元|角|分"


def _numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


def _recompute(task: Task) -> str:
    q = task.question
    if task.kind == "addition":
        return str(sum(_numbers(q)))
    if task.kind == "subtraction":
        x, y = _numbers(q)
        return str(x - y)
    if task.kind == "multiplication":
        x, y = _numbers(q)
        return str(x * y)
    if task.kind == "weekday":
        if m := re.search(r"(\d+)年(\d+)月(\d+)日是(星期.)", q):  # a known day, then a day of the same month
            year, month, day = map(int, m.groups()[:3])
            assert WEEKDAYS[datetime.date(year, month, day).weekday()] == m.group(4), q
            asked = re.search(r"(\d+)月(\d+)日是星期几", q)
            assert int(asked.group(1)) == month, q
            return WEEKDAYS[datetime.date(year, month, int(asked.group(2))).weekday()]
        m = re.search(r"今天是(星期.)，(?:那么)?(\d+)天([前后])", q)
        today, days = WEEKDAYS.index(m.group(1)), int(m.group(2))
        return WEEKDAYS[(today + days if m.group(3) == "后" else today - days) % 7]
    if task.kind == "unit":
        amounts = re.findall(rf"(\d+)({UNIT})", q)
        target = re.search(rf"(?:多少|几)({UNIT})|换算成({UNIT})", q)
        target = target.group(1) or target.group(2)
        if len(amounts) == 2:  # "2小时15分钟是多少分钟"
            (n, big), (rest, small) = amounts
            return f"{int(n) * UNIT_FACTORS[(big, small)] + int(rest)}{small}"
        (n, source), = amounts
        if (source, target) in UNIT_FACTORS:
            return f"{int(n) * UNIT_FACTORS[(source, target)]}{target}"
        factor = UNIT_FACTORS[(target, source)]
        assert int(n) % factor == 0
        return f"{int(n) // factor}{target}"
    if task.kind == "comparison":
        if m := re.search(r"(\d+)和(\d+).*哪个(?:数)?更?([大小])", q):
            x, y = int(m.group(1)), int(m.group(2))
            return str(max(x, y) if m.group(3) == "大" else min(x, y))
        m = re.search(r"^(.+?)(?:身高|重|有)(\d+).*?，(.+?)(?:身高|重|有)(\d+)", q)
        a, x, b, y = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        want_smaller = "矮" in q
        return a if (x < y) == want_smaller else b
    if task.kind == "counting":
        quoted = re.findall(r"“(.+?)”", q)
        return str(len(quoted[0]) if len(quoted) == 1 else quoted[0].count(quoted[1]))
    raise AssertionError(task.kind)


def test_every_answer_is_right_when_recomputed():
    tasks = sample_tasks(1500, seed=3) + eval_tasks(300, seed=3)
    assert {t.kind for t in tasks} == set(TASK_KINDS)
    for task in tasks:
        assert _recompute(task) == task.answer, task


def test_weekday_known_dates():
    # fixed calendar facts, not recomputed by the same code
    assert _recompute(Task("weekday", "2024年3月5日是星期二，2024年3月20日是星期几？", "")) == "星期三"
    assert _recompute(Task("weekday", "已知2024年3月20日是星期三，那么3月5日是星期几？", "")) == "星期二"
    assert _recompute(Task("weekday", "今天是星期六，50天后是星期几？", "")) == "星期日"


# ---------------------------------------------------------------- determinism, variety, split

def test_generators_are_deterministic_per_seed_and_varied():
    assert sample_tasks(50, seed=7) == sample_tasks(50, seed=7)
    assert sample_tasks(50, seed=7) != sample_tasks(50, seed=8)
    assert task_documents(5, seed=1) == task_documents(5, seed=1)
    assert task_conversations(5, seed=1) == task_conversations(5, seed=1)
    tasks = sample_tasks(500, seed=0)
    assert len({t.question for t in tasks}) > 450
    assert len({t.answer for t in tasks}) > 100
    assert all(len({t.question for t in sample_tasks(200, 0, [k])}) > 100 for k in TASK_KINDS)


def test_eval_set_is_disjoint_from_training_text():
    held_out = eval_tasks(200, seed=0)
    assert len({t.question for t in held_out}) == 200
    train_questions = {t.question for t in sample_tasks(20_000, seed=0)}
    train_questions |= {m[0]["content"] for m in task_conversations(3000, seed=0)}
    documents = "\n".join(task_documents(1000, seed=0))
    for task in held_out:
        assert task.question not in train_questions
        assert f"问：{task.question}\n" not in documents


def test_bad_arguments_are_user_errors():
    with pytest.raises(ZhllmError, match="unknown task kind"):
        sample_tasks(3, kinds=["poetry"])
    with pytest.raises(ZhllmError):
        eval_tasks(-1)


# ---------------------------------------------------------------- answer extraction and scoring

@pytest.mark.parametrize("output", ["答案：42", "答案是 42 个。", "结果为42", "42", "３５+７=４２。\n答案：４２",
                                    "答案：42个苹果", "一共42个。"])
def test_is_correct_accepts_phrasings_of_a_number(output):
    assert is_correct(Task("addition", "35+7等于几？", "42"), output)


@pytest.mark.parametrize("output", ["答案：41", "答案：420", "", "我不知道", "答案：", "答案：42米"])
def test_is_correct_rejects_wrong_numbers(output):
    assert not is_correct(Task("unit", "42千米是多少千米？", "42千米"), output)


def test_is_correct_units_weekdays_and_names():
    grams = Task("unit", "3.5千克是多少克？", "3500克")
    assert is_correct(grams, "答案：3500克") and is_correct(grams, "3500 克") and is_correct(grams, "答案：3500")
    assert not is_correct(grams, "答案：3500千克") and not is_correct(grams, "答案：350克")
    assert is_correct(Task("unit", "3公里是多少米？", "3千米"), "答案：3公里")
    tuesday = Task("weekday", "2024年3月5日是星期几？", "星期二")
    for good in ["答案：星期二", "星期二。", "是周二", "那天是礼拜二", "2024年3月5日是星期二。\n答案：星期二"]:
        assert is_correct(tuesday, good), good
    for bad in ["答案：星期三", "周四", "星期", "答案：2"]:
        assert not is_correct(tuesday, bad), bad
    sunday = Task("weekday", "今天是星期六，1天后是星期几？", "星期日")
    assert is_correct(sunday, "星期天") and is_correct(sunday, "答案：周日")
    taller = Task("comparison", "小明身高120厘米，小红身高130厘米，谁更高？", "小红")
    assert is_correct(taller, "答案：小红") and is_correct(taller, "小红更高。")
    assert is_correct(taller, "答案：小红，她身高130厘米。")
    assert not is_correct(taller, "答案：小明") and not is_correct(taller, "小红和小明一样高")


def test_extract_answer_reads_training_answers_back():
    for task in sample_tasks(300, seed=5):
        assert pretrain_prompt(task).endswith("答：") and task.question in pretrain_prompt(task)
        assert extract_answer(f"{task.reasoning}\n答案：{task.answer}") == extract_answer(task.answer)
        assert is_correct(task, f"{task.reasoning}\n答案：{task.answer}")
    assert extract_answer("") is None and extract_answer("答案：") is None


def test_worked_lines_teach_only_true_steps_that_lead_to_the_answer():
    """A worked line is what a small model learns to imitate: every equation and comparison in it holds, and
    its last step is the answer (column sums, borrows, remainders, counted days and counted characters)."""
    equation = re.compile(r"(\d+(?:[-+×÷]\d+)+)=(\d+)")
    compared = re.compile(r"(\d+)([<>])(\d+)")
    for task in sample_tasks(3000, seed=11):
        steps = equation.findall(task.reasoning)
        for left, right in steps:
            assert eval(left.replace("×", "*").replace("÷", "//")) == int(right), task
        for x, sign, y in compared.findall(task.reasoning):
            assert (int(x) > int(y)) == (sign == ">"), task
        if task.kind in ("addition", "subtraction"):
            assert task.reasoning.startswith("个位") and steps[-1][1] == task.answer, task
        if task.kind == "comparison" and not task.answer.isdigit():
            owner = re.search(r"是(.+?)的，所以(.+?)(?:更|的)", task.reasoning)
            assert owner.group(1) == owner.group(2) == task.answer, task
        if task.kind == "weekday":  # every weekday is counted from a day the question gives
            (days, rest), = re.findall(r"(\d+)除以7余(\d+)", task.reasoning)
            assert int(days) % 7 == int(rest) and "往" in task.reasoning, task
            assert task.reasoning.rstrip("。").endswith(task.answer), task
        if task.kind == "counting":
            counted = re.findall(r"\d+", task.reasoning.split("：", 1)[1].split("，")[0])
            last = counted[-1] if counted else "0"
            assert last == task.answer, task
    carried = next(t for t in sample_tasks(3000, seed=11) if t.kind == "addition" and "+1=" in t.reasoning)
    assert re.search(r"个位\d\+\d=1\d，十位\d+\+\d+\+1=", carried.reasoning), carried


# ---------------------------------------------------------------- files for the pipeline

def test_writers_produce_pipeline_files(tmp_path):
    prose, tasks = write_demo_corpus(tmp_path / "corpus", n_task_docs=20, seed=1)
    prose_lines = prose.read_text(encoding="utf-8").splitlines()
    assert len(prose_lines) == sum(1 for _ in iter_prose())
    task_records = [json.loads(line) for line in tasks.read_text(encoding="utf-8").splitlines()]
    assert len(task_records) == 20 and all("问：" in r["text"] and "答案：" in r["text"] for r in task_records)

    sft = write_demo_sft(tmp_path / "sft.jsonl", n=40, seed=1, smalltalk_fraction=0.25)
    records = [json.loads(line) for line in sft.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 40
    for record in records:
        user, assistant = record["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert user["content"].strip() and assistant["content"].strip()
    assert sum("答案：" in r["messages"][1]["content"] for r in records) == 30  # the rest is small talk
    assert write_demo_sft(tmp_path / "again.jsonl", n=40, seed=1,
                          smalltalk_fraction=0.25).read_bytes() == sft.read_bytes()
    with pytest.raises(ZhllmError, match="smalltalk_fraction"):
        write_demo_sft(tmp_path / "x.jsonl", n=4, smalltalk_fraction=2)

    eval_path = write_demo_eval(tmp_path / "eval.jsonl", n=25, seed=1)
    loaded = load_eval_tasks(eval_path)
    assert [(t.kind, t.question, t.answer) for t in loaded] == \
        [(t.kind, t.question, t.answer) for t in eval_tasks(25, seed=1)]
    with pytest.raises(ZhllmError, match="not found"):
        load_eval_tasks(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"kind": "x"}\n', encoding="utf-8")
    with pytest.raises(ZhllmError, match="bad.jsonl:1"):
        load_eval_tasks(tmp_path / "bad.jsonl")
