"""What an evaluation task is, and how one is run against a model.

A task has items; for each item it builds a prompt (plain text for a pretrained model, chat messages for a
chat model) and scores the model's response. Two kinds:
- "generative": the model answers greedily and `score(item, output)` judges the text (e.g. exact match); or, with
  `Sampling`, answers n times at a temperature, judged one by one, for pass@k (`sampled_metrics`);
- "categorical": each item has choices; the model's pick is the choice whose continuation it finds most
  likely (summed log-probability after the prompt), and the item is right when that is `item.answer`.
Both go through the inference engine (`Engine.generate_batch`, `Engine.score`), in `generate_answers`,
`score_continuations` and `pick_choice` only (mc.py and bpb.py score through `score_continuations`). A new task is
a `Task` subclass in its own module here (demo_tasks.py: generative).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence


@dataclass(frozen=True)
class Item:
    question: str
    answer: str                      # generative: the reference; categorical: the correct choice's label
    choices: tuple[str, ...] = ()    # categorical only: the labels a model picks from
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Sampling:
    """Sampled answers instead of one greedy answer: `n` per item at `temperature` (and `top_p`), seeded."""
    n: int
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0


class Task:
    name: str = "task"
    kind: Literal["categorical", "generative"] = "generative"

    def items(self) -> Sequence[Item]:
        raise NotImplementedError

    def prompt(self, item: Item, chat: bool) -> str | list[dict]:
        """Plain text for a pretrained model to complete, or chat messages for a chat model."""
        raise NotImplementedError

    # generative tasks
    def stop_strings(self, chat: bool) -> tuple[str, ...]:
        return ()

    def score(self, item: Item, output: str) -> bool:
        raise NotImplementedError

    # categorical tasks
    def continuation(self, item: Item, choice: str) -> str:
        """The text scored after the prompt for one choice (by default the choice itself)."""
        return choice


def generate_answers(model, tokenizer, prompts: Sequence[str | list[dict]], max_new_tokens: int,
                     stop_strings: Sequence[str] = (), engine=None) -> list[str]:
    """Greedy answers, one per prompt, decoded together by the inference engine (`engine`, else a new one)."""
    if engine is None:
        from ..infer.engine import Engine
        engine = Engine(model, tokenizer)
    return engine.generate_batch(list(prompts), max_new_tokens=max_new_tokens, temperature=0.0,
                                 stop_strings=tuple(stop_strings)).texts


def sample_answers(engine, prompts: Sequence[str | list[dict]], sampling: Sampling, max_new_tokens: int,
                   stop_strings: Sequence[str] = (), seed: int = 0) -> list[list[str]]:
    """`sampling.n` answers per prompt, decoded together by the inference engine, seeded by `seed`."""
    gen = engine.generate_batch(list(prompts), n=sampling.n, seed=seed, max_new_tokens=max_new_tokens,
                                temperature=sampling.temperature, top_p=sampling.top_p,
                                stop_strings=tuple(stop_strings))
    texts = gen.texts
    return [texts[i * sampling.n:(i + 1) * sampling.n] for i in range(len(prompts))]


def pass_at_k(n: int, right: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which `right` are right (Chen et al., 2021): the chance
    that k of the n drawn without replacement hold at least one right answer, 1 - C(n - right, k) / C(n, k)."""
    if not 0 <= right <= n or not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 0 <= right <= n and 1 <= k <= n (got n={n}, right={right})")
    return 1.0 - math.comb(n - right, k) / math.comb(n, k)


