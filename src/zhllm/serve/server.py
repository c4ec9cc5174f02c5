"""`zhllm serve`: load a checkpoint and run the app under uvicorn until SIGTERM or Ctrl-C.

On SIGTERM uvicorn stops accepting connections and lets the requests in flight finish (each is bounded by
--max-tokens) for up to `graceful_s` seconds; then the app's lifespan stops the scheduler, which cancels
whatever is left, and the process exits 0.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

from ..errors import ZhllmError

API_KEY_ENV = "ZHLLM_API_KEY"


def import_serving():
    """FastAPI and uvicorn, or one clear line on how to get them (they are the optional extra `serve`)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ZhllmError(f"zhllm serve needs FastAPI and uvicorn ({e.name} is missing): "
                         "pip install 'zhllm[serve]'") from None
    return uvicorn


def serve(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 16, max_queue: int = 64, max_tokens: int = 512, max_body_bytes: int = 1 << 20,
          device: str = "auto", dtype: str = "auto", quantize: str = "none", model_name: str | None = None,
          graceful_s: float = 30.0) -> int:
    uvicorn = import_serving()
    from ..infer.engine import Engine
    from .app import create_app

    if not 1 <= port <= 65535:
        raise ZhllmError(f"--port must be in 1..65535, got {port}")
    for flag, value in [("--max-tokens", max_tokens), ("--max-batch", max_batch), ("--max-queue", max_queue),
                        ("--max-body-bytes", max_body_bytes)]:
        if value < 1:
            raise ZhllmError(f"{flag} must be >= 1, got {value}")
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    engine = Engine.load(model_dir, device=device, dtype=dtype, quantize=quantize)
    name = model_name or Path(model_dir).resolve().name
    app = create_app(engine, model_name=name, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                     max_tokens=max_tokens, max_body_bytes=max_body_bytes)
    logging.basicConfig(level=logging.INFO, format="zhllm serve: %(message)s")
    auth = "API key required" if api_key else "no API key"
    logging.getLogger("zhllm.serve").info("model %s on http://%s:%d (%s, batch %d, queue %d)", name, host, port,
                                          auth, max_batch, max_queue)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=graceful_s,
                            server_header=False)
    server = uvicorn.Server(config)
    if threading.current_thread() is threading.main_thread():
        # uvicorn handles SIGTERM (graceful shutdown), then re-raises it to the handler that was there before:
        # the default one would kill the process with -15 after a clean shutdown; this one lets us return 0.
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    except SystemExit:  # uvicorn exits on a failed bind (the port is taken)
        pass
    if not server.started:
        raise ZhllmError(f"could not serve on {host}:{port} (is the port in use?)")
    return 0
