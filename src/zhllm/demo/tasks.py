"""Procedural Chinese tasks with exact answers: unlimited, verifiable, deterministic from a seed.

Each generator draws one `Task` from a `random.Random`. The held-out eval set is split from the training
text by a stable hash of the question, so no eval question is ever seen in pretraining or SFT data.
"""
from __future__ import annotations

import calendar
import datetime
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ZhllmError
from .answers import WEEKDAYS, extract_answer, is_correct

__all__ = ["Task", "TASK_KINDS", "TASKS_VERSION", "sample_tasks", "eval_tasks", "task_documents",
           "task_conversations", "extract_answer", "is_correct", "is_eval_question", "pretrain_prompt", "answer_text"]


# Bumped when a generator's questions or worked lines change: pipeline runs cached with older tasks start again.
TASKS_VERSION = 2


@dataclass(frozen=True)
class Task:
    kind: str
    question: str
    answer: str
    reasoning: str = ""  # one worked line shown before the answer in training text


PEOPLE = ["小明", "小红", "小华", "小丽", "小刚", "小芳", "小军", "小雨", "小林", "小杰", "小美", "小强",
          "王老师", "李阿姨", "张叔叔", "爷爷", "奶奶", "妈妈", "爸爸", "姐姐", "哥哥"]
# (item, measure word)
ITEMS = [("苹果", "个"), ("橘子", "个"), ("鸡蛋", "个"), ("书", "本"), ("铅笔", "支"), ("糖", "颗"),
         ("邮票", "张"), ("小鱼", "条"), ("花", "朵"), ("气球", "个"), ("贴纸", "张"), ("梨", "个"),
         ("饼干", "块"), ("玻璃球", "颗"), ("故事书", "本"), ("小鸡", "只"), ("桃子", "个"), ("画片", "张")]
PLACES = ["篮子", "书架", "盒子", "袋子", "箱子", "柜子", "盘子"]


def _two_people(rng: random.Random) -> tuple[str, str]:
    first, second = rng.sample(PEOPLE, 2)
    return first, second


def _addition(rng: random.Random) -> Task:
    x, y = rng.randint(2, 60), rng.randint(2, 60)
    item, m = rng.choice(ITEMS)
    a, b = _two_people(rng)
    place = rng.choice(PLACES)
    price_a, price_b = (rng.choice(["一本笔记本", "一支钢笔", "一个书包", "一瓶牛奶"]),
                        rng.choice(["一把尺子", "一块橡皮", "一个面包", "一盒彩笔"]))
    templates = [
        f"{a}有{x}{m}{item}，{b}又给了{a}{y}{m}。{a}现在一共有多少{m}{item}？",
        f"{place}里原来有{x}{m}{item}，后来又放进去{y}{m}。{place}里现在有多少{m}{item}？",
        f"{a}上午买了{x}{m}{item}，下午又买了{y}{m}，今天一共买了多少{m}？",
        f"{price_a}{x}元，{price_b}{y}元，两样一共要多少元？",
        f"计算：{x}加{y}等于多少？",
        f"{x}+{y}等于几？",
        f"班里有男生{x}人，女生{y}人，全班一共有多少人？",
        f"一辆公交车上有{x}位乘客，到站后又上来{y}位，没有人下车。车上现在有多少位乘客？",
    ]
    return Task("addition", rng.choice(templates), str(x + y), _column_sum(x, y))


def _column_sum(x: int, y: int) -> str:
    """Units first, then tens with the carry: each step one single-digit fact a small model can learn."""
    units = x % 10 + y % 10
    tens = x // 10 + y // 10 + units // 10
    return f"个位{x % 10}+{y % 10}={units}，十位{x // 10}+{y // 10}+{units // 10}={tens}，{x}+{y}={x + y}。"


def _column_difference(x: int, y: int) -> str:
    """Units first (borrowing ten when needed), then tens less the borrow."""
    borrow = int(x % 10 < y % 10)
    units = f"个位{x % 10 + 10 * borrow}-{y % 10}={x % 10 + 10 * borrow - y % 10}"
    tens = f"十位{x // 10}-{borrow}-{y // 10}={x // 10 - borrow - y // 10}"
    return f"{units}，{tens}，{x}-{y}={x - y}。"


