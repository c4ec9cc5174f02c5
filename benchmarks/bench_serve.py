"""Serving throughput: `zhllm serve` under 1, 4, 16 and 64 concurrent streaming clients on loopback, against
the same kind of requests served one at a time.

A random-init checkpoint of `--preset` (26m by default) with a BPE tokenizer trained on the demo prose is
saved once; `zhllm serve` runs it in a subprocess on 127.0.0.1. Every request is a /v1/completions stream of
a 20-40 character Chinese prompt, sampled (temperature 0.8, seeded, so a random model rarely meets its eos)
for `--new-tokens` tokens. With C clients each client sends `--per-client` requests back to back (bounded:
C * per_client requests). Reported per level: output tokens/s (all tokens / wall time), p50/p95 time to the
first streamed token and p50/p95 request latency, and the speed-up over one-at-a-time serving (the same
requests sent sequentially, `--baseline-requests` of them).

Then `n` choices of one long prompt (`--choices`, a single request with `n`, whose prompt is prefilled once)
against as many concurrent requests for different prompts of the same length (each prefilled on its own).

    python benchmarks/bench_serve.py                    # 26m preset, 64 new tokens
    python benchmarks/bench_serve.py --preset tiny --quick
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from zhllm.model.config import model_config_from
from zhllm.model.io import new_model, save_model
from zhllm.tokenizer.load import load_tokenizer
from zhllm.tokenizer.train import train_tokenizer_from_texts

DEMO = Path(__file__).resolve().parents[1] / "src" / "zhllm" / "demo" / "data"
TARGET_SPEEDUP_AT_16 = 4.0
CHOICE_NEW_TOKENS = 8  # short answers, so the n-choices case measures prefill


def demo_texts(limit: int = 3000) -> list[str]:
    texts = []
    for f in sorted(DEMO.glob("prose_*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.append(json.loads(line)["text"])
    return texts[:limit]


def make_checkpoint(root: Path, preset: str, texts: list[str]) -> Path:
    tok = train_tokenizer_from_texts(texts, vocab_size=6400, out_dir=root / "tokenizer")
    cfg = model_config_from(preset, {"vocab_size": len(load_tokenizer(tok))})
    return save_model(new_model(cfg, seed=0), root / "model", tokenizer=tok)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "import sys; from zhllm.cli import main; sys.exit(main())", "serve", str(model),
           "--port", str(port), "--max-batch", str(args.max_batch), "--max-queue", "512",
           "--max-tokens", str(args.new_tokens), "--dtype", args.dtype, "--quantize", args.quantize]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server did not start:\n{proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


async def one_request(client: httpx.AsyncClient, prompt: str, seed: int, n: int) -> tuple[float, float, int]:
    """(time to first token, latency, completion tokens) of one streamed completion."""
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0.8, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    return (ttft if ttft is not None else latency), latency, tokens


async def run_level(url: str, prompts: list[str], clients: int, per_client: int, n: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker(c: int):
            out = []
            for k in range(per_client):
                i = c * per_client + k
                out.append(await one_request(client, prompts[i % len(prompts)], i, n))
            return out
        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    ttfts, lats, tokens = zip(*results)
    return {"clients": clients, "requests": len(results), "tokens": sum(tokens), "tok_s": sum(tokens) / wall,
            "ttft50": pct(ttfts, 50), "ttft95": pct(ttfts, 95), "lat50": pct(lats, 50), "lat95": pct(lats, 95)}


def choice_prompts(texts: list[str], n: int, chars: int, model: Path) -> list[str]:
    """n different prompts of `chars` characters, shortened where the model's context needs room."""
    tok = load_tokenizer(model)
    room = json.loads((model / "config.json").read_text())["max_position_embeddings"] - CHOICE_NEW_TOKENS - 8
    prompts = []
    for i in range(n):
        text = "".join(texts[i::n])[:chars]
        while len(tok.encode(text)) > room:
            text = text[:int(len(text) * 0.9)]
        prompts.append(text)
    return prompts


