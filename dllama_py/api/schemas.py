"""Request bodies of /v1/chat/completions and /v1/completions, and their validation.

Bodies are parsed strictly (a string is not a number) but openly: unknown fields, and the
fields real clients send with their default values (`n: 1`, `logprobs: false`, `tools: []`,
zero penalties), are accepted and ignored. A field that asks for something this server cannot
do is refused with a 400 that names it.

Tool calling: `tools` (functions), `tool_choice` 'auto' or 'none', `parallel_tool_calls`,
assistant messages with `tool_calls` and `tool` messages are accepted; `template_messages()`
turns the conversation into what a chat template expects (transformers' shape).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dllama_py.api.errors import bad_request, unsupported

ROLES = ("system", "developer", "user", "assistant", "tool")
NOT_YET = "it needs constrained decoding, which dllama-api does not do yet"
MAX_STOP_SEQUENCES = 16


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: bool | None = False


class ContentPart(_Open):
    type: str
    text: str | None = None


class FunctionCall(_Open):
    name: str
    arguments: str | dict[str, Any] = "{}"  # a JSON object as text (OpenAI); an object is accepted too


class MessageToolCall(_Open):
    id: str | None = None
    type: str | None = "function"
    function: FunctionCall


class ChatMessage(_Open):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # which call a `tool` message answers


class SamplingRequest(_Open):
    """Fields both endpoints share."""

    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    user: Any = None  # a string in OpenAI's API; some clients send an object
    ignore_eos: bool | None = False  # non-standard (as in vLLM): generate max_tokens tokens whatever comes

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise bad_request(f"stop: at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}", "stop")
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_shared(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options: only allowed when stream is true", "stream_options")
        if self.n not in (None, 1):
            raise unsupported("n", f"n={self.n} (more than one choice)")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise unsupported(name, f"a non-zero {name}")
        if self.logit_bias:
            raise unsupported("logit_bias", "logit_bias")
        self.stop_strings()


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    def check(self) -> None:
        self.check_shared()
        if self.logprobs:
            raise unsupported("logprobs", "logprobs")
        if self.top_logprobs:
            raise unsupported("top_logprobs", "top_logprobs")
        self.check_tools()
        if self.functions:
            raise unsupported("functions", "the deprecated 'functions' field", "send 'tools' instead")
        if self.function_call not in (None, "none", "auto"):
            raise unsupported("function_call", "function_call naming a function", NOT_YET)
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise unsupported(
                "response_format", f"response_format {self.response_format.get('type')!r}", NOT_YET
            )
        if not self.messages:
            raise bad_request("messages: at least one message is required", "messages")
        self.template_messages()

    def check_tools(self) -> None:
        if not isinstance(self.tool_choice, (str, dict, type(None))):
            raise bad_request("tool_choice: a string or an object", "tool_choice")
        if self.tool_choice == "required":
            raise unsupported("tool_choice", "tool_choice 'required'", f"{NOT_YET}; use 'auto' or 'none'")
        if isinstance(self.tool_choice, dict):
            raise unsupported("tool_choice", "tool_choice naming a function", f"{NOT_YET}; use 'auto' or 'none'")
        if self.tool_choice not in (None, "auto", "none"):
            raise bad_request(
                f"tool_choice: {self.tool_choice!r} is not one of 'none', 'auto', 'required' or a function",
                "tool_choice",
            )
        for i, tool in enumerate(self.tools or []):
            where = f"tools[{i}]"
            if not isinstance(tool, dict):
                raise bad_request(f"{where}: a tool is an object", where)
            if tool.get("type", "function") != "function":
                raise unsupported(f"{where}.type", f"tools of type {tool.get('type')!r}", "only 'function' tools")
            function = tool.get("function")
            if not isinstance(function, dict):
                raise bad_request(f"{where}.function: this field is required (an object)", f"{where}.function")
            name = function.get("name")
            if not isinstance(name, str) or not name:
                raise bad_request(f"{where}.function.name: a tool needs a name", f"{where}.function.name")
            if not isinstance(function.get("parameters", {}), (dict, type(None))):
                raise bad_request(
                    f"{where}.function.parameters: a JSON schema object", f"{where}.function.parameters"
                )
            if not isinstance(function.get("description", ""), (str, type(None))):
                raise bad_request(
                    f"{where}.function.description: a string", f"{where}.function.description"
                )

    def offered_tools(self) -> list[dict[str, Any]] | None:
        """The tools the model is offered: none when there are none or tool_choice is 'none'."""
        if not self.tools or self.tool_choice == "none":
            return None
        return list(self.tools)

    def tool_names(self) -> list[str]:
        return [tool["function"]["name"] for tool in self.offered_tools() or []]

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        """The conversation for the chat template, in transformers' shape: string `content`; an
        assistant's `tool_calls` with `arguments` as objects; `tool` messages with their
        `tool_call_id`. Keys without a value are left out (as transformers drops them)."""
        out = []
        for i, message in enumerate(self.messages):
            where = f"messages[{i}]"
            if message.role not in ROLES:
                if message.role == "function":
                    raise unsupported(
                        f"{where}.role", "a 'function' message (the deprecated function calling)",
                        "send 'tool' messages",
                    )
                raise bad_request(
                    f"{where}.role: unknown role {message.role!r}; use one of {', '.join(ROLES)}",
                    f"{where}.role",
                )
            role = "system" if message.role == "developer" else message.role
            item: dict[str, Any] = {"role": role, "content": _message_text(message, where)}
            if message.tool_calls:
                if role != "assistant":
                    raise bad_request(
                        f"{where}.tool_calls: only an assistant message has tool calls", f"{where}.tool_calls"
                    )
                item["tool_calls"] = [_template_call(call) for call in message.tool_calls]
            if role == "tool" and message.tool_call_id is not None:
                item["tool_call_id"] = message.tool_call_id
            if role == "tool" and message.name is not None:
                item["name"] = message.name
            out.append(item)
        return out


def _template_call(call: MessageToolCall) -> dict[str, Any]:
    """A call as templates read it: arguments as an object when they are JSON (as vLLM does)."""
    arguments: Any = call.function.arguments
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            arguments = parsed
    entry: dict[str, Any] = {} if call.id is None else {"id": call.id}
    entry["type"] = call.type or "function"
    entry["function"] = {"name": call.function.name, "arguments": arguments}
    return entry


def _message_text(message: ChatMessage, where: str) -> str:
    if message.content is None:
        if message.role == "assistant":  # content null: an assistant that only called tools
            return ""
        raise bad_request(f"{where}.content: a {message.role} message needs content", f"{where}.content")
    if isinstance(message.content, str):
        return message.content
    texts = []
    for j, part in enumerate(message.content):
        if part.type != "text":
            raise unsupported(f"{where}.content[{j}].type", f"content of type {part.type!r} (text only)")
        if part.text is None:
            raise bad_request(
                f"{where}.content[{j}].text: a text part needs text", f"{where}.content[{j}].text"
            )
        texts.append(part.text)
    return "\n".join(texts)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0)

    def check(self) -> None:
        self.check_shared()
        if self.suffix:
            raise unsupported("suffix", "suffix (insertion)")
        if self.best_of not in (None, 1):
            raise unsupported("best_of", f"best_of={self.best_of}")
        if self.logprobs is not None:
            raise unsupported("logprobs", "logprobs")
        if (
            isinstance(self.prompt, list)
            and len(self.prompt) != 1
            and not all(isinstance(t, int) for t in self.prompt)
        ):
            raise unsupported("prompt", "several prompts in one request (send one request each)")

    def token_limit(self) -> int:
        return self.max_tokens if self.max_tokens is not None else 16

    def prompt_value(self) -> str | list[int]:
        """The one prompt: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]
        return prompt  # type: ignore[return-value]


# ---- parsing --------------------------------------------------------------------------------

_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param_name(loc: tuple[Any, ...]) -> str | None:
    """'messages[0].role' from pydantic's ('messages', 0, 'role'), skipping union member tags."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in part or "(" in part or part[:1].isupper():
            continue
        else:
            out += f".{part}" if out else part
    return out or None


def parse_body(model: type[SamplingRequest], body: bytes) -> Any:
    """Validate a JSON body as `model` (strict types) and check what it asks for; raises ApiError."""
    try:
        request = model.model_validate_json(body or b"", strict=True)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise bad_request(f"the body is not valid JSON: {first['msg']}", None, "invalid_json") from None
        if first["type"] == "model_type" and not first["loc"]:
            raise bad_request("the body must be a JSON object") from None
        param = _param_name(tuple(first["loc"]))
        message = first["msg"]
        if first["type"] == "missing":
            message = "this field is required"
        raise bad_request(f"{param}: {message}" if param else message, param) from None
    request.check()
    return request