def _subtraction(rng: random.Random) -> Task:
    x = rng.randint(10, 99)
    y = rng.randint(1, x - 1)
    item, m = rng.choice(ITEMS)
    a, _ = _two_people(rng)
    templates = [
        f"{a}有{x}{m}{item}，送给朋友{y}{m}，还剩多少{m}？",
        f"{a}带了{x}元去超市，花了{y}元，还剩多少元？",
        f"树上有{x}只小鸟，飞走了{y}只，树上还有几只小鸟？",
        f"{rng.choice(PLACES)}里有{x}{m}{item}，拿走了{y}{m}，还剩多少{m}？",
        f"计算：{x}减{y}等于多少？",
        f"{x}-{y}等于几？",
        f"一本书有{x}页，{a}已经看了{y}页，还有多少页没看？",
        f"{a}今年{x}岁，{y}年前{a}几岁？",
    ]
    return Task("subtraction", rng.choice(templates), str(x - y), _column_difference(x, y))


def _multiplication(rng: random.Random) -> Task:
    x, y = rng.randint(2, 12), rng.randint(2, 12)
    item, m = rng.choice(ITEMS)
    a, _ = _two_people(rng)
    templates = [
        f"每盒有{x}{m}{item}，{y}盒一共有多少{m}？",
        f"一{m}{item}{x}元，{a}买了{y}{m}，一共要付多少元？",
        f"计算：{x}乘以{y}等于多少？",
        f"{x}×{y}等于几？",
        f"教室里有{y}排座位，每排坐{x}个人，一共坐了多少人？",
        f"{a}每天读{x}页书，{y}天一共读多少页？",
        f"一张桌子有{x}条腿的话，{y}张这样的桌子一共有多少条腿？",
    ]
    if x == 7:
        templates.append(f"一个星期有7天，{y}个星期一共有多少天？")
    return Task("multiplication", rng.choice(templates), str(x * y), f"{x}×{y}={x * y}。")


# (bigger unit, smaller unit, factor)
CONVERSIONS = [("千米", "米", 1000), ("米", "厘米", 100), ("千克", "克", 1000), ("小时", "分钟", 60),
               ("分钟", "秒", 60), ("元", "角", 10), ("角", "分", 10)]


def _unit_conversion(rng: random.Random) -> Task:
    big, small, factor = rng.choice(CONVERSIONS)
    n = rng.randint(1, 12)
    form = rng.randrange(3)
    if form == 0:  # big -> small
        question = rng.choice([f"{n}{big}等于多少{small}？", f"{n}{big}是多少{small}？",
                               f"把{n}{big}换算成{small}，是多少？"])
        return Task("unit", question, f"{n * factor}{small}", f"1{big}={factor}{small}，{n}×{factor}={n * factor}。")
    if form == 1:  # small -> big, always a whole number
        question = rng.choice([f"{n * factor}{small}等于多少{big}？", f"{n * factor}{small}是几{big}？"])
        return Task("unit", question, f"{n}{big}", f"1{big}={factor}{small}，{n * factor}÷{factor}={n}。")
    rest = rng.randint(1, factor - 1)  # mixed: "2小时15分钟是多少分钟？"
    total = n * factor + rest
    question = rng.choice([f"{n}{big}{rest}{small}是多少{small}？", f"{n}{big}{rest}{small}一共等于多少{small}？"])
    return Task("unit", question, f"{total}{small}", f"{n}×{factor}+{rest}={total}。")


def _random_date(rng: random.Random) -> datetime.date:
    start = datetime.date(1990, 1, 1)
    return start + datetime.timedelta(days=rng.randrange(365 * 46))


def _date_text(day: datetime.date) -> str:
    return f"{day.year}年{day.month}月{day.day}日"


