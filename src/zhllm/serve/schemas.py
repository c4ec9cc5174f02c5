"""Request bodies of the OpenAI-compatible routes (pydantic; FastAPI turns them into the OpenAPI schema).

Every number is bounded, so a fuzzer (or a careless client) meets a 400, never a server error. Fields the
server does not implement are ignored, as OpenAI-compatible servers do, except where ignoring them would
change the answer's meaning (logprobs, echo, suffix: refused).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=1_000_000, description="zhllm extension: 0 = off")
    max_tokens: int | None = Field(None, ge=1, description="capped by the server's --max-tokens")
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings, not included in the answer")
    seed: int | None = None
    n: int = Field(1, ge=1, le=8)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="zhllm extension: CTRL-style, 1 = off")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    logprobs: bool | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(..., description="a text, or several (each gets n choices)")
    max_tokens: int | None = Field(16, ge=1, description="capped by the server's --max-tokens")
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
