"""`zhllm data self-instruct`: grow an SFT set from seed tasks with a big model behind an OpenAI-compatible API.

One attempt: a Chinese prompt shows a few seed instructions (and a few already generated ones) and asks for a
new one; the instruction is filtered (length, share of CJK characters, refusal, near duplicate of a seed or of
anything generated so far); the endpoint then answers it; the answer is filtered (length, CJK share, refusal),
the instruction is checked for duplicates once more (other attempts may have landed meanwhile) and the pair is
appended to OUT as one `messages` record, which every SFT reader of zhllm takes.

Near duplicates: MinHash over character 3-grams of the instruction (data/dedup.py's signature; 3 characters
suit short Chinese instructions) in datasketch's LSH, seeded with every seed instruction and every instruction
already in OUT. OUT is appended one whole line at a time with flush + fsync, so a killed run loses at most the
line being written; a re-run with the same OUT drops such a partial last line, rebuilds the index from the
records and continues to N. A lock on OUT keeps two runs from writing it at once.
"""
from __future__ import annotations

import fcntl
import json
import os
import queue
import random
import re
import threading
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..corpus.readers import ReadStats, expand_inputs, iter_records
from ..errors import ZhllmError
from .chat import SFTStats, iter_conversations
from .dedup import exact_key, shingle_hashes
from .ngrams import code_points
from .openai_client import ChatClient, EndpointRejected, RequestFailed
from .quality import cjk_ratio

INSTRUCTION_PROMPT = (
    "你正在帮助构建训练中文AI助手的指令数据。下面是几条示例任务：\n\n{examples}\n\n"
    "请写出一条全新的任务指令，要求：\n"
    "1. 与上面的任务明显不同，主题和形式尽量多样（如知识问答、写作、改写、总结、"
    "分类、推理、数学、编程、翻译、建议等）；\n"
    "2. 用简体中文书写，表述清楚具体，不依赖图片、文件或网络即可回答；如需输入材料，请直接写在指令里；\n"
    "3. 只输出这条指令本身，不要编号，不要解释，也不要回答它。"
)
ANSWER_SYSTEM = "你是一个知识渊博、乐于助人的中文AI助手。请用简体中文准确、完整地回答用户的请求。"

# Refusals and assistant boilerplate, compared after NFKC, lower-casing and removing whitespace.
REFUSAL_PHRASES = (
    "作为一个ai", "作为ai", "作为一个人工智能", "作为人工智能", "作为一个语言模型", "作为语言模型", "作为一名ai",
    "我无法回答", "我无法提供", "我无法完成", "我无法满足", "我不能回答", "我不能提供", "我不能帮助", "我没有办法回答",
    "很抱歉，我", "抱歉，我无法", "抱歉，我不能", "对不起，我无法", "对不起，我不能",
    "i'msorry", "iamsorry", "asanai", "asalanguagemodel", "icannotassist", "ican'tassist", "ican'thelp",
    "icannothelp", "i'munableto",
)
# "新任务：", "任务 3：", "指令:" and "1." style lead-ins the model may put before its instruction.
_LEAD_IN = re.compile(r"^\s*(?:(?:新的?)?(?:任务|指令)\s*\d*\s*[:：]|\d+\s*[.、:：)]|[-*]\s)\s*")
_NEXT_TASK = re.compile(r"\n\s*(?:(?:新的?)?(?:任务|指令)\s*\d+\s*[:：])")
EXAMPLE_CHARS = 300  # longest task shown in a prompt
SHINGLE = 3  # characters per MinHash shingle: short Chinese instructions have few 5-grams
_QUOTES = "\"'“”‘’「」『』"

DROP_REASONS = ("empty_reply", "instruction_length", "answer_length", "not_chinese", "refusal",
                "exact_duplicate", "near_duplicate")


@dataclass
class SelfInstructConfig:
    num: int
    seed_examples: int = 3          # seed instructions shown in each prompt
    generated_examples: int = 2     # generated instructions shown in each prompt (when there are any)
    temperature: float = 0.7
    max_tokens: int = 1024          # per answer; instructions ask for at most 256
    concurrency: int = 4
    max_failures: int = 5           # requests failing in a row, after their retries, before the run stops
    max_attempts: int | None = None  # attempts in all before giving up (default 20 per missing record + 50)
    min_instruction_chars: int = 4
    max_instruction_chars: int = 1000
    min_answer_chars: int = 2
    max_answer_chars: int = 8000
    min_cjk: float = 0.2            # CJK characters / non-space characters, in instruction and answer each
    dedup_threshold: float = 0.7    # estimated Jaccard similarity of character 3-grams
    seed: int = 0

    def check(self) -> None:
        if self.num < 1 or self.concurrency < 1 or self.max_failures < 1:
            raise ZhllmError("--num, --concurrency and --max-failures must be >= 1")
        if self.seed_examples < 1 or self.generated_examples < 0 or self.max_tokens < 1:
            raise ZhllmError("--seed-examples and --max-tokens must be >= 1, --generated-examples >= 0")
        if not 0 < self.dedup_threshold < 1 or not 0 <= self.min_cjk <= 1:
            raise ZhllmError("--dedup-threshold must be between 0 and 1 (exclusive), --min-cjk between 0 and 1")
        if not 0 <= self.temperature <= 2:
            raise ZhllmError(f"--temperature must be between 0 and 2, got {self.temperature}")
        if self.min_instruction_chars > self.max_instruction_chars or self.min_answer_chars > self.max_answer_chars:
            raise ZhllmError("a minimum length is above its maximum")


