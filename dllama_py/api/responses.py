"""OpenAI's response objects: chat.completion(.chunk), text_completion, usage, SSE framing."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from dllama_py.api.service import Outcome
from dllama_py.engine.engine import TokenLogprobs
from dllama_py.text.tokenizer import Tokenizer
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


# ---- log-probabilities ----------------------------------------------------------------------


def _token_entry(tokenizer: Tokenizer, token: int, logprob: float) -> dict[str, Any]:
    piece = tokenizer.id_to_piece(token)
    return {"token": piece.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(piece)}


def chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprobs]) -> dict[str, Any]:
    """OpenAI's chat `logprobs`: each token with its log-probability, bytes and top alternatives."""
    return {
        "content": [
            {**_token_entry(tokenizer, e.token, e.logprob),
             "top_logprobs": [_token_entry(tokenizer, t, lp) for t, lp in e.top]}
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprobs | None], offset: int = 0,
                        tokens: list[int] | None = None) -> dict[str, Any]:
    """The legacy completions `logprobs`: parallel lists of tokens, their log-probabilities, the top
    alternatives as {token: logprob}, and each token's character offset in the text. An entry of
    None is the prompt's first token, which nothing predicts (its logprob and top are null)."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for i, e in enumerate(entries):
        token = e.token if e is not None else tokens[i]  # type: ignore[index]
        text = tokenizer.id_to_piece(token).decode("utf-8", errors="replace")
        out["tokens"].append(text)
        out["token_logprobs"].append(None if e is None else e.logprob)
        out["top_logprobs"].append(None if e is None else {
            tokenizer.id_to_piece(t).decode("utf-8", errors="replace"): lp for t, lp in e.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


# ---- chat -----------------------------------------------------------------------------------


@dataclass
class Choice:
    """One finished choice of a whole (non-streamed) answer."""

    text: str | None
    finish_reason: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: dict[str, Any] | None = None


def chat_completion(ids: ResponseIds, choices: list[Choice], outcome: Outcome) -> dict[str, Any]:
    """A whole chat answer; a choice with tool calls has `content` the text outside them (null
    when none) and finish_reason 'tool_calls'."""
    out = []
    for index, choice in enumerate(choices):
        message: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
        if choice.tool_calls:
            message["tool_calls"] = [call.openai() for call in choice.tool_calls]
        out.append({
            "index": index,
            "message": message,
            "logprobs": choice.logprobs,
            "finish_reason": "tool_calls" if choice.tool_calls else choice.finish_reason,
        })
    return {**ids.head("chat.completion"), "choices": out, "usage": usage(outcome), "x_dllama": outcome.timing()}


def chat_chunk(
    ids: ResponseIds,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    include_usage: bool = False,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    chunk = {
        **ids.head("chat.completion.chunk"),
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
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


def text_completion(ids: ResponseIds, choices: list[Choice], outcome: Outcome) -> dict[str, Any]:
    return {
        **ids.head("text_completion"),
        "choices": [{"index": i, "text": c.text, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
                    for i, c in enumerate(choices)],
        "usage": usage(outcome),
        "x_dllama": outcome.timing(),
    }


def text_chunk(
    ids: ResponseIds, text: str, finish_reason: str | None = None, include_usage: bool = False, index: int = 0,
    logprobs: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    chunk = {
        **ids.head("text_completion"),
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
        **extra,
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def text_usage_chunk(ids: ResponseIds, outcome: Outcome) -> dict[str, Any]:
    return {**ids.head("text_completion"), "choices": [], "usage": usage(outcome)}
