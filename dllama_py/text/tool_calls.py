"""Tool calls in a model's output, and tools offered to a model whose template has no place for them.

The forms read, wherever they come from:

- Qwen3 / Hermes (and this project's fallback prompt): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
  anywhere in the output, as often as the model likes; text around the calls stays content;
- Llama 3.x JSON: the whole answer is `{"name": ..., "parameters": {...}}` (one or more objects,
  separated by `;`, commas or white space); it counts as a call only when the name is one of the
  offered tools, since an answer may be JSON for other reasons;
- Llama 3.x `<|python_tag|>`: the rest of the answer is JSON call(s) as above, or a built-in tool
  call `name.call(key="value", ...)`.

A call whose JSON does not parse, or that has no name, stays content, as it was written.
`ToolCallStream` reads the output as it is generated: it lets content through at once, holds back
only what may still become a call, and hands out each call as soon as it is complete, so a
streaming answer and a whole answer say the same.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
_MARKERS = (TOOL_CALL_OPEN, PYTHON_TAG)
_CALL_KEYS = ("name", "type", "function")  # what the first key of a JSON call may be
_FIRST_KEY = re.compile(r'\{\s*"((?:[^"\\]|\\.)*)"')
_BUILTIN_CALL = re.compile(r"([A-Za-z_][\w.]*)\.call\((.*)\)", re.DOTALL)


def new_call_id() -> str:
    """An id in OpenAI's shape: 'call_' and 24 hex digits."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    """One function call the model asked for; `arguments` is a JSON object as text."""

    name: str
    arguments: str
    id: str = field(default_factory=new_call_id)

    def openai(self) -> dict[str, Any]:
        """The call as OpenAI's `tool_calls[]` entry."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


Event = Union[str, ToolCall]  # content text, or a complete call


def call_from_object(value: Any) -> ToolCall | None:
    """A ToolCall from a parsed JSON call ({"name", "arguments" or "parameters"}, optionally under
    "function"), or None when it is not one."""
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("function"), dict) and "name" in value["function"]:
        value = value["function"]
    name = value.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    arguments = value["arguments"] if "arguments" in value else value.get("parameters", {})
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name.strip(), json.dumps(arguments, ensure_ascii=False))


def _call_from_json(text: str) -> ToolCall | None:
    try:
        return call_from_object(json.loads(text))
    except ValueError:
        return None


def _json_calls(text: str) -> list[ToolCall] | None:
    """Every call of one or more JSON call objects separated by ';', ',' or white space, or None
    unless the whole text is such calls."""
    decoder = json.JSONDecoder()
    calls, pos = [], 0
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] in ";,"):
            pos += 1
        if pos == len(text):
            return calls or None
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return None
        values = value if isinstance(value, list) else [value]
        for item in values:
            call = call_from_object(item)
            if call is None:
                return None
            calls.append(call)


def _builtin_call(text: str) -> ToolCall | None:
    """Llama 3.1's built-in tool form `brave_search.call(query="...")`, keyword arguments only."""
    match = _BUILTIN_CALL.fullmatch(text.strip())
    if match is None:
        return None
    try:
        node = ast.parse(f"f({match.group(2)})", mode="eval").body
        if not isinstance(node, ast.Call) or node.args:
            return None
        arguments = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg is not None}
        if len(arguments) != len(node.keywords):
            return None
    except (SyntaxError, ValueError):
        return None
    return ToolCall(match.group(1), json.dumps(arguments, ensure_ascii=False))


def _partial_marker_length(text: str) -> int:
    """Length of the longest end of `text` that begins a marker (and may complete with more text)."""
    best = 0
    for marker in _MARKERS:
        for size in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:size]):
                best = size
                break
    return best


class _ObjectScanner:
    """Finds where a JSON value that starts at position 0 of a growing text ends, without
    rescanning what it has already read."""

    def __init__(self) -> None:
        self.pos = 0
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def end(self, text: str) -> int | None:
        """Index just past the complete object, or None while it is still open."""
        while self.pos < len(text):
            char = text[self.pos]
            self.pos += 1
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    return self.pos
        return None


