"""Map a function over work units in worker processes, yielding results in input order.

Pre-tokenisation jobs (`zhllm data tokenize`, `zhllm data tokenize-sft`) write their output in input order so
the bytes on disk do not depend on the number of workers; this is the one place that fans the units out.

Workers never outlive their parent: a SIGKILLed parent leaves forked workers blocked forever on a queue whose
write end they hold themselves (100-200 MB each, reparented to PID 1). `guarded_initializer` makes them die
with the parent, and `imap_ordered` terminates them when the parent is interrupted or told to stop.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any

from ..errors import ZhllmError

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_WATCHDOG_SECONDS = 1.0


def guarded_initializer(initializer: Callable[..., None], initargs: tuple = ()) -> tuple[Callable[..., None], tuple]:
    """(initializer, initargs) for a process pool whose workers die with this process, then run `initializer`.

    Use as `Pool(n, *guarded_initializer(init, args))` or `ProcessPoolExecutor(initializer=..., initargs=...)`.
    The parent's pid is taken now, in the parent, so a worker can tell whether it was orphaned before it
    could arm the death signal.
    """
    return _init_guarded, (os.getpid(), initializer, tuple(initargs))


def _init_guarded(parent: int, initializer: Callable[..., None], initargs: tuple) -> None:
    # A forked worker inherits the parent's handlers; a Python-level SIGTERM handler in a child stuck in a
    # blocking queue read would never run, so the default action (die) must be back in place.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Ctrl-C reaches the whole process group; the parent decides and terminates us (no traceback per worker).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent)
    initializer(*initargs)


def die_with_parent(parent: int) -> None:
    """Make this process die when process `parent` does: PR_SET_PDEATHSIG on Linux, else a watchdog thread.

    PR_SET_PDEATHSIG fires when the *thread* that forked us exits; pools here are started from the thread
    that consumes them, which outlives them.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
        if armed:
            if os.getppid() != parent:  # the parent died before the signal was armed
                os._exit(1)
            return
    threading.Thread(target=_watch_parent, args=(parent,), name="zhllm-parent-watchdog", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        threading.Event().wait(_WATCHDOG_SECONDS)
    os._exit(1)


def imap_ordered(fn: Callable[[Any], Any], items: Iterable[tuple[Any, Any]], workers: int,
                 initializer: Callable[..., None], initargs: tuple = (), died: str = "a worker process died",
                 ) -> Iterator[tuple[Any, Any]]:
    """(key, fn(item)) for every (key, item), in input order, at most 2*workers items in flight.

    workers == 1 runs in this process (after `initializer(*initargs)`), so the single-worker path is the
    plain loop. An error raised while *producing* items (a strict reader hitting a bad record) is re-raised
    only after the items before it were yielded, so errors surface in input order as in the serial loop.
    A worker that vanishes (OOM kill) becomes a ZhllmError with the message `died`. The workers die with
    this process; an error, Ctrl-C or SIGTERM here terminates them at once instead of letting their units
    finish.
    """
    if workers == 1:
        initializer(*initargs)
        for key, item in items:
            yield key, fn(item)
        return
    # fork: workers start instantly (spawn would re-import torch via the zhllm package in each of them)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin" else "spawn"
    init, args = guarded_initializer(initializer, initargs)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=init,
                               initargs=args)
    pending: deque = deque()
    source = iter(items)
    finished = False
    with _signals_stop(pool) as stopped:
        try:
            while True:
                try:
                    key, item = next(source)
                except StopIteration:
                    break
                except BaseException:
                    while pending:  # the results before the bad item come first
                        done_key, fut = pending.popleft()
                        yield done_key, fut.result()
                    raise
                if stopped:
                    raise _stop(stopped[0])
                pending.append((key, pool.submit(fn, item)))
                if len(pending) >= 2 * workers:
                    done_key, fut = pending.popleft()
                    yield done_key, fut.result()
            while pending:
                done_key, fut = pending.popleft()
                yield done_key, fut.result()
            finished = True
        except BrokenProcessPool:
            raise (_stop(stopped[0]) if stopped else ZhllmError(died)) from None
        finally:
            for _, fut in pending:
                fut.cancel()
            if not finished:
                terminate_workers(pool)
            _shut_down(pool)


def _shut_down(pool: ProcessPoolExecutor) -> None:
    """shutdown(wait=True), unless the pool's manager thread never said it started: a Ctrl-C inside submit()
    can land while submit starts that thread, and join() then raises RuntimeError over the KeyboardInterrupt
    (a traceback instead of a clean stop). Its workers are killed by then, so there is nothing to wait for."""
    try:
        pool.shutdown(wait=True, cancel_futures=True)
    except RuntimeError:
        pool.shutdown(wait=False, cancel_futures=True)


def terminate_workers(pool: ProcessPoolExecutor) -> None:
    """SIGKILL every worker of `pool` now (their running units are abandoned); shutdown() then reaps them.

    Not SIGTERM: a worker forked an instant earlier still has this process's Python SIGTERM handler until its
    initializer resets it, so it survived SIGTERM, then blocked forever on the task queue's lock, which a killed
    sibling held, and shutdown() waited for it forever (seen as a hung `--strict` test)."""
    # no public API before Python 3.14; kill() on a process that already exited is a no-op
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.kill()


class Terminated(SystemExit):
    """SIGTERM received while workers ran: unwinds like an exit, so pools are stopped and temp files removed."""


def _stop(signum: int) -> BaseException:
    """What a stop signal becomes once the loop sees it: Ctrl-C the usual KeyboardInterrupt, SIGTERM an exit."""
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(128 + signum)


# a signal whose handler is still Python's default is ours to take over while the pool runs
_DEFAULT_HANDLERS = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}


@contextmanager
def _signals_stop(pool: ProcessPoolExecutor) -> Iterator[list[int]]:
    """While the pool runs, SIGTERM or Ctrl-C kills its workers and the loop then raises `_stop(signal)`, so the
    caller's cleanup (staged output directories) runs; SIGTERM's default would kill this process without it.

    The handler only flags and kills: an exception raised inside a signal handler can land in code that
    swallows it (at-fork hooks print "Exception ignored" and carry on; a swallowed Ctrl-C once let
    `tokenize-sft` go on with killed workers and report "no SFT examples")."""
    stopped: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return
    # someone else's handler (e.g. the trainer's graceful stop) is kept
    ours = [s for s, default in _DEFAULT_HANDLERS.items() if signal.getsignal(s) is default]

    def handler(signum, frame):
        signal.signal(signum, _DEFAULT_HANDLERS[signum])  # a second one stops outright
        stopped.append(signum)
        terminate_workers(pool)

    for s in ours:
        signal.signal(s, handler)
    try:
        yield stopped
    finally:
        for s in ours:
            signal.signal(s, _DEFAULT_HANDLERS[s])