def sampled_metrics(rows: Sequence[dict], n: int) -> dict:
    """acc = pass@1 (the mean share of right samples) with a normal 95% interval over items, and pass@k for k = 2,
    4, ... up to n (and n itself), from `run_task` rows with sampled answers."""
    ks = sorted({2 ** i for i in range(1, n.bit_length())} | ({n} if n > 1 else set()))
    shares = [sum(r["correct"]) / n for r in rows]
    items = max(len(shares), 1)
    mean = sum(shares) / items
    sd = math.sqrt(sum((x - mean) ** 2 for x in shares) / max(items - 1, 1))
    half = 1.959964 * sd / math.sqrt(items)
    out = {"acc": mean, "ci95": [max(0.0, mean - half), min(1.0, mean + half)], "n": len(shares), "samples": n}
    for k in ks:
        out[f"pass@{k}"] = sum(pass_at_k(n, sum(r["correct"]), k) for r in rows) / items
    return out


def score_continuations(engine, prompts: Sequence, continuations: Sequence, batch_size: int = 16) -> list[float]:
    """Summed log-probability (nats) of each continuation after its prompt, batched by the engine (pairs that
    share their input, such as an item's answer letters, share one forward)."""
    return [r.logprob for r in engine.score(prompts, continuations, batch_size=batch_size)]


def pick_choice(model, tokenizer, task: Task, item: Item, chat: bool) -> tuple[str, list[float]]:
    """Categorical scoring core: the choice whose continuation has the highest summed log-probability after
    the prompt (nats), and every choice's score."""
    from ..infer.engine import Engine
    if not item.choices:
        raise ValueError(f"{task.name}: a categorical item needs choices ({item.question[:40]!r})")
    prompt = task.prompt(item, chat)
    scored = Engine(model, tokenizer).score([prompt] * len(item.choices),
                                            [task.continuation(item, c) for c in item.choices])
    scores = [r.logprob for r in scored]
    return item.choices[max(range(len(scores)), key=scores.__getitem__)], scores


def run_task(task: Task, model, tokenizer, chat: bool, max_new_tokens: int = 64, batch_size: int = 16, *,
             engine=None, progress: Callable[[int], None] | None = None,
             sampling: Sampling | None = None) -> list[dict]:
    """One row per item: question, reference, the model's output (or pick) and whether it is correct; with
    `sampling` (generative tasks), the answers as `outputs` and `correct` as one bool per answer.
    `engine` (an Engine of this model) is reused across batches; `progress(n)` after every n items."""
    items = list(task.items())
    was_training = model.training
    model.eval()
    rows: list[dict] = []
    try:
        if task.kind == "generative" and sampling is not None:
            if engine is None:
                from ..infer.engine import Engine
                engine = Engine(model, tokenizer)
            for i in range(0, len(items), batch_size):
                batch = items[i:i + batch_size]
                answers = sample_answers(engine, [task.prompt(it, chat) for it in batch], sampling, max_new_tokens,
                                         task.stop_strings(chat), seed=sampling.seed + i)
                rows += [{"question": it.question, "answer": it.answer, "outputs": outs,
                          "correct": [bool(task.score(it, o)) for o in outs]} for it, outs in zip(batch, answers)]
                if progress is not None:
                    progress(len(batch))
        elif task.kind == "generative":
            reuse = {"engine": engine} if engine is not None else {}
            prompts = [task.prompt(it, chat) for it in items]
            outputs: list[str] = []
            for i in range(0, len(prompts), batch_size):
                outputs += generate_answers(model, tokenizer, prompts[i:i + batch_size], max_new_tokens,
                                            task.stop_strings(chat), **reuse)
                if progress is not None:
                    progress(len(prompts[i:i + batch_size]))
            rows = [{"question": it.question, "answer": it.answer, "output": out, "correct": bool(task.score(it, out))}
                    for it, out in zip(items, outputs)]
        elif task.kind == "categorical":
            for it in items:
                pick, scores = pick_choice(model, tokenizer, task, it, chat)
                rows.append({"question": it.question, "answer": it.answer, "output": pick, "scores": scores,
                             "correct": pick == it.answer})
        else:
            raise ValueError(f"{task.name}: unknown task kind {task.kind!r}")
    finally:
        model.train(was_training)
    return rows


def accuracy(rows: Sequence[dict]) -> float:
    return sum(r["correct"] for r in rows) / max(len(rows), 1)
