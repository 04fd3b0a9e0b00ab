"""Request bodies of /v1/chat/completions and /v1/completions, and their validation.

Bodies are parsed strictly (a string is not a number) but openly: unknown fields, and the
fields real clients send with their default values (`n: 1`, `logprobs: false`, `tools: []`,
zero penalties), are accepted and ignored. A field that asks for something this server cannot
do is refused with a 400 that names it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dllama_py.api.errors import bad_request, unsupported

ROLES = ("system", "developer", "user", "assistant")
MAX_STOP_SEQUENCES = 16


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: bool | None = False


class ContentPart(_Open):
    type: str
    text: str | None = None


class ChatMessage(_Open):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class SamplingRequest(_Open):
    """Fields both endpoints share."""

    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
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
    response_format: dict[str, Any] | None = None

    def check(self) -> None:
        self.check_shared()
        if self.logprobs:
            raise unsupported("logprobs", "logprobs")
        if self.top_logprobs:
            raise unsupported("top_logprobs", "top_logprobs")
        if self.tools:
            raise unsupported("tools", "tool calling")
        if self.functions:
            raise unsupported("functions", "function calling")
        if self.tool_choice not in (None, "none", "auto"):
            raise unsupported("tool_choice", "tool_choice other than 'none' or 'auto'")
        if self.function_call not in (None, "none", "auto"):
            raise unsupported("function_call", "function_call other than 'none' or 'auto'")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise unsupported("response_format", f"response_format {self.response_format.get('type')!r}")
        if not self.messages:
            raise bad_request("messages: at least one message is required", "messages")
        self.plain_messages()

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def plain_messages(self) -> list[dict[str, str]]:
        """The conversation as [{'role', 'content'}] with string content, for the chat template."""
        out = []
        for i, message in enumerate(self.messages):
            where = f"messages[{i}]"
            if message.role not in ROLES:
                if message.role in ("tool", "function"):
                    raise unsupported(f"{where}.role", f"a {message.role!r} message (tool calling)")
                raise bad_request(
                    f"{where}.role: unknown role {message.role!r}; use one of {', '.join(ROLES)}",
                    f"{where}.role",
                )
            if (message.model_extra or {}).get("tool_calls"):
                raise unsupported(f"{where}.tool_calls", "tool calls")
            role = "system" if message.role == "developer" else message.role
            out.append({"role": role, "content": _message_text(message, where)})
        return out


def _message_text(message: ChatMessage, where: str) -> str:
    if message.content is None:
        if message.role == "assistant":
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
