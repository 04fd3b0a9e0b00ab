"""Request bodies of /v1/chat/completions and /v1/completions, and their validation.

Bodies are parsed strictly (a string is not a number) but openly: unknown fields are accepted
and ignored. A field that asks for something this server cannot do is refused with a 400 that
names it.

Sampling: temperature, top_p, seed, stop, n, presence/frequency penalties, logit_bias, and
llama.cpp's top_k, min_p, repeat_penalty and repeat_last_n as extensions (`sampler_options`).
Log-probabilities: chat's `logprobs` + `top_logprobs`, completions' `logprobs` (a count) and
`echo` (the prompt's own log-probabilities).
Tool calling: `tools` (functions), `tool_choice` ('auto', 'none', 'required' or a named
function: the last two constrain decoding to a valid call), `parallel_tool_calls`, assistant
messages with `tool_calls` and `tool` messages; `template_messages()` turns the conversation
into what a chat template expects (transformers' shape). Structured output: `response_format`
'json_object' or 'json_schema' (constrained decoding, generation/grammar.py).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dllama_py.api.errors import bad_request, unsupported
from dllama_py.engine.sampler import MAX_REPEAT_PENALTY, MIN_REPEAT_PENALTY, Penalties
from dllama_py.generation.grammar import closed

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_SEQUENCES = 16
MAX_CHOICES = 16  # n
MAX_TOP_LOGPROBS = 20  # OpenAI's limit (engine.MAX_TOP_LOGPROBS)


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
    max_tokens: int | None = Field(None, ge=0)  # 0: only for completions (echo + logprobs scores a prompt)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    user: Any = None  # a string in OpenAI's API; some clients send an object
    ignore_eos: bool | None = False  # non-standard (as in vLLM): generate max_tokens tokens whatever comes
    # llama.cpp's extensions
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    repeat_penalty: float | None = Field(None, ge=MIN_REPEAT_PENALTY, le=MAX_REPEAT_PENALTY, allow_inf_nan=False)
    repeat_last_n: int | None = Field(None, ge=0)

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
        self.stop_strings()
        self.token_bias(None)

    def choices(self) -> int:
        return self.n or 1

    def token_bias(self, vocab_size: int | None) -> dict[int, float]:
        """logit_bias as {token id: bias}: keys are token ids (as strings), values -100..100."""
        out = {}
        for key, value in (self.logit_bias or {}).items():
            where = f"logit_bias[{key!r}]"
            if not key.strip().isdigit():
                raise bad_request(f"{where}: the keys are token ids, as strings ('42')", "logit_bias")
            token = int(key)
            if vocab_size is not None and token >= vocab_size:
                raise bad_request(f"{where}: token id {token} is outside the vocabulary of {vocab_size}",
                                  "logit_bias")
            if not -100 <= value <= 100:  # also refuses NaN
                raise bad_request(f"{where}: a bias lies in [-100, 100], got {value}", "logit_bias")
            out[token] = float(value)
        return out

    def sampler_options(self, vocab_size: int) -> dict[str, Any]:
        """The Sampler keywords this request sets beyond temperature, top_p and seed."""
        return {
            "top_k": self.top_k or 0,
            "min_p": self.min_p or 0.0,
            "penalties": Penalties(
                presence=self.presence_penalty or 0.0,
                frequency=self.frequency_penalty or 0.0,
                repeat=1.0 if self.repeat_penalty is None else self.repeat_penalty,
                repeat_last_n=64 if self.repeat_last_n is None else self.repeat_last_n,
            ),
            "logit_bias": self.token_bias(vocab_size),
        }


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    def check(self) -> None:
        self.check_shared()
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs: only allowed when logprobs is true", "top_logprobs")
        self.check_tools()
        if self.functions:
            raise unsupported("functions", "the deprecated 'functions' field", "send 'tools' instead")
        if self.function_call not in (None, "none", "auto"):
            raise unsupported("function_call", "function_call naming a function", "send 'tools' and 'tool_choice'")
        self.output_format()
        if not self.messages:
            raise bad_request("messages: at least one message is required", "messages")
        self.template_messages()

    def logprobs_count(self) -> int | None:
        """None: no log-probabilities; n: the chosen token's and the n most likely."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def output_format(self) -> dict[str, Any] | None:
        """The JSON schema the answer must match ({} for any JSON object), or None (free text)."""
        fmt = self.response_format
        if fmt is None:
            return None
        kind = fmt.get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return {"type": "object"}
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict):
                raise bad_request("response_format.json_schema: this field is required (an object with "
                                  "'name' and 'schema')", "response_format.json_schema")
            schema = spec.get("schema", {})
            if not isinstance(schema, dict):
                raise bad_request("response_format.json_schema.schema: a JSON schema object",
                                  "response_format.json_schema.schema")
            return closed(schema) if spec.get("strict") is True else schema
        raise bad_request(f"response_format.type: {kind!r} is not one of 'text', 'json_object', 'json_schema'",
                          "response_format.type")

    def forced_tools(self) -> list[dict[str, Any]] | None:
        """The functions the answer must call one of (tool_choice 'required' or a named function),
        or None when the model may answer freely."""
        if self.tool_choice == "required":
            return [tool["function"] for tool in self.tools or []]
        if isinstance(self.tool_choice, dict):
            name = self.tool_choice["function"]["name"]
            return [tool["function"] for tool in self.tools or [] if tool["function"]["name"] == name]
        return None

    def check_tools(self) -> None:
        if not isinstance(self.tool_choice, (str, dict, type(None))):
            raise bad_request("tool_choice: a string or an object", "tool_choice")
        if isinstance(self.tool_choice, dict):
            function = self.tool_choice.get("function")
            if self.tool_choice.get("type", "function") != "function" or not isinstance(function, dict) \
                    or not isinstance(function.get("name"), str):
                raise bad_request("tool_choice: a named choice is {'type': 'function', 'function': {'name': ...}}",
                                  "tool_choice")
        elif self.tool_choice not in (None, "auto", "none", "required"):
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
        if self.tool_choice == "required" and not self.tools:
            raise bad_request("tool_choice: 'required' needs tools", "tool_choice")
        if isinstance(self.tool_choice, dict):
            name = self.tool_choice["function"]["name"]
            if name not in [tool["function"]["name"] for tool in self.tools or []]:
                raise bad_request(f"tool_choice: no tool is named {name!r}", "tool_choice")
        if (self.tool_choice == "required" or isinstance(self.tool_choice, dict)) and self.response_format \
                and self.response_format.get("type", "text") != "text":
            raise bad_request("response_format: not with a tool_choice that forces a call", "response_format")

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
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def check(self) -> None:
        self.check_shared()
        if self.suffix:
            raise unsupported("suffix", "suffix (insertion)")
        if self.best_of not in (None, 1, self.n):
            raise unsupported("best_of", f"best_of={self.best_of} (more candidates than choices)")
        if (
            isinstance(self.prompt, list)
            and len(self.prompt) != 1
            and not all(isinstance(t, int) for t in self.prompt)
        ):
            raise unsupported("prompt", "several prompts in one request (send one request each)")

    def token_limit(self) -> int:
        return self.max_tokens if self.max_tokens is not None else 16

    def logprobs_count(self) -> int | None:
        return self.logprobs

    def prompt_value(self) -> str | list[int]:
        """The one prompt: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]
        return prompt  # type: ignore[return-value]


class TokenizeRequest(_Open):
    """llama-server's /tokenize body."""

    content: str
    add_special: bool | None = False
    with_pieces: bool | None = False

    def check(self) -> None:
        pass


class DetokenizeRequest(_Open):
    """llama-server's /detokenize body."""

    tokens: list[int]

    def check(self) -> None:
        pass


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


def parse_body(model: type[_Open], body: bytes) -> Any:
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