def _weekday_of_date(rng: random.Random) -> Task:
    """The weekday of a date, given another date's weekday in the same month.

    Asked bare ("2023年5月3日是星期几？") it needs a calendar a small model cannot learn from the text, so its
    answers were guesses; given a known day, it is a day difference then a weekday offset, both worked.
    """
    day = _random_date(rng)
    days_in_month = calendar.monthrange(day.year, day.month)[1]
    known = day.replace(day=rng.choice([d for d in range(1, days_in_month + 1) if d != day.day]))
    start = WEEKDAYS[known.weekday()]
    question = rng.choice([f"{_date_text(known)}是{start}，{_date_text(day)}是星期几？",
                           f"已知{_date_text(known)}是{start}，那么{day.month}月{day.day}日是星期几？"])
    first, last = sorted((day.day, known.day))
    counted = _count_weekdays(known.weekday(), last - first, later=day > known)
    return Task("weekday", question, WEEKDAYS[day.weekday()], f"{last}-{first}={last - first}，{counted}")


def _count_weekdays(start: int, days: int, later: bool) -> str:
    """Whole weeks drop out; the rest is counted one day at a time."""
    word, step = ("后", 1) if later else ("前", -1)
    passed = "、".join(WEEKDAYS[(start + step * i) % 7] for i in range(1, days % 7 + 1)) or WEEKDAYS[start]
    return f"{days}除以7余{days % 7}，从{WEEKDAYS[start]}往{word}数{days % 7}天：{passed}。"


def _weekday_offset(rng: random.Random) -> Task:
    today = rng.randrange(7)
    days = rng.randint(1, 60)
    later = rng.random() < 0.7
    target = (today + days) % 7 if later else (today - days) % 7
    word = "后" if later else "前"
    question = rng.choice([f"今天是{WEEKDAYS[today]}，{days}天{word}是星期几？",
                           f"如果今天是{WEEKDAYS[today]}，那么{days}天{word}是星期几？"])
    return Task("weekday", question, WEEKDAYS[target], _count_weekdays(today, days, later))


def _who_wins(a: str, x: int, b: str, y: int, want_bigger: bool, says: str) -> tuple[str, str]:
    """(the person whose number wins, the worked line: that number, whose it is, then the answer)."""
    win, lose = (max(x, y), min(x, y)) if want_bigger else (min(x, y), max(x, y))
    owner = a if win == x else b
    return owner, f"{win}{'>' if want_bigger else '<'}{lose}，{win}是{owner}的，所以{owner}{says}。"


def _comparison(rng: random.Random) -> Task:
    a, b = _two_people(rng)
    form = rng.randrange(4)
    if form == 0:
        x, y = rng.sample(range(1, 1000), 2)
        bigger = rng.random() < 0.5
        word = "大" if bigger else "小"
        answer = max(x, y) if bigger else min(x, y)
        question = rng.choice([f"{x}和{y}，哪个数更{word}？", f"比一比：{x}和{y}哪个{word}？"])
        return Task("comparison", question, str(answer), f"{answer}比{x + y - answer}更{word}。")
    if form == 1:
        x, y = rng.sample(range(110, 190), 2)
        taller = rng.random() < 0.5
        word = "高" if taller else "矮"
        question = f"{a}身高{x}厘米，{b}身高{y}厘米，谁更{word}？"
        return Task("comparison", question, *_who_wins(a, x, b, y, taller, f"更{word}"))
    if form == 2:
        x, y = rng.sample(range(15, 90), 2)
        question = f"{a}重{x}千克，{b}重{y}千克，谁更重？"
        return Task("comparison", question, *_who_wins(a, x, b, y, True, "更重"))
    item, m = rng.choice(ITEMS)
    x, y = rng.sample(range(1, 50), 2)
    question = f"{a}有{x}{m}{item}，{b}有{y}{m}{item}，谁的{item}更多？"
    return Task("comparison", question, *_who_wins(a, x, b, y, True, f"的{item}更多"))


WORD_POOL = "天地人山水日月风云花草树木春夏秋冬东南西北上下左右大小多少高低长短红黄蓝白黑金银"


def _counting(rng: random.Random) -> Task:
    if rng.random() < 0.5:
        text = "".join(rng.choice(WORD_POOL) for _ in range(rng.randint(2, 12)))
        question = rng.choice([f"“{text}”一共有几个字？", f"数一数，“{text}”有多少个汉字？"])
        numbered = "".join(f"{c}{i}" for i, c in enumerate(text, 1))
        return Task("counting", question, str(len(text)), f"逐个数：{numbered}，一共{len(text)}个字。")
    target = rng.choice(WORD_POOL[:12])
    others = [c for c in WORD_POOL if c != target]
    text = "".join(target if rng.random() < 0.3 else rng.choice(others) for _ in range(rng.randint(4, 14)))
    count = text.count(target)
    question = f"“{text}”里有几个“{target}”字？"
    seen, marked = 0, []
    for c in text:
        seen += c == target
        marked.append(f"{c}{seen}" if c == target else c)
    return Task("counting", question, str(count), f"逐字找“{target}”：{''.join(marked)}，一共出现了{count}次。")


