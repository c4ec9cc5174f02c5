"""Rewards for RL stages: one number per completion, a weighted sum of reward functions.

Built-in rules (configured as `{type: ..., weight: ...}` entries of a recipe's `rewards` list):
- exact: 1 when the answer the completion gives equals the record's `answer`, else 0. "Gives" as the demo's
  judge reads it (zhllm.demo.answers: after the last "答案：", NFKC, a number with or without its unit), so
  the reward agrees with the accuracy `zhllm eval` reports on the demo tasks;
- numeric: 1 when the last number in the completion is within `tolerance` (relative, at least absolute) of
  the first number in `answer`, else 0;
- format: 1 when the stripped completion matches the regular expression `pattern` in full, else 0;
- length: a penalty, 0 up to `target` completion tokens, then -(tokens - target) / target, at most -1.
`{type: model, path: DIR}` scores each prompt + completion with a reward model (`zhllm rm`; align/reward_scores.py),
rendered as a chat the way the reward model was trained.
And `{type: function, function: "module:function"}` (or "path/to/file.py:function"): called as
`fn(prompts=[...], completions=[...], answer=[...])` (TRL's keyword convention), it returns one number per
completion. A function that cannot be imported, raises or returns anything else is an error naming it.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import torch

from ..config import checked
from ..errors import ConfigError, ZhllmError

RULES_NEEDING_ANSWER = ("exact", "numeric")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class RewardSpec:
    type: Literal["exact", "numeric", "format", "length", "model", "function"]
    weight: float = 1.0
    name: Optional[str] = None          # metric name; default the type (or the function's name)
    function: Optional[str] = None      # type function: "module:function" or "file.py:function"
    path: Optional[str] = None          # type model: a reward-model directory
    pattern: Optional[str] = None       # type format: a regular expression the whole completion must match
    target: Optional[int] = checked(None, ge=1)  # type length: tokens allowed before the penalty starts
    tolerance: float = checked(1e-6, ge=0)       # type numeric


# ---------------------------------------------------------------- the rules

def exact_answer(completion: str, answer: str) -> float:
    from ..demo.answers import is_correct
    return float(is_correct(_Answer(answer), completion))


@dataclass(frozen=True)
class _Answer:
    answer: str


def _numbers(text: str) -> list[float]:
    text = re.sub(r"(?<=\d),(?=\d{3})", "", unicodedata.normalize("NFKC", text))
    return [float(m) for m in _NUMBER.findall(text)]


def numeric_answer(completion: str, answer: str, tolerance: float = 1e-6) -> float:
    got, want = _numbers(completion), _numbers(answer)
    if not got or not want:
        return 0.0
    return float(abs(got[-1] - want[0]) <= tolerance * max(1.0, abs(want[0])))


def format_match(completion: str, pattern: re.Pattern) -> float:
    return float(pattern.fullmatch(completion.strip()) is not None)


def length_penalty(tokens: int, target: int) -> float:
    return 0.0 - min(1.0, max(0, tokens - target) / target)


# ---------------------------------------------------------------- user functions

_LOADED: dict[str, Callable] = {}  # a file's module runs once per process, however often the recipe is read


def load_function(spec: str) -> Callable:
    """`module:function` (importable) or `path/to/file.py:function`; errors name the spec."""
    if spec not in _LOADED:
        _LOADED[spec] = _load_function(spec)
    return _LOADED[spec]


def _load_function(spec: str) -> Callable:
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"reward function {spec!r}: write it as module:function or file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise ZhllmError(f"reward function {spec!r}: no such file {path}")
            loader_spec = importlib.util.spec_from_file_location(f"zhllm_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ZhllmError:
        raise
    except Exception as e:  # the user's module may fail in any way while it is imported
        raise ZhllmError(f"reward function {spec!r}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ZhllmError(f"reward function {spec!r}: {module_name} has no function {attr}")
    return fn


def call_function(fn: Callable, spec: str, prompts: Sequence[Any], completions: Sequence[str],
                  answers: Sequence[str | None]) -> list[float]:
    n = len(completions)
    try:
        out = fn(prompts=list(prompts), completions=list(completions), answer=list(answers))
    except Exception as e:  # any failure inside user code becomes one line naming the function
        raise ZhllmError(f"reward function {spec!r} raised {type(e).__name__}: {e}") from None
    if isinstance(out, torch.Tensor):
        out = out.tolist()
    if not isinstance(out, (list, tuple)) or len(out) != n:
        raise ZhllmError(f"reward function {spec!r} returned {_describe(out)}; it must return a list of {n} "
                         "numbers (one per completion)")
    values = []
    for i, v in enumerate(out):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ZhllmError(f"reward function {spec!r} returned {v!r} for completion {i}; rewards must be "
                             "finite numbers")
        values.append(float(v))
    return values


def _describe(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"{len(value)} values"
    return f"a {type(value).__name__}"


_SCORERS: dict[str, Any] = {}  # a reward model is loaded once per process


def reward_model(path: str, where: str):
    from .reward_scores import RewardScorer
    if path not in _SCORERS:
        if not Path(path).expanduser().is_dir():
            raise ConfigError(f"{where}: path {path}: no such reward-model directory")
        try:
            _SCORERS[path] = RewardScorer(Path(path).expanduser())
        except ZhllmError as e:
            raise ConfigError(f"{where}: {e}") from None
    return _SCORERS[path]


def _as_messages(prompt: Any) -> list[dict]:
    return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]


# ---------------------------------------------------------------- the weighted sum

@dataclass
class RewardFunction:
    name: str
    weight: float
    needs_answer: bool
    score: Callable[[Sequence[Any], Sequence[str], Sequence[str | None], Sequence[int]], list[float]]
    check_answer: Callable[[str], str | None] = lambda answer: None  # why a record's answer cannot be scored


class Rewards:
    """The configured reward functions; `score` gives the weighted total and each function's raw values."""

    def __init__(self, functions: list[RewardFunction]):
        if not functions:
            raise ConfigError("no reward functions configured (set `rewards`)")
        self.functions = functions

    @property
    def needs_answer(self) -> bool:
        return any(f.needs_answer for f in self.functions)

    def answer_problem(self, answer: str | None) -> str | None:
        """Why a record cannot be scored (no answer where a rule needs one, an answer without a number for
        the numeric rule), or None."""
        if self.needs_answer and (not isinstance(answer, str) or not answer.strip()):
            return "missing answer"
        for f in self.functions:
            problem = f.check_answer(answer) if answer is not None else None
            if problem:
                return problem
        return None

    def score(self, prompts: Sequence[Any], completions: Sequence[str], answers: Sequence[str | None],
              token_counts: Sequence[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        per_function = {f.name: torch.tensor(f.score(prompts, completions, answers, token_counts),
                                             dtype=torch.float32) for f in self.functions}
        total = torch.zeros(len(completions))
        for f in self.functions:
            total += f.weight * per_function[f.name]
        return total, per_function


def build_rewards(specs: Sequence[RewardSpec], source: str = "<config>") -> Rewards:
    """Check every spec (one line naming the entry) and load user functions."""
    functions, seen = [], set()
    for i, s in enumerate(specs):
        where = f"{source}: rewards[{i}] ({s.type})"
        fn = _build_one(s, where)
        name = s.name or fn.name
        if name in seen:
            raise ConfigError(f"{where}: a second reward named {name!r}; give it a distinct `name`")
        seen.add(name)
        fn.name = name
        functions.append(fn)
    if not functions:
        raise ConfigError(f"{source}: `rewards` is empty; add at least one, e.g. {{type: exact}}")
    return Rewards(functions)


def _unused(s: RewardSpec, where: str, allowed: set[str]) -> None:
    for key in ("function", "pattern", "target", "path"):
        if key not in allowed and getattr(s, key) is not None:
            raise ConfigError(f"{where}: `{key}` does not apply to this reward type")


def _build_one(s: RewardSpec, where: str) -> RewardFunction:
    if s.type == "exact":
        _unused(s, where, set())
        return RewardFunction("exact", s.weight, True,
                              lambda p, c, a, n: [exact_answer(x, y) for x, y in zip(c, a)])
    if s.type == "numeric":
        _unused(s, where, set())
        tol = s.tolerance
        return RewardFunction("numeric", s.weight, True,
                              lambda p, c, a, n: [numeric_answer(x, y, tol) for x, y in zip(c, a)],
                              check_answer=lambda a: None if _numbers(a) else "answer has no number")
    if s.type == "format":
        _unused(s, where, {"pattern"})
        if not s.pattern:
            raise ConfigError(f"{where}: set `pattern`, the regular expression a well-formed completion matches")
        try:
            pattern = re.compile(s.pattern, re.DOTALL)
        except re.error as e:
            raise ConfigError(f"{where}: pattern {s.pattern!r} is not a regular expression ({e})") from None
        return RewardFunction("format", s.weight, False, lambda p, c, a, n: [format_match(x, pattern) for x in c])
    if s.type == "length":
        _unused(s, where, {"target"})
        if s.target is None:
            raise ConfigError(f"{where}: set `target`, the completion tokens allowed before the penalty")
        target = s.target
        return RewardFunction("length", s.weight, False, lambda p, c, a, n: [length_penalty(k, target) for k in n])
    if s.type == "model":
        _unused(s, where, {"path"})
        if not s.path:
            raise ConfigError(f"{where}: set `path`, a reward-model directory (zhllm rm's output)")
        scorer = reward_model(s.path, where)
        return RewardFunction("model", s.weight, False,
                              lambda p, c, a, n: scorer.score([_as_messages(x) + [{"role": "assistant", "content": y}]
                                                               for x, y in zip(p, c)]))
    _unused(s, where, {"function"})
    if not s.function:
        raise ConfigError(f"{where}: set `function: module:function`")
    spec = s.function
    fn = load_function(spec)
    return RewardFunction(getattr(fn, "__name__", spec.rpartition(":")[2]), s.weight, False,
                          lambda p, c, a, n: call_function(fn, spec, p, c, a))
