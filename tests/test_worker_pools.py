"""Worker processes never outlive the command that started them (SIGKILL, SIGTERM) and die with it."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CORPUS

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of a live process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1])


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st and st[1] == pid and st[0] != "Z":
                out.append(int(entry.name))
    return out


def _alive(pids: list[int]) -> list[int]:
    # a zombie has exited; only its parent (here PID 1 or a subreaper) has not collected it yet
    return [p for p in pids if (st := _stat(p)) is not None and st[0] != "Z"]


def _start_and_wait_for_workers(args: list[str], n: int) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen([sys.executable, "-m", "zhllm", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        kids = _children(proc.pid)
        if len(kids) >= n:
            return proc, kids
        if proc.poll() is not None:
            pytest.fail(f"finished before its workers were seen: {proc.stderr.read().decode()[-500:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no worker processes appeared")


def _assert_gone(pids: list[int], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _alive(pids)
    for p in left:  # do not leave them behind for the next test
        os.kill(p, signal.SIGKILL)
    assert not left, f"workers {left} survived their parent"


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> Path:
    """Enough text that tokenising it with 2 workers is still running when we kill the command."""
    path = tmp_path_factory.mktemp("pool") / "big.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(20_000):
            fh.write(json.dumps({"text": CORPUS[i % len(CORPUS)] * 8 + str(i)}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def big_chat(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pool") / "chat.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(20_000):
            rec = {"instruction": CORPUS[i % len(CORPUS)], "output": CORPUS[(i + 1) % len(CORPUS)] * 3}
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def _tokenize_args(big_corpus, tokenizer_dir, out):
    return ["data", "tokenize", "--tokenizer", str(tokenizer_dir), "--input", str(big_corpus), "--out", str(out),
            "--workers", "2"]


def _sft_args(big_chat, tokenizer_dir, out):
    return ["data", "tokenize-sft", "--tokenizer", str(tokenizer_dir), "--input", str(big_chat), "--out", str(out),
            "--max-len", "128", "--workers", "2", "--no-progress"]


@pytest.mark.parametrize("command", ["tokenize", "tokenize-sft"])
def test_sigkill_of_the_parent_takes_the_workers_along(tmp_path, tokenizer_dir, big_corpus, big_chat, command):
    args = (_tokenize_args(big_corpus, tokenizer_dir, tmp_path / "out") if command == "tokenize"
            else _sft_args(big_chat, tokenizer_dir, tmp_path / "out"))
    proc, workers = _start_and_wait_for_workers(args, 2)
    proc.kill()
    proc.wait()
    _assert_gone(workers)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_stops_the_workers_and_the_command(tmp_path, tokenizer_dir, big_chat, sig):
    proc, workers = _start_and_wait_for_workers(_sft_args(big_chat, tokenizer_dir, tmp_path / "out"), 2)
    proc.send_signal(sig)
    assert proc.wait(timeout=20) != 0
    _assert_gone(workers)
    assert "Traceback" not in proc.stderr.read().decode()
    assert not (tmp_path / "out").exists()  # the staged output was removed, not left half-written


def test_a_worker_obeys_sigterm(tmp_path, tokenizer_dir, big_corpus):
    proc, workers = _start_and_wait_for_workers(_tokenize_args(big_corpus, tokenizer_dir, tmp_path / "out"), 2)
    try:
        os.kill(workers[0], signal.SIGTERM)
        _assert_gone(workers[:1])
        assert proc.wait(timeout=30) == 2  # the parent reports the lost worker as one clean error
        assert "worker process died" in proc.stderr.read().decode()
    finally:
        proc.kill()
    _assert_gone(workers)


def test_ctrl_c_while_the_pool_starts_its_manager_thread_stays_a_keyboard_interrupt(monkeypatch):
    """Ctrl-C landing inside submit() while it starts the executor's manager thread left a thread not yet
    started; shutdown(wait=True) raised "cannot join thread before it is started" over the KeyboardInterrupt,
    so `zhllm data tokenize-sft` printed a traceback (seen under load in test_sigterm_or_ctrl_c_...)."""
    import threading

    from zhllm.data import ordered_pool

    class InterruptedWhileStarting(ordered_pool.ProcessPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            self._executor_manager_thread = threading.Thread(target=lambda: None)  # created, never started
            raise KeyboardInterrupt

    monkeypatch.setattr(ordered_pool, "ProcessPoolExecutor", InterruptedWhileStarting)
    with pytest.raises(KeyboardInterrupt):
        list(ordered_pool.imap_ordered(abs, [(0, -1), (1, -2)], workers=2, initializer=lambda: None))


def _slow_square(x: int) -> int:
    time.sleep(0.01)
    return x * x


def _no_setup() -> None:
    pass


@pytest.fixture
def python_ctrl_c_handler():
    """Python's own SIGINT handler, as in a fresh `zhllm` process: an earlier test in this process may have left
    another one, and the pool keeps a handler it did not install."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_while_the_pool_runs_stops_it_as_a_keyboard_interrupt_and_restores_the_handler(
        python_ctrl_c_handler):
    """The pool's SIGINT handler only flags and kills the workers (an exception raised inside a handler can be
    swallowed by an at-fork hook); the loop then raises the KeyboardInterrupt the caller expects."""
    from zhllm.data.ordered_pool import imap_ordered
    results = imap_ordered(_slow_square, ((i, i) for i in range(10_000)), workers=2, initializer=_no_setup)
    assert next(results) == (0, 0)
    assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler  # the pool's, while it runs
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        list(results)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