GENERATORS: dict[str, list[Callable[[random.Random], Task]]] = {
    "addition": [_addition], "subtraction": [_subtraction], "multiplication": [_multiplication],
    "unit": [_unit_conversion], "weekday": [_weekday_of_date, _weekday_offset],
    "comparison": [_comparison], "counting": [_counting],
}
TASK_KINDS = tuple(GENERATORS)


def is_eval_question(question: str) -> bool:
    """Stable split: about one question in ten belongs to the held-out eval set, never to training."""
    return int(hashlib.sha256(question.encode("utf-8")).hexdigest(), 16) % 10 == 0


def _draw(n: int, rng: random.Random, kinds: list[str] | None, want_eval: bool) -> list[Task]:
    if n < 0:
        raise ZhllmError(f"number of tasks must be >= 0, got {n}")
    chosen = list(kinds) if kinds else list(TASK_KINDS)
    unknown = [k for k in chosen if k not in GENERATORS]
    if unknown:
        raise ZhllmError(f"unknown task kind(s) {unknown}; choose from {list(TASK_KINDS)}")
    generators = [g for k in chosen for g in GENERATORS[k]]
    tasks: list[Task] = []
    seen: set[str] = set()
    attempts = 0
    while len(tasks) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise ZhllmError(f"could not draw {n} distinct tasks of kinds {chosen}; ask for fewer")
        task = rng.choice(generators)(rng)
        if is_eval_question(task.question) != want_eval:
            continue
        if want_eval and task.question in seen:  # an eval set counts each question once
            continue
        seen.add(task.question)
        tasks.append(task)
    return tasks


def sample_tasks(n: int, seed: int = 0, kinds: list[str] | None = None) -> list[Task]:
    """`n` training tasks (never an eval question), the same list for the same seed."""
    return _draw(n, random.Random(f"train-{seed}"), kinds, want_eval=False)


def eval_tasks(n: int, seed: int = 0, kinds: list[str] | None = None) -> list[Task]:
    """`n` distinct held-out tasks, disjoint from anything `sample_tasks` can produce."""
    return _draw(n, random.Random(f"eval-{seed}"), kinds, want_eval=True)


def pretrain_prompt(task: Task) -> str:
    """The prompt a pretrained (not chat) model completes, in the same form as `task_documents`."""
    return f"问：{task.question}\n答："


def answer_text(task: Task) -> str:
    """What an assistant says: the worked line, then the answer in the form `extract_answer` reads."""
    return f"{task.reasoning}\n答案：{task.answer}" if task.reasoning else f"答案：{task.answer}"


DOC_INTROS = ["下面是几道练习题和答案。", "数学小练习：", "今天的练习题如下。", "问答练习。",
              "请看下面的问题，每道题后面都有解答。", ""]


def task_documents(n: int, seed: int = 0) -> list[str]:
    """`n` pretraining documents, each a few "问：…\\n答：…" blocks of training tasks."""
    rng = random.Random(f"docs-{seed}")
    sizes = [rng.randint(3, 6) for _ in range(n)]
    tasks = iter(sample_tasks(sum(sizes), seed))
    documents = []
    for size in sizes:
        blocks = [f"问：{t.question}\n答：{t.reasoning}答案：{t.answer}。" for t in (next(tasks) for _ in range(size))]
        intro = rng.choice(DOC_INTROS)
        documents.append("\n\n".join(([intro] if intro else []) + blocks))
    return documents


def task_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """`n` chat conversations (OpenAI-style messages): a user question and the assistant's answer."""
    return [[{"role": "user", "content": t.question}, {"role": "assistant", "content": answer_text(t)}]
            for t in sample_tasks(n, seed + 1_000_003)]  # a different stream than the documents
