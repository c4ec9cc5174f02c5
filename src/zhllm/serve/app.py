"""The HTTP side of `zhllm serve`: OpenAI-compatible routes, limits, errors and streaming, on FastAPI.

The event loop never runs the model: it validates and encodes a request, hands it to the `Scheduler` thread
and relays the scheduler's events (forwarded onto the loop with call_soon_threadsafe) as a JSON answer or as
server-sent events. Every error a client sees is an OpenAI-style body `{"error": {"message", "type", "param",
"code"}}`; unexpected exceptions are logged on the server and answered with a generic 500.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ZhllmError
from ..infer.engine import Engine
from ..infer.prompts import encode_prompt
from ..infer.sampling import SamplingParams
from .metrics import Metrics
from .scheduler import Event, QueueFull, Request as GenRequest, Scheduler
from .schemas import ChatCompletionRequest, CompletionRequest, SamplingFields

log = logging.getLogger("zhllm.serve")
STATIC = Path(__file__).with_name("static")
DEFAULT_MAX_BODY = 1 << 20
ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}
DISCONNECT_POLL_S = 1.0
MIN_TEMPERATURE = 1e-4  # below it: greedy


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def error_response(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before the app sees any of it.
    The body is read here (declared length or not) and replayed to the app."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.limit
        chunks, size, more = [], 0, not too_big
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            too_big = size > self.limit
            if too_big:
                break
        if too_big:
            response = error_response(413, f"the request body is over the server's limit of {self.limit} bytes",
                                      code="request_too_large")
            return await response(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # http.disconnect when the client goes away

        return await self.app(scope, replay, send)


class CountRequests:
    """ASGI middleware: count responses by route and status for /metrics (unknown paths share one label)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.request_done(route, status[0])


class Generation:
    """The n choices of one HTTP request: their scheduler requests and the events they send back."""

    def __init__(self, loop: asyncio.AbstractEventLoop, prompts: list[list[int]], n: int, params_for,
                 stop_strings: list[str], body: SamplingFields):
        self.events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.requests = []
        for p, ids in enumerate(prompts):
            for j in range(n):
                index = p * n + j
                self.requests.append(GenRequest(ids, params_for(j), self._sink(loop, index), stop_strings,
                                                body.presence_penalty, body.frequency_penalty))
        self.prompt_tokens = sum(map(len, prompts))

    def _sink(self, loop, index):
        def sink(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, (index, event))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
        return sink

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()


