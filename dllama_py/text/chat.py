"""Chat templates: render Hugging Face Jinja templates the way transformers does, plus built-ins.

The environment mirrors transformers' renderer: an immutable sandbox with
`trim_blocks=True, lstrip_blocks=True`, the `loopcontrols` extension, a `tojson` filter that
keeps non-ASCII characters, and the globals `raise_exception(message)` and
`strftime_now(format)`; like transformers it always passes `tools` and `documents` (None when
not given). Built-in templates (selectable by name) cover models whose `.t` file has no
template: `llama2`, `llama3`, `chatml`, `deepseek3` and `none` (plain text); none of them has a
place for tools (see `tool_support`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

BUILTIN_TEMPLATES: dict[str, str] = {
    "llama2": (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}"
        "{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' }}"
        "{% if loop.first and system is not none %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}"
        "{{ message['content'] | trim + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
        "{% endif %}{% endfor %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "deepseek3": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] }}"
        "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
        "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
    ),
    "none": "{% for message in messages %}{{ message['content'] }}{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}",
}

# end-of-turn markers, most specific first; the first one found is the template's turn end
END_OF_TURN_MARKERS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<｜end▁of▁sentence｜>",
    "<|eom_id|>",
    "<|endoftext|>",
    "</s>",
)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(date_format: str) -> str:
    return datetime.now().strftime(date_format)


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """Compile a chat template in a transformers-compatible sandboxed environment."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(template)


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    **kwargs: Any,
) -> str:
    """Render `messages` ([{'role': ..., 'content': ...}]) with a Jinja chat template.

    `template` is the template text or a built-in name (see BUILTIN_TEMPLATES). `tools` are
    JSON schemas of functions (OpenAI's `{"type": "function", "function": {...}}` objects);
    messages may carry `tool_calls` (arguments as objects) and `tool` results, as transformers
    expects them. Extra keyword arguments (e.g. `enable_thinking=False`, `date_string=...`) are
    passed to the template as variables, as transformers' `apply_chat_template` does.
    """
    text = BUILTIN_TEMPLATES.get(template, template)
    return compile_template(text).render(
        messages=messages,
        tools=tools,
        documents=documents,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
        **kwargs,
    )


@dataclass(frozen=True)
class ToolSupport:
    """What a chat template does with tool calling, found by rendering probes."""

    tools: bool  # it shows the model the `tools` it is given
    tool_calls: bool  # it renders an assistant message's `tool_calls`
    tool_results: bool  # it renders `tool` messages (the results)


_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "dllama_probe_tool",
        "description": "probe",
        "parameters": {"type": "object", "properties": {"dllama_probe_arg": {"type": "string"}}},
    },
}


def _probe(template: str, messages: list[dict[str, Any]], marker: str, **kwargs: Any) -> bool:
    try:
        return marker in render_chat(template, messages, True, **kwargs)
    except Exception:  # noqa: BLE001 - a template that fails on the probe has no place for it
        return False


@lru_cache(maxsize=16)
def tool_support(template: str) -> ToolSupport:
    """Whether `template` (text or built-in name) renders tools, tool calls and tool results.

    Probes, as llama.cpp does for its templates: a conversation is rendered with a made-up tool,
    call or result, and looked for in the output."""
    user = {"role": "user", "content": "dllama probe question"}
    call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_dllama_probe",
                "type": "function",
                "function": {"name": "dllama_probe_call", "arguments": {"dllama_probe_arg": "x"}},
            }
        ],
    }
    result = {"role": "tool", "tool_call_id": "call_dllama_probe", "content": "dllama_probe_result"}
    return ToolSupport(
        tools=_probe(template, [user], "dllama_probe_tool", tools=[_PROBE_TOOL]),
        tool_calls=_probe(template, [user, call], "dllama_probe_call"),
        tool_results=_probe(template, [user, call, result], "dllama_probe_result")
        or _probe(template, [user, result], "dllama_probe_result"),
    )


def resolve_template(choice: str | None, stored_template: str | None) -> str:
    """Pick the template to use: a built-in name, or None/'auto' for the one stored in the `.t` file."""
    if choice in (None, "auto"):
        if stored_template is None:
            raise ValueError(
                "the tokenizer has no chat template; choose one with --chat-template "
                f"({', '.join(BUILTIN_TEMPLATES)})"
            )
        return stored_template
    if choice not in BUILTIN_TEMPLATES:
        raise ValueError(f"unknown chat template {choice!r}; choose one of {', '.join(BUILTIN_TEMPLATES)}")
    return BUILTIN_TEMPLATES[choice]


def end_of_turn_tokens(template: str, eos_token: str | None = None) -> list[str]:
    """Special-token strings that end a turn in `template`, primary first.

    Literal markers found in the template come first (in END_OF_TURN_MARKERS order); if the
    template emits the `eos_token` variable, `eos_token` is added.
    """
    template = BUILTIN_TEMPLATES.get(template, template)
    found = [marker for marker in END_OF_TURN_MARKERS if marker in template]
    if eos_token and "eos_token" in template and eos_token not in found:
        found.append(eos_token)
    return found


def template_family(template: str) -> str:
    """Which built-in layout a template follows (as distributed-llama detects it), or 'unknown'."""
    if "[INST]" in template:
        return "llama2"
    if "<|start_header_id|>" in template:
        return "llama3"
    if "<｜Assistant｜>" in template:
        return "deepseek3"
    if "<|im_start|>" in template:
        return "chatml"
    return "unknown"
