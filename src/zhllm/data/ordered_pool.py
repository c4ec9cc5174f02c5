"""Map a function over work units in worker processes, yielding results in input order.

Pre-tokenisation jobs (`zhllm data tokenize`, `zhllm data tokenize-sft`) write their output in input order so
the bytes on disk do not depend on the number of workers; this is the one place that fans the units out.
"""
from __future__ import annotations

import multiprocessing
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from ..errors import ZhllmError


def imap_ordered(fn: Callable[[Any], Any], items: Iterable[tuple[Any, Any]], workers: int,
                 initializer: Callable[..., None], initargs: tuple = (), died: str = "a worker process died",
                 ) -> Iterator[tuple[Any, Any]]:
    """(key, fn(item)) for every (key, item), in input order, at most 2*workers items in flight.

    workers == 1 runs in this process (after `initializer(*initargs)`), so the single-worker path is the
    plain loop. An error raised while *producing* items (a strict reader hitting a bad record) is re-raised
    only after the items before it were yielded, so errors surface in input order as in the serial loop.
    A worker that vanishes (OOM kill) becomes a ZhllmError with the message `died`.
    """
    if workers == 1:
        initializer(*initargs)
        for key, item in items:
            yield key, fn(item)
        return
    # fork: workers start instantly (spawn would re-import torch via the zhllm package in each of them)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin" else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                               initializer=initializer, initargs=initargs)
    pending: deque = deque()
    source = iter(items)
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
            pending.append((key, pool.submit(fn, item)))
            if len(pending) >= 2 * workers:
                done_key, fut = pending.popleft()
                yield done_key, fut.result()
        while pending:
            done_key, fut = pending.popleft()
            yield done_key, fut.result()
    except BrokenProcessPool:
        raise ZhllmError(died) from None
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