@dataclass
class SelfInstructReport:
    out: Path
    num: int
    seeds: int = 0
    seed_read: ReadStats = field(default_factory=ReadStats)
    seed_sft: SFTStats = field(default_factory=SFTStats)
    existing: int = 0
    partial_dropped: bool = False
    written: int = 0
    attempts: int = 0
    requests: int = 0
    retries: int = 0
    failed: int = 0
    dropped: Counter = field(default_factory=Counter)
    last_failure: str = ""

    @property
    def total(self) -> int:
        return self.existing + self.written

    def table(self) -> str:
        bad = self.seed_read.bad_total + sum(self.seed_sft.skipped.values())
        lines = [f"seeds: {self.seeds} tasks" + (f", skipped {bad} bad records" if bad else "")]
        lines += [f"  {line}" for line in self.seed_read.summary().splitlines()[1:]]
        for reason, n in self.seed_sft.skipped.most_common():
            lines.append(f"  {reason}: {n}, e.g. {', '.join(self.seed_sft.examples.get(reason, []))}")
        resumed = f" ({self.existing} from an earlier run)" if self.existing else ""
        lines.append(f"output: {self.out} has {self.total} of {self.num} records, {self.written} written now"
                     + resumed + ("; a partial last line was dropped" if self.partial_dropped else ""))
        lines.append(f"attempts {self.attempts}, requests {self.requests}, retried {self.retries}, "
                     f"failed after retries {self.failed}")
        kept = ", ".join(f"{r} {self.dropped[r]}" for r in DROP_REASONS if self.dropped[r])
        lines.append(f"dropped: {kept or 'none'}")
        if self.last_failure:
            lines.append(f"last failure: {self.last_failure}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- filters

def _squash(text: str) -> str:
    return "".join(unicodedata.normalize("NFKC", text).lower().split())


_REFUSALS = tuple(_squash(p) for p in REFUSAL_PHRASES)


def is_refusal(text: str) -> bool:
    squashed = _squash(text)
    return any(p in squashed for p in _REFUSALS)


def cjk_share(text: str) -> float:
    compact = "".join(text.split())
    return cjk_ratio(compact, code_points(compact))


def clean_instruction(reply: str) -> str:
    """The instruction in a reply: lead-ins like "新任务：" and wrapping quotes removed, a second task cut off."""
    text = reply.strip()
    text = _NEXT_TASK.split(text, maxsplit=1)[0]
    text = _LEAD_IN.sub("", text, count=1).strip()
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return text


def text_reason(text: str, lo: int, hi: int, min_cjk: float, length_reason: str) -> str | None:
    """Why `text` is dropped (a DROP_REASONS entry), or None."""
    if not text.strip():
        return "empty_reply"
    if not lo <= len(text.strip()) <= hi:
        return length_reason
    if is_refusal(text):
        return "refusal"
    if cjk_share(text) < min_cjk:
        return "not_chinese"
    return None


class SelfInstructStopped(ZhllmError):
    """The run stopped before N records; `report` holds the counts so far (what was written stays)."""

    def __init__(self, message: str, report: SelfInstructReport):
        super().__init__(f"{message}; {_state(report)}")
        self.report = report


class InstructionIndex:
    """Exact and MinHash near-duplicate lookups over instructions; `add` remembers one."""

    def __init__(self, threshold: float, num_perm: int = 128, seed: int = 1):
        from datasketch import MinHash, MinHashLSH
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        # Permutations are built once and shared: building them costs more than hashing an instruction.
        self.template = MinHash(num_perm=num_perm, seed=seed, hashfunc=int)
        self.exact: set[bytes] = set()
        self.size = 0

    def _minhash(self, text: str):
        from datasketch import MinHash
        t = self.template
        m = MinHash(num_perm=len(t.hashvalues), seed=t.seed, hashfunc=int, permutations=t.permutations,
                    scheme=t.scheme)
        m.update_batch(shingle_hashes(text, SHINGLE))  # already stable hashes: datasketch's hashfunc is identity
        return m

    def duplicate(self, text: str) -> str | None:
        if exact_key(text) in self.exact:
            return "exact_duplicate"
        if self.lsh.query(self._minhash(text)):
            return "near_duplicate"
        return None

    def add(self, text: str) -> None:
        key = exact_key(text)
        if key in self.exact:
            return
        self.exact.add(key)
        self.lsh.insert(self.size, self._minhash(text), check_duplication=False)
        self.size += 1


# ------------------------------------------------------------------------------------------------ files

def read_seeds(paths: Sequence[str | Path], report: SelfInstructReport) -> list[str]:
    """Instructions (first user turn) of the good seed records; bad records are counted with file:line."""
    files = expand_inputs(paths)
    records = iter_records(files, stats=report.seed_read)
    seeds = [msgs[1 if msgs[0]["role"] == "system" else 0]["content"].strip()
             for msgs, _ in iter_conversations(records, stats=report.seed_sft)]
    report.seeds = len(seeds)
    if not seeds:
        raise ZhllmError(f"no usable seed tasks in {', '.join(map(str, paths))} ({report.seed_read.why_empty()}; "
                         f"bad SFT records {sum(report.seed_sft.skipped.values())})")
    return seeds


def read_output(out: Path) -> tuple[list[str], bool]:
    """Instructions already in OUT, dropping a partial last line a killed run left (the file is truncated)."""
    if not out.exists():
        return [], False
    data = out.read_bytes()
    keep = data.rfind(b"\n") + 1
    partial = keep < len(data)
    if partial:
        with open(out, "r+b") as fh:
            fh.truncate(keep)
            os.fsync(fh.fileno())
    instructions = []
    for i, line in enumerate(data[:keep].splitlines(), 1):
        if not line.strip():
            continue
        try:
            msgs = json.loads(line)["messages"]
            instructions.append(next(m["content"] for m in msgs if m["role"] == "user"))
        except (ValueError, KeyError, TypeError, StopIteration):
            raise ZhllmError(f"{out}:{i}: not a self-instruct record; --out must be a new file or the output of "
                             f"an earlier run to continue") from None
    return instructions, partial


class _Appender:
    """OUT opened for appending whole lines durably, locked against a second writer."""

    def __init__(self, out: Path):
        if out.is_dir():
            raise ZhllmError(f"--out {out} is a directory; give a .jsonl file")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(out, "ab")
        except OSError as e:
            raise ZhllmError(f"cannot write {out}: {e.strerror or e}") from None
        try:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.close()
            raise ZhllmError(f"{out} is being written by another self-instruct run") from None
        dir_fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the file's name survives a power cut too
        finally:
            os.close(dir_fd)

    def append(self, record: dict[str, Any]) -> None:
        self.fh.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()


# ------------------------------------------------------------------------------------------------- loop

class _Pool:
    """Daemon worker threads: a stopped run never waits for requests still in flight to time out."""

    def __init__(self, workers: int):
        self.jobs: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.workers = workers
        for _ in range(workers):
            threading.Thread(target=self._work, daemon=True).start()

    def close(self) -> None:
        """Workers end after their current request; jobs not started are dropped."""
        while True:
            try:
                self.jobs.get_nowait()
            except queue.Empty:
                break
        for _ in range(self.workers):
            self.jobs.put(None)

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            tag, fn = job
            try:
                self.results.put((tag, fn(), None))
            except Exception as e:  # handed to the main thread, which decides
                self.results.put((tag, None, e))

    def submit(self, tag: Any, fn: Callable[[], Any]) -> None:
        self.jobs.put((tag, fn))


def instruction_prompt(seeds: list[str], generated: list[str], cfg: SelfInstructConfig,
                       rng: random.Random) -> list[dict[str, str]]:
    shown = rng.sample(seeds, min(cfg.seed_examples, len(seeds)))
    shown += rng.sample(generated, min(cfg.generated_examples, len(generated)))
    rng.shuffle(shown)
    examples = "\n".join(f"任务{i}：{_shorten(' '.join(t.split()))}" for i, t in enumerate(shown, 1))
    return [{"role": "user", "content": INSTRUCTION_PROMPT.format(examples=examples)}]


def _shorten(task: str) -> str:
    # A seed holding a whole article as its instruction would bloat every prompt it is drawn into.
    return task if len(task) <= EXAMPLE_CHARS else task[:EXAMPLE_CHARS] + "……"


def self_instruct(client: ChatClient, seeds_paths: Sequence[str | Path], out: str | Path, cfg: SelfInstructConfig,
                  progress: bool = True) -> SelfInstructReport:
    """Append records to OUT until it holds cfg.num; returns the counts. Raises ZhllmError (with the counts)
    when the endpoint keeps failing or rejects the requests; what was written stays."""
    from tqdm import tqdm

    cfg.check()
    out = Path(out).expanduser()
    report = SelfInstructReport(out=out, num=cfg.num)
    seeds = read_seeds(seeds_paths, report)
    appender = _Appender(out)  # lock before reading, so the truncation of a partial line is ours to do
    try:
        generated, report.partial_dropped = read_output(out)
        report.existing = len(generated)
        index = InstructionIndex(cfg.dedup_threshold)
        for text in seeds + generated:
            index.add(text)
        bar = tqdm(total=cfg.num, initial=min(report.existing, cfg.num), desc="self-instruct", unit="rec",
                   disable=not progress)
        try:
            _run(client, cfg, seeds, generated, index, appender, report, bar)
        finally:
            bar.close()
            report.retries = client.retries
    finally:
        appender.close()
    return report


def _run(client: ChatClient, cfg: SelfInstructConfig, seeds: list[str], generated: list[str],
         index: InstructionIndex, appender: _Appender, report: SelfInstructReport, bar) -> None:
    # Seeded by the records already there, so a resumed run does not replay the first run's prompts.
    rng = random.Random(f"{cfg.seed}:{report.existing}")
    missing = cfg.num - report.existing
    max_attempts = cfg.max_attempts if cfg.max_attempts is not None else 20 * max(missing, 0) + 50
    pool = _Pool(min(cfg.concurrency, max(missing, 1)))
    try:
        _loop(client, cfg, seeds, generated, index, appender, report, bar, rng, max_attempts, pool)
    finally:
        pool.close()


def _loop(client: ChatClient, cfg: SelfInstructConfig, seeds: list[str], generated: list[str],
          index: InstructionIndex, appender: _Appender, report: SelfInstructReport, bar, rng: random.Random,
          max_attempts: int, pool: _Pool) -> None:
    in_flight = failures_in_row = 0

    def ask(messages, max_tokens, seed):
        return lambda: client.chat(messages, temperature=cfg.temperature, max_tokens=max_tokens, seed=seed)

    while report.total < cfg.num:
        while (in_flight < min(cfg.concurrency, cfg.num - report.total) and report.attempts < max_attempts):
            report.attempts += 1
            messages = instruction_prompt(seeds, generated, cfg, rng)
            pool.submit(("instruction", None), ask(messages, 256, rng.getrandbits(31)))
            in_flight += 1
            report.requests += 1
        if in_flight == 0:
            raise SelfInstructStopped(f"gave up after {report.attempts} attempts, the filters dropped "
                                      f"{_drops(report)} (loosen them or add seeds)", report)
        (kind, instruction), reply, error = pool.results.get()
        in_flight -= 1
        if isinstance(error, EndpointRejected):
            raise SelfInstructStopped(str(error), report) from None
        if isinstance(error, RequestFailed):
            report.failed += 1
            report.last_failure = str(error)
            failures_in_row += 1
            if failures_in_row >= cfg.max_failures:
                raise SelfInstructStopped(f"endpoint failing: {failures_in_row} requests in a row failed even "
                                          f"after {client.max_retries} retries (last: {error})", report)
            continue
        if error is not None:
            raise error
        failures_in_row = 0
        if kind == "instruction":
            instruction = clean_instruction(reply)
            reason = (text_reason(instruction, cfg.min_instruction_chars, cfg.max_instruction_chars, cfg.min_cjk,
                                  "instruction_length") or index.duplicate(instruction))
            if reason:
                report.dropped[reason] += 1
                continue
            messages = [{"role": "system", "content": ANSWER_SYSTEM}, {"role": "user", "content": instruction}]
            pool.submit(("answer", instruction), ask(messages, cfg.max_tokens, rng.getrandbits(31)))
            in_flight += 1
            report.requests += 1
            continue
        answer = reply.strip()
        reason = (text_reason(answer, cfg.min_answer_chars, cfg.max_answer_chars, cfg.min_cjk, "answer_length")
                  or index.duplicate(instruction))  # an attempt that finished first may have taken it
        if reason:
            report.dropped[reason] += 1
            continue
        appender.append({"messages": [{"role": "user", "content": instruction},
                                      {"role": "assistant", "content": answer}]})
        index.add(instruction)
        generated.append(instruction)
        report.written += 1
        bar.update(1)


def _state(report: SelfInstructReport) -> str:
    return (f"{report.out} has {report.total} of {report.num} records ({report.written} written now, "
            f"{report.failed} requests failed); re-run the same command to continue")


def _drops(report: SelfInstructReport) -> str:
    return ", ".join(f"{r} {n}" for r, n in report.dropped.most_common()) or "nothing"
