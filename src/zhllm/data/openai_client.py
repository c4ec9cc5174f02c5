"""A minimal client for OpenAI-compatible `/v1/chat/completions` endpoints, on the standard library.

urllib rather than httpx keeps zhllm's core dependencies lean; the caller's threads give concurrency.
Transient trouble (connection errors, timeouts, 408/409/429, 5xx, an answer that is not a chat completion)
is retried with exponential backoff and jitter, honouring a 429's Retry-After; a request that still fails
raises `RequestFailed`. Answers that no retry can fix (401 bad key, 404 wrong URL or model, 400) raise
`EndpointRejected` at once.
"""
from __future__ import annotations

import http.client
import json
import random
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from ..errors import ZhllmError

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_WAIT = 30.0  # seconds: the longest single backoff, whatever Retry-After or the doubling asks for


class RequestFailed(Exception):
    """One request failed on every try; the message says how the last try failed."""


class EndpointRejected(ZhllmError):
    """The endpoint refused the request in a way no retry can fix (key, URL, model name, payload)."""


def chat_url(endpoint: str) -> str:
    """The chat completions URL for a base URL given as `http://host:port`, `.../v1` or the full path."""
    url = endpoint.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ZhllmError(f"endpoint must be an http:// or https:// URL, got {endpoint!r}")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


@dataclass
class ChatClient:
    endpoint: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0
    max_retries: int = 5
    retry_wait: float = 1.0  # seconds before the first retry; doubled after each
    retries: int = 0         # retried tries so far, over all threads
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.url = chat_url(self.endpoint)
        if self.timeout <= 0 or self.max_retries < 0 or self.retry_wait < 0:
            raise ZhllmError("--timeout must be > 0, --max-retries and the retry wait >= 0")

    def chat(self, messages: list[dict[str, str]], *, temperature: float = 0.7, max_tokens: int | None = None,
             seed: int | None = None) -> str:
        """The assistant's reply to `messages`."""
        payload: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": temperature}
        if max_tokens is not None:
            payload["max_tokens"] = max_tokens
        if seed is not None:
            payload["seed"] = seed
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        jitter = random.Random(seed)
        for attempt in range(self.max_retries + 1):
            try:
                return self._post(body)
            except _Transient as e:
                if attempt == self.max_retries:
                    raise RequestFailed(f"{e} (after {self.max_retries + 1} tries)") from None
                wait = self.retry_wait * 2 ** attempt * (1 + jitter.random() / 2)
                if e.retry_after is not None:
                    wait = max(wait, e.retry_after)
                with self._lock:
                    self.retries += 1
                time.sleep(min(wait, MAX_WAIT))
        raise AssertionError("unreachable")

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = _error_detail(e)
            if e.code in RETRYABLE_STATUS:
                raise _Transient(f"HTTP {e.code}{detail}", _retry_after(e.headers.get("Retry-After"))) from None
            hint = {401: " (check the API key variable)", 403: " (check the API key variable)",
                    404: " (check --endpoint and --model)"}.get(e.code, "")
            raise EndpointRejected(f"{self.url} answered HTTP {e.code}{detail}{hint}") from None
        except TimeoutError:  # socket.timeout is TimeoutError since 3.10
            raise _Transient(f"no answer within {self.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as e:  # URLError, refused or dropped connections
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError):
                raise _Transient(f"no answer within {self.timeout:g} s") from None
            raise _Transient(f"cannot reach {self.url}: {reason or type(reason).__name__}") from None
        return _reply_text(raw)


class _Transient(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:  # the HTTP-date form: fall back to our own backoff
        return None


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        text = e.read(300).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    try:
        message = json.loads(text).get("error", {}).get("message")
        text = message if isinstance(message, str) else text
    except (ValueError, AttributeError):
        pass
    return f": {' '.join(text.split())[:200]}" if text else ""


def _reply_text(raw: bytes) -> str:
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _Transient(f"answer is not a chat completion: {raw[:120]!r}") from None
    if not isinstance(content, str):
        # Some servers send null content for a reply cut at length 0; treat as an empty answer.
        return ""
    return content