def create_app(engine: Engine, *, model_name: str = "zhllm", api_key: str | None = None, max_batch: int = 16,
               max_queue: int = 64, max_tokens: int = 512, max_body_bytes: int = DEFAULT_MAX_BODY,
               scheduler: Scheduler | None = None):
    """The ASGI app. The scheduler thread starts with the app's lifespan and stops (cancelling what is left)
    when the server shuts down."""
    metrics = scheduler.metrics if scheduler is not None else Metrics()
    scheduler = scheduler or Scheduler(engine, max_batch=max_batch, max_queue=max_queue, metrics=metrics)
    tokenizer = engine.tokenizer
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        if not scheduler.alive:
            scheduler.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, scheduler.stop)

    app = FastAPI(title="zhllm", version="1", lifespan=lifespan,
                  description="OpenAI-compatible chat and text completions for a zhllm checkpoint.")
    app.state.scheduler, app.state.metrics = scheduler, metrics
    bearer = HTTPBearer(auto_error=False)

    async def check_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if api_key is None:
            return
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise ApiError(401, "a valid API key is needed: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    # ---- errors: always an OpenAI-style body, never a traceback ----
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return error_response(e.status, e.message, e.type, e.code, e.param, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid request")
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problems)"
        return error_response(400, message, param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), type_, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, "internal server error", "server_error")

    # ---- routes ----
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            return error_response(503, "the generation thread is not running", "server_error")
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "zhllm", "max_model_len": engine.max_seq_len}]}

    def encode(prompt) -> list[int]:
        try:
            ids = encode_prompt(tokenizer, prompt)
        except ZhllmError as e:
            raise ApiError(400, str(e)) from None
        if len(ids) >= engine.max_seq_len:
            raise ApiError(400, f"the prompt is {len(ids)} tokens but the model's context is {engine.max_seq_len} "
                                "(it must leave room for at least one new token)", code="context_length_exceeded")
        return ids

    def sampling(body: SamplingFields, requested: int | None):
        for s in body.stop_strings():
            check_text(s, "stop")
        if isinstance(body.stop, list) and len(body.stop) > 4:
            raise ApiError(400, "stop: at most 4 stop strings", param="stop")
        limit = min(requested or max_tokens, max_tokens)
        seed = None if body.seed is None else body.seed % (1 << 63)
        # Logits divided by a vanishing temperature overflow to inf; sampling there is the argmax anyway.
        temperature = 0.0 if body.temperature < MIN_TEMPERATURE else body.temperature

        def params_for(choice: int) -> SamplingParams:
            # Each of n choices is its own sample; a seed keeps all n reproducible.
            return SamplingParams(max_new_tokens=limit, temperature=temperature, top_p=body.top_p,
                                  top_k=body.top_k, repetition_penalty=body.repetition_penalty,
                                  seed=None if seed is None else (seed + choice) % (1 << 63))
        return params_for

    async def run(http: Request, gen: Generation, stream_kind: str | None, body: SamplingFields):
        try:
            scheduler.submit(gen.requests)
        except QueueFull as e:
            raise ApiError(429, str(e), "rate_limit_error", code="queue_full") from None
        except ZhllmError as e:
            raise ApiError(400, str(e)) from None
        if stream_kind is None:
            return await collect(http, gen)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(sse(gen, stream_kind, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def collect(http: Request, gen: Generation):
        texts = [""] * len(gen.requests)
        reasons: list[str | None] = [None] * len(gen.requests)
        completion_tokens = 0
        try:
            while any(r is None for r in reasons):
                try:
                    index, event = await asyncio.wait_for(gen.events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return None
                    continue
                if event.kind == "text":
                    texts[index] += event.text
                elif event.kind == "error":
                    raise ApiError(500, "generation failed", "server_error")
                else:
                    reasons[index] = finish_reason(event)
                    completion_tokens += event.completion_tokens
        finally:
            gen.cancel()  # no-op for finished requests; frees the slots of a client that left
        usage = {"prompt_tokens": gen.prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": gen.prompt_tokens + completion_tokens}
        return texts, reasons, usage

    async def sse(gen: Generation, kind: str, include_usage: bool):
        ident, now = new_id(kind), int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(choices, usage=None) -> str:
            payload = {"id": ident, "object": obj, "created": now, "model": model_name, "choices": choices}
            if include_usage:
                payload["usage"] = usage
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        def choice(index: int, text: str | None, reason: str | None, role: bool = False) -> dict:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                return {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
            return {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}

        left, completion_tokens = len(gen.requests), 0
        try:
            if kind == "chat":
                yield chunk([choice(i, None, None, role=True) for i in range(len(gen.requests))])
            while left:
                index, event = await gen.events.get()
                if event.kind == "text":
                    yield chunk([choice(index, event.text, None)])
                elif event.kind == "error":
                    # Headers are gone by now: the error travels as an event, then the stream ends.
                    yield f"data: {json.dumps({'error': {'message': 'generation failed', 'type': 'server_error'}})}\n\n"
                    break
                else:
                    left -= 1
                    completion_tokens += event.completion_tokens
                    yield chunk([choice(index, None, finish_reason(event))])
            if include_usage:
                usage = {"prompt_tokens": gen.prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": gen.prompt_tokens + completion_tokens}
                yield chunk([], usage)
            yield "data: [DONE]\n\n"
        finally:
            gen.cancel()  # the client went away (or the stream ended): free the slots now

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        if body.logprobs:
            raise ApiError(400, "logprobs are not supported by this server", param="logprobs")
        messages = []
        for m in body.messages:
            content = check_text(m.text(), "messages.content")
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        ids = encode(messages)
        params_for = sampling(body, body.max_completion_tokens or body.max_tokens)
        gen = Generation(asyncio.get_running_loop(), [ids], body.n, params_for, body.stop_strings(), body)
        result = await run(http, gen, "chat" if body.stream else None, body)
        if not isinstance(result, tuple):
            return result
        texts, reasons, usage = result
        return {"id": new_id("chat"), "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r,
                             "logprobs": None} for i, (t, r) in enumerate(zip(texts, reasons))],
                "usage": usage}

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, http: Request):
        for name, bad in [("logprobs", body.logprobs is not None), ("echo", body.echo), ("suffix", body.suffix)]:
            if bad:
                raise ApiError(400, f"{name} is not supported by this server", param=name)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt: give at least one prompt", param="prompt")
        if len(prompts) * body.n > 16:
            raise ApiError(400, "at most 16 choices per request (prompts times n)", param="n")
        ids = [encode(check_text(p, "prompt")) for p in prompts]
        gen = Generation(asyncio.get_running_loop(), ids, body.n, sampling(body, body.max_tokens),
                         body.stop_strings(), body)
        result = await run(http, gen, "completion" if body.stream else None, body)
        if not isinstance(result, tuple):
            return result
        texts, reasons, usage = result
        return {"id": new_id("completion"), "object": "text_completion", "created": int(time.time()),
                "model": model_name, "choices": [{"index": i, "text": t, "finish_reason": r, "logprobs": None}
                                                 for i, (t, r) in enumerate(zip(texts, reasons))],
                "usage": usage}

    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics)  # added last = outermost: it also counts 413s
    return app


def check_text(text: str, where: str) -> str:
    """JSON may carry lone surrogates (\\ud800), which no tokenizer can encode: a 400, not a crash."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{where}: the text is not valid Unicode (a lone surrogate)", param=where) from None
    return text


def finish_reason(event: Event) -> str:
    # "abort" (as vLLM says) only when the server shut down before the answer was complete.
    return "abort" if event.finish_reason == "cancelled" else event.finish_reason


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"
