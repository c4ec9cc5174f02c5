"""Helpers for the serving tests: a lively tiny checkpoint and an in-process server on 127.0.0.1."""
from __future__ import annotations

import threading
import time

import pytest

from zhllm.model.config import model_config_from
from zhllm.model.io import new_model, save_model
from zhllm.tokenizer.load import load_tokenizer


def lively_model(tmp_path_factory, tokenizer_dir):
    """A tiny model with large random weights, so greedy answers vary from token to token."""
    vocab = len(load_tokenizer(tokenizer_dir))
    cfg = model_config_from("tiny", {"vocab_size": vocab, "init_std": 0.3})
    return save_model(new_model(cfg, seed=1), tmp_path_factory.mktemp("serve") / "m", tokenizer=tokenizer_dir)


class ThreadServer:
    """uvicorn serving `app` from a thread, on a free port of 127.0.0.1 (never another address)."""

    def __init__(self, app):
        uvicorn = pytest.importorskip("uvicorn")
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
