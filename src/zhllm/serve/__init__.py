"""`zhllm serve`: an OpenAI-compatible HTTP server with continuous batching and a web chat page.

scheduler.py runs the model in one background thread (continuous batching over a slot KV cache); app.py is the
FastAPI side (routes, limits, errors, streaming); metrics.py the Prometheus counters; static/ the chat page.
FastAPI and uvicorn are the optional extra `serve`, imported only here.
"""