async def run_choices(url: str, prompts: list[str], new_tokens: int) -> dict:
    """Wall time of one request for len(prompts) choices of prompts[0], and of len(prompts) concurrent
    requests, one per prompt."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def post(prompt: str, n: int) -> None:
            body = {"prompt": prompt, "max_tokens": new_tokens, "n": n, "temperature": 0.8, "seed": 1}
            (await client.post("/v1/completions", json=body)).raise_for_status()
        start = time.perf_counter()
        await post(prompts[0], len(prompts))
        shared = time.perf_counter() - start
        start = time.perf_counter()
        await asyncio.gather(*(post(p, 1) for p in prompts))
        separate = time.perf_counter() - start
    return {"shared": shared, "separate": separate}


def pct(values, q: int) -> float:
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="26m")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--per-client", type=int, default=2, help="requests each client sends back to back")
    ap.add_argument("--baseline-requests", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantize", default="none", choices=["none", "int8"])
    ap.add_argument("--quick", action="store_true", help="levels 1,4,16; 1 request per client; 4 baseline requests")
    ap.add_argument("--choices", type=int, default=8, help="n of the one-prompt, n-choices request (0: skip)")
    ap.add_argument("--choice-chars", type=int, default=800, help="characters of that prompt")
    args = ap.parse_args()
    if args.quick:
        args.levels, args.per_client, args.baseline_requests = "1,4,16", 1, 4
    levels = [int(x) for x in args.levels.split(",")]
    texts = demo_texts()
    prompts = [t[:20 + (i * 7) % 21] for i, t in enumerate(texts[::37])]
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        model = make_checkpoint(Path(tmp), args.preset, texts)
        port = free_port()
        proc = start_server(model, port, args)
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(run_level(url, prompts, 2, 1, 8))  # warm-up: fused weights, allocator, connections
            base = asyncio.run(run_level(url, prompts, 1, args.baseline_requests, args.new_tokens))
            rows = [asyncio.run(run_level(url, prompts, c, args.per_client, args.new_tokens)) for c in levels]
            long_prompts = choice_prompts(texts, args.choices, args.choice_chars, model)
            choices = asyncio.run(run_choices(url, long_prompts, CHOICE_NEW_TOKENS)) if args.choices > 1 else None
        finally:
            proc.terminate()
            proc.wait(60)
    print(f"zhllm serve, preset {args.preset} (random init), {args.new_tokens} new tokens per request, "
          f"dtype {args.dtype}, quantize {args.quantize}, max batch {args.max_batch}, {os.cpu_count()} CPUs")
    print(f"one at a time: {base['tok_s']:.1f} tok/s over {base['requests']} requests "
          f"(TTFT p50 {base['ttft50'] * 1000:.0f} ms, latency p50 {base['lat50']:.2f} s)\n")
    print("| clients | requests | output tok/s | vs one at a time | TTFT p50 | TTFT p95 | latency p50 | latency p95 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['tok_s']:.1f} | {r['tok_s'] / base['tok_s']:.1f}x | "
              f"{r['ttft50'] * 1000:.0f} ms | {r['ttft95'] * 1000:.0f} ms | {r['lat50']:.2f} s | {r['lat95']:.2f} s |")
    if choices is not None:
        print(f"\n{args.choices} choices of one {len(long_prompts[0])}-character prompt ({CHOICE_NEW_TOKENS} new "
              f"tokens each): one request with n={args.choices} {choices['shared']:.2f} s, {args.choices} concurrent "
              f"requests for different prompts of that length {choices['separate']:.2f} s "
              f"({choices['separate'] / choices['shared']:.1f}x)")
    at16 = [r for r in rows if r["clients"] == 16]
    if at16:
        ratio = at16[0]["tok_s"] / base["tok_s"]
        verdict = "met" if ratio >= TARGET_SPEEDUP_AT_16 else "NOT met"
        print(f"\ntarget at 16 clients: >= {TARGET_SPEEDUP_AT_16:.0f}x one-at-a-time tokens/s: {ratio:.1f}x, {verdict}")
        # the row benchmarks/run_all.py gathers into its summary
        print("\n| figure | zhllm serve, 16 clients tok/s | one at a time tok/s | ratio | target |\n"
              "|---|---:|---:|---:|---|")
        print(f"| serve {args.preset} | {at16[0]['tok_s']:.1f} | {base['tok_s']:.1f} | {ratio:.1f}x | "
              f">= {TARGET_SPEEDUP_AT_16:.0f}x |")


if __name__ == "__main__":
    main()
