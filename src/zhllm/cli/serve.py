"""`zhllm serve`: the parser only; the work is in zhllm.serve.server (see cli/__init__.py)."""


def _serve(a) -> int:
    from ..serve.server import serve  # deferred: `zhllm --help` should not import torch or FastAPI
    return serve(a.dir, host=a.host, port=a.port, api_key=a.api_key, max_batch=a.max_batch, max_queue=a.max_queue,
                 max_tokens=a.max_tokens, max_body_bytes=a.max_body_bytes, device=a.device, dtype=a.dtype,
                 quantize=a.quantize, model_name=a.model_name)


def register(root, groups) -> None:
    p = root.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API with a chat page",
                        description="Serve a checkpoint: /v1/chat/completions, /v1/completions, /v1/models "
                                    "(OpenAI-compatible, streaming), /health, /metrics (Prometheus) and a chat page "
                                    "at /. Requests are decoded together (continuous batching). Needs the extra "
                                    "`serve`: pip install 'zhllm[serve]'.")
    p.add_argument("dir", help="checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $ZHLLM_API_KEY, else none)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a batch slot before new ones get 429 (default 64)")
    p.add_argument("--max-tokens", type=int, default=512, help="upper limit on tokens per answer (default 512)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413 (default 1 MiB)")
    p.add_argument("--model-name", default=None, help="the model id clients see (default: the directory's name)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto",
                   help="auto (bf16 on CUDA and on CPUs with native bf16, else fp32), float32, bfloat16, float16")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: weight-only int8 matrices in the decode step (CPU; default none)")
    p.set_defaults(func=_serve)