class ToolCallStream:
    """Reads a model's output piece by piece and splits it into content and tool calls.

    `push(text)` and, at the end, `finish()` return events in order: strings of content and
    ToolCall objects. White space next to a call is dropped; other content is passed on as soon
    as it cannot be the start of a call (a possible marker at its end waits for the next piece).

    tool_names: the names the request offered; a bare JSON answer (Llama 3.x's form) is a call
    only when it names one of them (any name when empty). Tagged calls may name anything.
    """

    def __init__(self, tool_names: Collection[str] = ()) -> None:
        self.tool_names = frozenset(tool_names)
        self.mode = "start"  # start, text, json (a bare JSON call), after_json, tag, python
        self.buffer = ""
        self.pending_space = ""  # white space held back: it is dropped if a call follows it
        self.skip_space = False  # drop the white space that follows a call
        self.calls = 0
        self._scanner = _ObjectScanner()
        self._out: list[Event] = []

    # ---- feeding ----------------------------------------------------------------------------
    def push(self, text: str) -> list[Event]:
        self.buffer += text
        self._run(final=False)
        return self._take()

    def finish(self) -> list[Event]:
        """The events still held back, once the output is complete."""
        self._run(final=True)
        if self.mode == "tag":
            call = _call_from_json(self.buffer.strip())  # the closing tag never came
            if call is not None:
                self._emit_call(call)
            else:
                self._content(TOOL_CALL_OPEN + self.buffer)
        elif self.mode == "python":
            self._finish_python(self.buffer)
        elif self.mode in ("json", "start", "text"):
            self._content(self.buffer)
        self.buffer = ""
        if self.pending_space and not self.calls:
            self._out.append(self.pending_space)
        self.pending_space = ""
        self.mode = "done"
        return self._take()

    # ---- the state machine ------------------------------------------------------------------
    def _run(self, final: bool) -> None:
        while True:
            before = (self.mode, len(self.buffer))
            getattr(self, f"_step_{self.mode}")(final)
            if (self.mode, len(self.buffer)) == before:
                return

    def _step_start(self, final: bool) -> None:
        stripped = self.buffer.lstrip()
        if not stripped:
            return
        self.pending_space += self.buffer[: len(self.buffer) - len(stripped)]
        self.buffer = stripped
        self._switch("json" if stripped.startswith("{") else "text")

    def _step_text(self, final: bool) -> None:
        found = [(self.buffer.find(m), m) for m in _MARKERS if m in self.buffer]
        if found:
            index, marker = min(found)
            self._content(self.buffer[:index])  # its trailing space waits: dropped if a call follows
            self.buffer = self.buffer[index + len(marker) :]
            self._switch("tag" if marker == TOOL_CALL_OPEN else "python")
            return
        if final:
            return  # finish() passes the rest on
        keep = _partial_marker_length(self.buffer)
        self._content(self.buffer[: len(self.buffer) - keep])
        self.buffer = self.buffer[len(self.buffer) - keep :]

    def _step_json(self, final: bool) -> None:
        match = _FIRST_KEY.match(self.buffer)
        opened = self.buffer[1:].lstrip()
        if (match and match.group(1) not in _CALL_KEYS) or (opened and opened[0] != '"'):
            self._switch("text")  # JSON, but not a call
            return
        end = self._scanner.end(self.buffer)
        if end is None:
            return
        call = _call_from_json(self.buffer[:end])
        if call is None or (self.tool_names and call.name not in self.tool_names):
            self._switch("text")
            return
        self._emit_call(call)
        self.buffer = self.buffer[end:]
        self._switch("after_json")

    def _step_after_json(self, final: bool) -> None:
        rest = self.buffer.lstrip(" \t\r\n;,")
        self.buffer = rest
        if rest:
            self._switch("json" if rest.startswith("{") else "text")

    def _step_tag(self, final: bool) -> None:
        index = self.buffer.find(TOOL_CALL_CLOSE)
        if index < 0:
            return
        inner = self.buffer[:index]
        self.buffer = self.buffer[index + len(TOOL_CALL_CLOSE) :]
        call = _call_from_json(inner.strip())
        if call is not None:
            self._emit_call(call)
        else:
            self._content(TOOL_CALL_OPEN + inner + TOOL_CALL_CLOSE)
        self._switch("text")

    def _step_python(self, final: bool) -> None:
        pass  # the rest of the answer belongs to the tag: read in finish()

    def _finish_python(self, body: str) -> None:
        calls = _json_calls(body) or ([c] if (c := _builtin_call(body)) else None)
        if calls:
            for call in calls:
                self._emit_call(call)
        else:
            self._content(PYTHON_TAG + body)

    # ---- output -----------------------------------------------------------------------------
    def _switch(self, mode: str) -> None:
        self.mode = mode
        if mode == "json":
            self._scanner = _ObjectScanner()

    def _content(self, text: str) -> None:
        if self.skip_space:
            text = text.lstrip()
            if not text:
                return
            self.skip_space = False
        text = self.pending_space + text
        kept = text.rstrip()
        self.pending_space = text[len(kept) :]
        if kept:
            self._out.append(kept)

    def _emit_call(self, call: ToolCall) -> None:
        self.pending_space = ""
        self.skip_space = True
        self.calls += 1
        self._out.append(call)

    def _take(self) -> list[Event]:
        out, self._out = self._out, []
        return out


