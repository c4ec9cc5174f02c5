"""`zhllm dpo make-rejected`: sample the SFT model's own answers to the training prompts as "rejected" replies.

For every record with a prompt and a chosen answer (preference records, or SFT records whose last assistant
turn is the chosen answer) the model samples `num` answers (Engine.generate_batch: batched, KV cache); each
answer that differs from the chosen one and from the record's earlier samples becomes one preference record
`{"system"?, "history"?, "prompt", "chosen", "rejected"}` (system/history when the source has them).

Resumable and atomic: finished batches are appended to a hidden `.OUT.partial` next to the output, and a
small state file records how many source records and bytes are done (after the bytes are synced). A killed
run re-run with the same command cuts the partial file back to the last finished batch and continues; the
result is renamed to OUT only when complete. Each batch samples from its own generator seeded with (seed,
index of its first record), and batches always start at multiples of batch_size, so a resumed run produces
the same bytes as an uninterrupted one. (The engine draws one generator per call, and padding a prompt
beside different neighbours can change float rounding, so a different --batch-size may sample differently.)
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..corpus.read_stats import ReadStats
from ..data.chat import BadRecord, Message, check_conversation, normalize_record
from ..data.preference import parse_record
from ..errors import ZhllmError
from ..fsutil import atomic_write_text

STATE_VERSION = 1


@dataclass
class Source:
    prompt: list[Message]
    chosen: str
    keys: frozenset[str]  # the source record's fields, to keep system/history when it had them


@dataclass
class MakeRejectedStats:
    records: int = 0
    prompts: int = 0
    written: int = 0
    equal_to_chosen: int = 0
    repeated: int = 0
    prompt_too_long: int = 0
    bad: ReadStats = field(default_factory=ReadStats)

    def summary(self) -> str:
        lines = [f"records {self.records}, prompts {self.prompts}, preference records written {self.written}",
                 f"samples skipped: equal to chosen {self.equal_to_chosen}, repeated {self.repeated}"]
        if self.prompt_too_long:
            lines.append(f"prompts longer than the model's context skipped: {self.prompt_too_long}")
        if self.bad.bad:
            lines.append(self.bad.summary().replace(f"read {self.bad.docs} documents, ", ""))
        return "\n".join(lines)


def source_of(data: Any) -> Source:
    """Prompt turns and chosen answer of a preference record (has `chosen`) or an SFT record."""
    if isinstance(data, dict) and "chosen" in data:
        # only the prompt and the chosen reply matter here: a stand-in rejected reply lets the preference
        # parser check the record whatever its own rejected reply is (missing, or equal to chosen)
        chosen = data["chosen"]
        stand_in = chosen[:-1] + [{"role": "assistant", "content": "\x00"}] if isinstance(chosen, list) else "\x00"
        rec = parse_record({**data, "rejected": stand_in})
        return Source(rec.prompt, rec.chosen, frozenset(data))
    msgs = check_conversation(normalize_record(data))
    return Source(msgs[:-1], msgs[-1]["content"], frozenset(data))


def preference_record(src: Source, rejected: str) -> dict:
    """The dpo_zh.jsonl layout: the last user turn is `prompt`, earlier turns `history`, then the two replies."""
    system = src.prompt[0]["content"] if src.prompt and src.prompt[0]["role"] == "system" else ""
    turns = src.prompt[1:] if system else src.prompt
    history = [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns) - 1, 2)]
    out: dict[str, Any] = {}
    if system or "system" in src.keys:
        out["system"] = system
    if history or "history" in src.keys:
        out["history"] = history
    out.update(prompt=turns[-1]["content"], chosen=src.chosen, rejected=rejected)
    return out


def batch_seed(seed: int, first_record: int) -> int:
    return int(np.random.SeedSequence([seed, first_record]).generate_state(1, dtype=np.uint64)[0] >> 1)


def read_sources(inputs, strict: bool, stats: MakeRejectedStats) -> list[Source]:
    from ..corpus.readers import expand_inputs, iter_records

    out = []
    for rec in iter_records(expand_inputs(inputs), strict=strict, stats=stats.bad):
        stats.records += 1
        try:
            out.append(source_of(rec.data))
        except BadRecord as e:
            stats.bad.add_bad(rec.where, str(e), strict=strict)
    return out


def _paths(out: Path) -> tuple[Path, Path]:
    return out.parent / f".{out.name}.partial", out.parent / f".{out.name}.partial.json"


def _fingerprint(model: str, inputs: list[Path], options: dict) -> str:
    files = [(str(p.resolve()), p.stat().st_size) for p in inputs]
    return hashlib.sha256(json.dumps([model, files, options], sort_keys=True).encode()).hexdigest()[:16]


def make_rejected(model, inputs: Iterable[str | Path] | str | Path, out: str | Path, *, num: int = 1,
                  temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256, seed: int = 0,
                  batch_size: int = 8, strict: bool = False, overwrite: bool = False,
                  progress: bool = True) -> MakeRejectedStats:
    """Write OUT (jsonl) with one preference record per kept sample; `model` is a checkpoint dir or an Engine."""
    from tqdm import tqdm

    from ..corpus.readers import expand_inputs
    from ..infer.engine import Engine
    from ..infer.prompts import encode_prompt

    if num < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ZhllmError("--num, --batch-size and --max-new-tokens must be >= 1")
    out = Path(out).expanduser()
    files = expand_inputs(inputs)
    if any(out.resolve() == f.resolve() for f in files):
        raise ZhllmError(f"--out {out} is an input of this command; choose another file")
    if out.is_dir():
        raise ZhllmError(f"--out {out} is a directory; give a .jsonl file name")
    partial, state_path = _paths(out)
    options = {"num": num, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
               "seed": seed, "batch_size": batch_size, "version": STATE_VERSION}
    fingerprint = _fingerprint(str(model if not isinstance(model, Engine) else "engine"), files, options)
    state = _read_state(state_path)
    if state is not None and state.get("fingerprint") != fingerprint:
        if not overwrite:
            raise ZhllmError(f"{partial} is a partial output of a make-rejected run with other inputs or options; "
                             "re-run that command to finish it, or pass --overwrite to start over")
        state = None
    if state is None and out.exists() and not overwrite:
        raise ZhllmError(f"--out {out} exists; pass --overwrite to replace it")

    stats = MakeRejectedStats()
    sources = read_sources(files, strict, stats)
    if not sources:
        raise ZhllmError(f"no record with a prompt and a chosen answer in the input ({stats.bad.why_empty()})")
    engine = model if isinstance(model, Engine) else Engine.load(model)
    done = state["records"] if state else 0
    if state:
        for k in ("prompts", "written", "equal_to_chosen", "repeated", "prompt_too_long"):
            setattr(stats, k, state["stats"][k])
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "r+b" if state else "wb") as fh:
        fh.truncate(state["bytes"] if state else 0)  # drop whatever a killed run wrote after its last state
        fh.seek(0, os.SEEK_END)
        bar = tqdm(total=len(sources), initial=done, desc="make-rejected", unit="prompt", disable=not progress)
        for start in range(done, len(sources), batch_size):
            chunk = sources[start:start + batch_size]
            fitting = []
            for src in chunk:
                if len(encode_prompt(engine.tokenizer, src.prompt)) >= engine.max_seq_len:
                    stats.prompt_too_long += 1
                else:
                    fitting.append(src)
            lines = _sample_lines(engine, fitting, stats, num, temperature, top_p, max_new_tokens,
                                  batch_seed(seed, start)) if fitting else []
            fh.write("".join(lines).encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
            _write_state(state_path, fingerprint, start + len(chunk), fh.tell(), stats)
            bar.update(len(chunk))
        bar.close()
    os.replace(partial, out)
    state_path.unlink(missing_ok=True)
    return stats


def _sample_lines(engine, sources: list[Source], stats: MakeRejectedStats, num: int, temperature: float,
                  top_p: float, max_new_tokens: int, seed: int) -> list[str]:
    gen = engine.generate_batch([s.prompt for s in sources], n=num, temperature=temperature, top_p=top_p,
                                max_new_tokens=max_new_tokens, seed=seed)
    lines = []
    for i, src in enumerate(sources):
        stats.prompts += 1
        seen: set[str] = set()
        for c in gen.completions[i * num:(i + 1) * num]:
            answer = c.text.strip()
            if answer == src.chosen.strip():
                stats.equal_to_chosen += 1
            elif answer in seen:
                stats.repeated += 1
            else:
                seen.add(answer)
                stats.written += 1
                lines.append(json.dumps(preference_record(src, c.text), ensure_ascii=False) + "\n")
    return lines


def _read_state(path: Path) -> dict | None:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    partial = path.parent / path.name.removesuffix(".json")
    if not partial.exists() or partial.stat().st_size < state.get("bytes", 0):
        return None  # the state must describe bytes that are really there
    return state


def _write_state(path: Path, fingerprint: str, records: int, nbytes: int, stats: MakeRejectedStats) -> None:
    counts = {k: v for k, v in asdict(stats).items() if k not in ("bad", "records")}
    atomic_write_text(path, json.dumps({"fingerprint": fingerprint, "records": records, "bytes": nbytes,
                                        "stats": counts}) + "\n")
