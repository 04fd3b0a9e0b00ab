"""OpenAI's response objects: chat.completion(.chunk), text_completion, usage, SSE framing."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from dllama_py.api.service import Outcome
from dllama_py.text.tool_calls import ToolCall

DONE_EVENT = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    """One Server-Sent Event carrying a JSON object."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(outcome: Outcome) -> dict[str, int]:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
    }


@dataclass
class ResponseIds:
    """What every object of one response shares: id, creation time, model."""

    prefix: str
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex[:24]}"

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


# ---- chat -----------------------------------------------------------------------------------


def chat_completion(
    ids: ResponseIds, text: str | None, outcome: Outcome, tool_calls: list[ToolCall] | None = None
) -> dict[str, Any]:
    """A whole chat answer; with tool calls, `content` is the text outside them (null when none)
    and finish_reason is 'tool_calls'."""
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls:
        message["tool_calls"] = [call.openai() for call in tool_calls]
    return {
        **ids.head("chat.completion"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": "tool_calls" if tool_calls else outcome.finish_reason,
            }
        ],
        "usage": usage(outcome),
        "x_dllama": outcome.timing(),
    }


def chat_chunk(
    ids: ResponseIds,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    include_usage: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    chunk = {
        **ids.head("chat.completion.chunk"),
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        **extra,
    }
    if include_usage:
        chunk["usage"] = None  # as OpenAI does: null on every chunk but the last
    return chunk


def tool_call_delta(index: int, call: ToolCall) -> dict[str, Any]:
    """A streamed chunk's delta that carries one whole call (id, type, name and arguments)."""
    return {"tool_calls": [{"index": index, **call.openai()}]}


def chat_usage_chunk(ids: ResponseIds, outcome: Outcome) -> dict[str, Any]:
    return {**ids.head("chat.completion.chunk"), "choices": [], "usage": usage(outcome)}


# ---- completions ----------------------------------------------------------------------------


def text_completion(ids: ResponseIds, text: str, outcome: Outcome) -> dict[str, Any]:
    return {
        **ids.head("text_completion"),
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": outcome.finish_reason}],
        "usage": usage(outcome),
        "x_dllama": outcome.timing(),
    }


def text_chunk(
    ids: ResponseIds, text: str, finish_reason: str | None = None, include_usage: bool = False, **extra: Any
) -> dict[str, Any]:
    chunk = {
        **ids.head("text_completion"),
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        **extra,
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def text_usage_chunk(ids: ResponseIds, outcome: Outcome) -> dict[str, Any]:
    return {**ids.head("text_completion"), "choices": [], "usage": usage(outcome)}