@dataclass
class ParsedOutput:
    """A whole answer split: the content outside the calls (None when only calls), and the calls."""

    content: str | None
    calls: list[ToolCall]


def parse_tool_calls(text: str, tool_names: Collection[str] = ()) -> ParsedOutput:
    """Split a complete answer into content and tool calls (see ToolCallStream)."""
    stream = ToolCallStream(tool_names)
    events = stream.push(text) + stream.finish()
    content = "".join(e for e in events if isinstance(e, str))
    calls = [e for e in events if isinstance(e, ToolCall)]
    return ParsedOutput(content if content or not calls else None, calls)


# ---- tools for a template that has no place for them ----------------------------------------


def tools_system_prompt(tools: Sequence[dict[str, Any]]) -> str:
    """The instruction that offers `tools` (OpenAI's tool objects) when the chat template cannot."""
    listing = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (
        "# Tools\n\n"
        "You may call these functions (JSON schemas, one a line):\n"
        f"<tools>\n{listing}\n</tools>\n\n"
        "To call functions, reply with one block per call:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <arguments-json-object>}\n</tool_call>\n'
        "Results come back in <tool_response></tool_response> tags. If no function is needed, answer normally."
    )


def _call_as_text(call: dict[str, Any]) -> str:
    function = call.get("function") or {}
    arguments = function.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    name = json.dumps(function.get("name", ""), ensure_ascii=False)
    return f'{TOOL_CALL_OPEN}\n{{"name": {name}, "arguments": {arguments}}}\n{TOOL_CALL_CLOSE}'


def tool_history_as_text(
    messages: Sequence[dict[str, Any]], calls: bool = True, results: bool = True
) -> list[dict[str, Any]]:
    """The conversation with tool calls and tool results written as plain text, for a template
    that cannot render them: an assistant's `tool_calls` become `<tool_call>` blocks in its
    content (calls=True), and `tool` messages become a user message of `<tool_response>` blocks
    (results=True; consecutive results share one message)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        if calls and message.get("role") == "assistant" and message.get("tool_calls"):
            blocks = [_call_as_text(call) for call in message["tool_calls"]]
            content = message.get("content") or ""
            text = "\n".join(([content] if content else []) + blocks)
            out.append({k: v for k, v in message.items() if k != "tool_calls"} | {"content": text})
        elif results and message.get("role") == "tool":
            block = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        else:
            out.append(dict(message))
    for message in out:
        message.pop("_tool_results", None)
    return out


def with_tools_system_prompt(
    messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The conversation with the tools offered in its system message (added first if none)."""
    prompt = tools_system_prompt(tools)
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system":
        system = out[0].get("content") or ""
        out[0]["content"] = f"{system}\n\n{prompt}" if system else prompt
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out


def split_parallel_calls(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with each assistant message of several tool calls split into consecutive
    messages of one call each (for templates that render one call per message)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        calls = message.get("tool_calls") or []
        if message.get("role") != "assistant" or len(calls) < 2:
            out.append(message)
            continue
        for i, call in enumerate(calls):
            out.append({**message, "content": message.get("content", "") if i == 0 else "", "tool_calls": [call]})
    return out
