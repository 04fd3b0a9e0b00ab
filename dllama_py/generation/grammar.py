"""Constrained decoding: a grammar gives the token mask of every step, so the output is
guaranteed to match a JSON schema (response_format) or to be a valid tool call (tool_choice
'required' or a named function).

The grammar engine is llguidance (Microsoft; the one llama.cpp, vLLM, SGLang and OpenAI's own
structured outputs use): an Earley parser over a lazily built lexer, whose mask for a 128k
vocabulary costs tens of microseconds to a few milliseconds per token with no start-up
precomputation (docs/api.md gives the comparison with xgrammar and outlines-core made for this
choice). It sees the vocabulary as the raw bytes of every token, as this project's tokenizer
holds it, and the stop tokens of the request as its end-of-sequence tokens: when the grammar is
complete, only they are allowed, and the generation ends.

`Grammars(tokenizer)` builds llguidance's view of the vocabulary once per set of stop tokens;
`json_schema(...)` and `tool_calls(...)` compile a grammar (a 400 for a schema it cannot
compile); `Grammar.matcher()` starts one sequence's matcher, the sampler's `constraint`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import llguidance
import numpy as np

from dllama_py.engine.sampler import ConstraintError
from dllama_py.text.tokenizer import Tokenizer

CALL_STYLE_TAGGED = "tagged"  # Qwen3 / Hermes and the fallback prompt: <tool_call>{"name", "arguments"}</tool_call>
CALL_STYLE_JSON = "json"  # Llama 3.x: {"name": ..., "parameters": {...}}


# JSON with at most one space between its tokens: what models write ({"a": 1, "b": [2, 3]}) and
# compact JSON both match. (llguidance's item_separator/key_separator options would say it more
# exactly, but in 1.9.1 its masks then allow tokens its parser refuses.)
JSON_OPTIONS = {"whitespace_pattern": "[ ]?"}


def closed(schema: Any) -> Any:
    """`schema` with additionalProperties false in every object schema that lists properties and
    does not say: what OpenAI's strict mode requires, and what a tool call's arguments need (a
    model writes no useful argument the function does not declare)."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class GrammarError(ValueError):
    """A schema or grammar that cannot be compiled; the message says why."""


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: raw token bytes, ids, and an encoder."""

    def __init__(self, tokenizer: Tokenizer, stop_ids: Sequence[int]) -> None:
        self.tokens = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
        self.eos_token_id = stop_ids[0]
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(tokenizer.special_ids)
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode_continuation(text)


class Grammar:
    """A compiled grammar over one vocabulary; `matcher()` gives each sequence its own state."""

    def __init__(self, lltokenizer: llguidance.LLTokenizer, grammar: str, description: str) -> None:
        self.lltokenizer, self.grammar, self.description = lltokenizer, grammar, description
        probe = llguidance.LLMatcher(lltokenizer, grammar, log_level=0)
        if probe.is_error():
            raise GrammarError(f"{description}: {probe.get_error()}")
        self._first = probe

    def matcher(self) -> Matcher:
        return Matcher(self._first.deep_copy(), self.lltokenizer.vocab_size)


class Matcher:
    """One sequence's position in a grammar: the sampler's `constraint` (engine/sampler.py)."""

    def __init__(self, matcher: llguidance.LLMatcher, n_vocab: int) -> None:
        self.m = matcher
        self.words = (n_vocab + 31) // 32
        self.n_vocab = n_vocab

    def allowed(self, vocab_size: int) -> np.ndarray:
        bits = np.frombuffer(self.m.compute_bitmask(), dtype=np.uint8)
        if self.m.is_error():
            raise ConstraintError(f"the grammar failed: {self.m.get_error()}")
        mask = np.unpackbits(bits, bitorder="little")[:self.n_vocab].astype(bool)
        if vocab_size <= self.n_vocab:
            return mask[:vocab_size]
        return np.concatenate([mask, np.zeros(vocab_size - self.n_vocab, dtype=bool)])

    def accept(self, token: int) -> None:
        if not self.m.consume_token(token):
            raise ConstraintError(f"the grammar refused token {token}: {self.m.get_error()}")

    @property
    def finished(self) -> bool:
        """Whether nothing but an end of sequence can follow."""
        return self.m.is_stopped()

    @property
    def accepting(self) -> bool:
        return self.m.is_accepting()


class Grammars:
    """Grammars over one tokenizer's vocabulary (llguidance's view of it is built once per set of
    stop tokens: about a second for a 128k vocabulary)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._lltokenizers: dict[tuple[int, ...], llguidance.LLTokenizer] = {}
        self._lock = threading.Lock()

    def _lltokenizer(self, stop_ids: Sequence[int]) -> llguidance.LLTokenizer:
        key = tuple(stop_ids)
        if not key:
            raise GrammarError("constrained decoding needs an end-of-sequence token to end the output")
        with self._lock:
            if key not in self._lltokenizers:
                vocab = _Vocabulary(self.tokenizer, key)
                wrapper = llguidance.TokenizerWrapper(vocab)
                self._lltokenizers[key] = llguidance.LLTokenizer(
                    wrapper, n_vocab=self.tokenizer.vocab_size, eos_token=list(key))
            return self._lltokenizers[key]

    def _marker(self, text: str) -> str:
        """A grammar item for `text`: the special token that spells it when the vocabulary has one
        (Qwen3's <tool_call>), else the text."""
        token = self.tokenizer.token_to_id(text)
        if token is not None and token in self.tokenizer.special_ids:
            return f"<[{token}]>"
        return json.dumps(text)

    def json_schema(self, schema: dict[str, Any], stop_ids: Sequence[int]) -> Grammar:
        """JSON matching `schema` ({'type': 'object'} for any object: json_object)."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as error:
            raise GrammarError(f"the JSON schema cannot be used: {error}") from None
        return Grammar(self._lltokenizer(stop_ids), grammar, "the JSON schema cannot be used")

    def tool_calls(self, functions: Sequence[dict[str, Any]], style: str, stop_ids: Sequence[int],
                   parallel: bool = True) -> Grammar:
        """One call (or several, `parallel`, in the tagged style) of one of `functions`, whose
        arguments match the function's parameter schema, in the model's own form (`style`)."""
        key = "arguments" if style == CALL_STYLE_TAGGED else "parameters"
        alternatives = []
        for function in functions:
            parameters = closed(function.get("parameters") or {"type": "object", "properties": {}})
            alternatives.append({
                "type": "object",
                "properties": {"name": {"const": function["name"]}, key: parameters},
                "required": ["name", key],
                "additionalProperties": False,
            })
        schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
        if style == CALL_STYLE_TAGGED:
            opening, closing = self._marker("<tool_call>"), self._marker("</tool_call>")
            lines = ["%llguidance {}",
                     "start: call (NEWLINE call)*" if parallel else "start: call",
                     f"call: {opening} NEWLINE %json {json.dumps({**schema, 'x-guidance': JSON_OPTIONS})} "
                     f"NEWLINE {closing}",
                     'NEWLINE: "\\n"']
            grammar = llguidance.LLMatcher.grammar_from_lark("\n".join(lines) + "\n")
        else:
            try:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
            except (ValueError, TypeError) as error:
                raise GrammarError(f"the tools' parameters cannot be used as a JSON schema: {error}") from None
        return Grammar(self._lltokenizer(stop_ids), grammar, "the tools' parameters cannot be used")
