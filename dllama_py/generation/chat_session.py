"""Chat on top of the generator: render the conversation with its template, encode it, stop at
the template's end-of-turn token. Used by `dllama chat` and by `dllama-api`.

Each turn re-renders the whole conversation; the generator's KV cache already holds the
common prefix (the earlier turns), so only the new tokens are evaluated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from jinja2 import TemplateError

from dllama_py.engine.engine import Engine
from dllama_py.engine.sampler import Sampler
from dllama_py.generation.generator import GenerationResult, Generator, TokenEvent
from dllama_py.generation.grammar import CALL_STYLE_JSON, CALL_STYLE_TAGGED
from dllama_py.text.chat import end_of_turn_tokens, render_chat, resolve_template, tool_support
from dllama_py.text.tokenizer import Tokenizer
from dllama_py.text.tool_calls import (
    TOOL_CALL_OPEN,
    split_parallel_calls,
    tool_history_as_text,
    with_tools_system_prompt,
)


class ChatFormat:
    """A tokenizer plus the chat template to use with it."""

    def __init__(self, tokenizer: Tokenizer, template_choice: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.template = resolve_template(template_choice, tokenizer.chat_template)
        self.bos_text = self._piece_text(tokenizer.bos_id) if tokenizer.add_bos else ""
        first_eos = tokenizer.eos_ids[0] if tokenizer.eos_ids else None
        self.eos_text = self._piece_text(first_eos)
        stop_strings = end_of_turn_tokens(self.template, self.eos_text or None)
        ids = {tokenizer.token_to_id(s) for s in stop_strings}
        self.stop_ids = sorted({i for i in ids if i is not None} | set(tokenizer.eos_ids))

    def _piece_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self.tokenizer.id_to_piece(token_id).decode("utf-8", errors="replace")

    @property
    def renders_tools(self) -> bool:
        """Whether the template itself offers tools and renders tool calls (else `render` writes
        them as text: see `tools_system_prompt` in text/tool_calls.py)."""
        support = tool_support(self.template)
        return support.tools and support.tool_calls

    @property
    def call_style(self) -> str:
        """How the model writes a tool call: in <tool_call> tags (Qwen3, Hermes, and the system
        prompt offered when the template has no place for tools) or as a bare JSON object (Llama 3.x)."""
        if self.renders_tools and TOOL_CALL_OPEN not in self.template:
            return CALL_STYLE_JSON
        return CALL_STYLE_TAGGED

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
               tools: Sequence[dict[str, Any]] | None = None) -> str:
        """The conversation as the template writes it, `tools` offered to the model.

        Messages are in transformers' shape: `tool_calls` with arguments as objects, `tool`
        messages for results. A template with a place for tools renders all of it, as
        transformers' apply_chat_template does; otherwise the tools are offered in the system
        message and the calls and results are written as `<tool_call>` / `<tool_response>` text.
        A template that takes one call per message gets parallel calls as consecutive messages."""
        messages = list(messages)
        support = tool_support(self.template)
        if not self.renders_tools:
            messages = tool_history_as_text(messages)
            if tools:
                messages = with_tools_system_prompt(messages, tools)
            tools = None
        elif not support.tool_results:
            messages = tool_history_as_text(messages, calls=False)
        try:
            return self._render(messages, add_generation_prompt, tools)
        except TemplateError:
            if not any(len(m.get("tool_calls") or ()) > 1 for m in messages):
                raise
            return self._render(split_parallel_calls(messages), add_generation_prompt, tools)

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                tools: Sequence[dict[str, Any]] | None) -> str:
        return render_chat(self.template, messages, add_generation_prompt, bos_token=self.bos_text,
                           eos_token=self.eos_text, tools=list(tools) if tools else None)

    def encode(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
               tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of the rendered conversation (BOS once, special tokens as tokens)."""
        text = self.render(messages, add_generation_prompt, tools)
        starts_with_bos = bool(self.bos_text) and text.startswith(self.bos_text)
        ids = self.tokenizer.encode(text, add_bos=self.tokenizer.add_bos and not starts_with_bos,
                                    parse_special=True)
        return ids


class ChatSession:
    """A multi-turn conversation in the terminal (or any caller) over one generator."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, template_choice: str | None = None,
                 nbatches: int | None = None) -> None:
        self.format = ChatFormat(tokenizer, template_choice)
        self.generator = Generator(engine, tokenizer, nbatches)
        self.messages: list[dict[str, Any]] = []

    def add_system(self, text: str) -> None:
        self.messages.append({"role": "system", "content": text})

    def reply(self, user_text: str, sampler: Sampler, max_tokens: int,
              on_token: Callable[[TokenEvent], None] | None = None) -> GenerationResult:
        """Add the user's message, generate the assistant's answer, keep both in the history."""
        self.messages.append({"role": "user", "content": user_text})
        ids = self.format.encode(self.messages)
        result = self.generator.generate(ids, max_tokens, sampler, stop_ids=self.format.stop_ids, on_token=on_token)
        self.messages.append({"role": "assistant", "content": result.text})
        return result
