"""The tokenizer of a GGUF file, from its metadata, as this project's TokenizerFile.

GGUF keys read (llama.cpp's conventions, src/llama-vocab.cpp):

    tokenizer.ggml.model        required: "llama" (sentencepiece BPE: scores, `<0xNN>` byte tokens)
                                or "gpt2" (byte-level BPE ranked by tokenizer.ggml.merges)
    tokenizer.ggml.tokens       required: every token's text, by id
    tokenizer.ggml.token_type   1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
                                (absent: all normal, with a warning)
    tokenizer.ggml.scores       "llama": required, the merge priority; "gpt2": not used
    tokenizer.ggml.merges       "gpt2": required, "left right" in merge order
    tokenizer.ggml.pre          "gpt2": the pre-tokenizer, checked against what the vocabulary implies
    tokenizer.ggml.bos_token_id, eos_token_id, eot_token_id, eom_token_id, add_bos_token,
    add_eos_token, add_space_prefix, tokenizer.chat_template

The result is what convert-tokenizer writes for the same tokenizer's original files: the same
TokenizerSource builders (`from_sentencepiece`, `from_hf_bpe`) and the same BOS/EOS rules. A `.t`
file stores no tokenizer family or split pattern (dllama_py/text/tokenizer_kind.py infers them from
the vocabulary), so `tokenizer.ggml.pre` cannot override them: it is checked, and a disagreement
is a warning. Unused tokens (e.g. Qwen's `[PAD151669]` padding) are kept, so ids match the model's
embedding rows, and scored -inf so that no merge yields them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

from dllama_py.converter.convert_tokenizer import (
    builtin_chat_template,
    end_of_generation_ids,
    token_lookup,
    use_first_special_as_bos,
)
from dllama_py.converter.sentencepiece_model import (
    MODEL_BPE,
    PIECE_BYTE,
    PIECE_CONTROL,
    PIECE_NORMAL,
    PIECE_UNKNOWN,
    PIECE_UNUSED,
    PIECE_USER_DEFINED,
    SentencePieceModel,
)
from dllama_py.converter.tokenizer_sources import SourceError, TokenizerSource, from_hf_bpe, from_sentencepiece

from dllama_py.formats.tokenizer_file import TokenizerFile
from dllama_py.text.tokenizer_kind import KIND_LLAMA3, KIND_QWEN2, KIND_SENTENCEPIECE, infer_spec

MODEL_SENTENCEPIECE = "llama"
MODEL_BYTE_LEVEL = "gpt2"
TOKEN_TYPES = frozenset({PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED, PIECE_UNUSED, PIECE_BYTE})
# tokenizer.ggml.pre values whose rules this project implements, and the kind they need
PRE_TOKENIZER_KINDS = {
    "llama3": KIND_LLAMA3, "llama-v3": KIND_LLAMA3, "llama-bpe": KIND_LLAMA3, "falcon3": KIND_LLAMA3,
    "qwen2": KIND_QWEN2, "megrez": KIND_QWEN2, "stablelm2": KIND_QWEN2,
}
# llama.cpp prepends BOS by default for these byte-level pre-tokenizers only
ADD_BOS_BY_DEFAULT = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "tekken", "chameleon"})
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def tokenizer_file_from_gguf(metadata: Mapping[str, object], where: str) -> tuple[TokenizerFile, list[str]]:
    """Build the TokenizerFile that a GGUF file's tokenizer metadata describes.

    metadata: every GGUF metadata key -> its plain value (str, int, float, bool, or a list of them).
    where: the file name, for messages. Returns the validated TokenizerFile and warnings (one line
    each, naming `where`) about behaviour this project cannot reproduce. Raises SourceError naming
    `where` and the key when a key is missing, of the wrong type, inconsistent or unsupported.
    """
    keys = _Keys(metadata, where)
    model = keys.string("tokenizer.ggml.model")
    if model not in (MODEL_SENTENCEPIECE, MODEL_BYTE_LEVEL):
        raise SourceError(
            f"{where}: tokenizer.ggml.model '{model}' is not supported "
            f"(only '{MODEL_SENTENCEPIECE}', sentencepiece BPE, and '{MODEL_BYTE_LEVEL}', byte-level BPE)"
        )
    warnings: list[str] = []
    tokens = _tokens(keys, warnings)
    if "tokenizer.ggml.token_type" in metadata:
        types = list(keys.int_list("tokenizer.ggml.token_type", len(tokens)))
        bad = next((i for i, token_type in enumerate(types) if token_type not in TOKEN_TYPES), None)
        if bad is not None:
            raise SourceError(f"{where}: tokenizer.ggml.token_type[{bad}] is {types[bad]}, not a type 1..6")
    else:
        types = [PIECE_NORMAL] * len(tokens)
        warnings.append(f"{where}: no tokenizer.ggml.token_type: every token is taken as a normal one")
    bos_id = keys.token_id("tokenizer.ggml.bos_token_id", len(tokens))
    eos_id = keys.token_id("tokenizer.ggml.eos_token_id", len(tokens))
    if model == MODEL_SENTENCEPIECE:
        source = _sentencepiece_source(keys, tokens, types, bos_id, eos_id, warnings)
    else:
        source = _byte_level_source(keys, tokens, types, bos_id, eos_id)
    _apply_markers(keys, source, model)
    tokenizer_file = TokenizerFile.create(
        source.vocab, source.scores, source.bos_id, source.eos_ids, source.add_bos, source.chat_template
    )
    _check_kind(keys, tokenizer_file, model, warnings)
    if keys.boolean("tokenizer.ggml.add_eos_token"):
        warnings.append(f"{where}: tokenizer.ggml.add_eos_token is true, but prompts get no EOS appended here")
    architecture = metadata.get("general.architecture")
    declared_size = metadata.get(f"{architecture}.vocab_size") if isinstance(architecture, str) else None
    if isinstance(declared_size, int) and declared_size != len(tokens):
        warnings.append(f"{where}: {architecture}.vocab_size is {declared_size} but there are {len(tokens)} tokens")
    return tokenizer_file, source.warnings + warnings


class _Keys:
    """Typed access to the metadata: every problem is a SourceError naming the file and the key."""

    def __init__(self, metadata: Mapping[str, object], where: str) -> None:
        self.metadata = metadata
        self.where = where

    def _get(self, key: str) -> object:
        if key not in self.metadata:
            raise SourceError(f"{self.where}: GGUF metadata has no {key}")
        return self.metadata[key]

    def _wrong(self, key: str, value: object, expected: str) -> SourceError:
        return SourceError(f"{self.where}: {key} should be {expected}, got {type(value).__name__} {value!r:.60}")

    def string(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise self._wrong(key, value, "a string")
        return value

    def optional_string(self, key: str) -> str | None:
        return self.string(key) if key in self.metadata else None

    def boolean(self, key: str, default: bool = False) -> bool:
        if key not in self.metadata:
            return default
        value = self.metadata[key]
        if not isinstance(value, bool):
            raise self._wrong(key, value, "a boolean")
        return value

    def token_id(self, key: str, vocab_size: int) -> int | None:
        """An optional token id; it must lie inside the vocabulary."""
        if key not in self.metadata:
            return None
        value = self.metadata[key]
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._wrong(key, value, "a token id (integer)")
        if not 0 <= value < vocab_size:
            raise SourceError(f"{self.where}: {key} {value} is outside the vocabulary of {vocab_size} tokens")
        return value

    def _list(self, key: str, length: int | None) -> list | tuple:
        value = self._get(key)
        if not isinstance(value, (list, tuple)):
            raise self._wrong(key, value, "an array")
        if length is not None and len(value) != length:
            raise SourceError(
                f"{self.where}: {key} has {len(value)} entries for {length} tokens (tokenizer.ggml.tokens)"
            )
        return value

    def string_list(self, key: str, length: int | None = None) -> list[str] | tuple[str, ...]:
        values = self._list(key, length)
        bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
        if bad is not None:
            raise self._wrong(f"{key}[{bad}]", values[bad], "a string")
        return values

    def int_list(self, key: str, length: int) -> list[int] | tuple[int, ...]:
        values = self._list(key, length)
        bad = next((i for i, v in enumerate(values) if not isinstance(v, int) or isinstance(v, bool)), None)
        if bad is not None:
            raise self._wrong(f"{key}[{bad}]", values[bad], "an integer")
        return values

    def float_list(self, key: str, length: int) -> list[float]:
        values = self._list(key, length)
        bad = next((i for i, v in enumerate(values) if not isinstance(v, (int, float)) or isinstance(v, bool)), None)
        if bad is not None:
            raise self._wrong(f"{key}[{bad}]", values[bad], "a number")
        return [float(v) for v in values]


def _tokens(keys: _Keys, warnings: list[str]) -> list[str]:
    tokens = list(keys.string_list("tokenizer.ggml.tokens"))
    if not tokens:
        raise SourceError(f"{keys.where}: tokenizer.ggml.tokens is empty")
    for token_id, token in enumerate(tokens):
        if not token:  # llama.cpp names empty tokens the same way
            tokens[token_id] = f"[EMPTY_{token_id}]"
            warnings.append(f"{keys.where}: tokenizer.ggml.tokens[{token_id}] is empty; named '{tokens[token_id]}'")
    if len(set(tokens)) != len(tokens):
        seen: dict[str, int] = {}
        for token_id, token in enumerate(tokens):
            if token in seen:
                raise SourceError(
                    f"{keys.where}: tokenizer.ggml.tokens[{token_id}] {token!r} repeats token {seen[token]}"
                )
            seen[token] = token_id
    return tokens


def _sentencepiece_source(
    keys: _Keys, tokens: list[str], types: list[int], bos_id: int | None, eos_id: int | None, warnings: list[str]
) -> TokenizerSource:
    """A "llama" vocabulary is a sentencepiece BPE model's pieces: read it as one."""
    scores = keys.float_list("tokenizer.ggml.scores", len(tokens))
    for token_id, (token, token_type) in enumerate(zip(tokens, types)):
        if token_type == PIECE_BYTE and not _BYTE_TOKEN.fullmatch(token):
            raise SourceError(f"{keys.where}: byte token {token_id} is {token!r}, not '<0xNN>' (tokenizer.ggml.tokens)")
    if not keys.boolean("tokenizer.ggml.add_space_prefix", default=True):
        warnings.append(
            f"{keys.where}: tokenizer.ggml.add_space_prefix is false, but a space is put before the text here"
        )
    model = SentencePieceModel(
        pieces=tuple(tokens),
        scores=tuple(scores),
        types=tuple(types),
        model_type=MODEL_BPE,
        bos_id=1 if bos_id is None else bos_id,  # llama.cpp's defaults for "llama"
        eos_id=2 if eos_id is None else eos_id,
        unk_id=0,
        byte_fallback=PIECE_BYTE in types,
        normalizer_name="identity",  # llama.cpp applies no normalizer
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
    )
    return from_sentencepiece(model, keys.where)


def _byte_level_source(
    keys: _Keys, tokens: list[str], types: list[int], bos_id: int | None, eos_id: int | None
) -> TokenizerSource:
    """A "gpt2" vocabulary: normal tokens are GPT-2 byte-level text, the others their raw text."""
    merges: list[tuple[str, str]] = []
    for index, line in enumerate(keys.string_list("tokenizer.ggml.merges")):
        left, space, right = line.partition(" ")
        if not space or not left or not right or " " in right:
            raise SourceError(f"{keys.where}: tokenizer.ggml.merges[{index}] is {line!r}, not 'left right'")
        merges.append((left, right))
    vocab_map = {token: i for i, (token, token_type) in enumerate(zip(tokens, types)) if token_type == PIECE_NORMAL}
    added = {token: i for i, (token, token_type) in enumerate(zip(tokens, types)) if token_type != PIECE_NORMAL}
    source = from_hf_bpe(vocab_map, merges, added, f"{keys.where} (tokenizer.ggml.tokens)", byte_level=True)
    for token_id, token_type in enumerate(types):
        if token_type == PIECE_UNUSED:  # raw text like the specials, but never matched nor merged
            source.scores[token_id] = -math.inf
            del source.special_tokens[tokens[token_id]]
    source.bos_id = bos_id
    source.eos_ids = [] if eos_id is None else [eos_id]
    pre = keys.optional_string("tokenizer.ggml.pre")
    source.add_bos = pre in ADD_BOS_BY_DEFAULT
    return source


def _apply_markers(keys: _Keys, source: TokenizerSource, model: str) -> None:
    """add_bos, chat template, BOS fallback and the EOS list, by convert-tokenizer's rules."""
    source.add_bos = keys.boolean("tokenizer.ggml.add_bos_token", default=source.add_bos)
    if source.add_bos and source.bos_id is None:
        raise SourceError(f"{keys.where}: tokenizer.ggml.add_bos_token is true but there is no bos_token_id")
    template = keys.optional_string("tokenizer.chat_template")
    source.chat_template = template or builtin_chat_template(source)
    if model == MODEL_BYTE_LEVEL:
        use_first_special_as_bos(source)
    declared = list(source.eos_ids)
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        token_id = keys.token_id(key, len(source.vocab))
        if token_id is not None:
            declared.append(token_id)
    source.eos_ids = end_of_generation_ids(source, token_lookup(source), declared)


def _check_kind(keys: _Keys, tokenizer_file: TokenizerFile, model: str, warnings: list[str]) -> None:
    """The family inferred from the vocabulary must be the one the file names."""
    spec = infer_spec(tokenizer_file)
    where = keys.where
    if model == MODEL_SENTENCEPIECE:
        if spec.kind != KIND_SENTENCEPIECE:
            raise SourceError(
                f"{where}: tokenizer.ggml.model is 'llama' but the vocabulary reads as byte-level BPE "
                f"('{spec.kind}'): its 256 byte tokens are not one block of `<0xNN>` tokens"
            )
        if spec.remove_extra_whitespaces:
            warnings.append(
                f"{where}: runs of spaces are collapsed when encoding (sentencepiece's rule for a vocabulary "
                "with no multi-space piece); llama.cpp keeps them"
            )
        return
    if spec.kind == KIND_SENTENCEPIECE:
        raise SourceError(
            f"{where}: tokenizer.ggml.model is 'gpt2' but the vocabulary lacks some of the 256 single-byte tokens"
        )
    pre = keys.optional_string("tokenizer.ggml.pre")
    if pre is None:
        warnings.append(f"{where}: no tokenizer.ggml.pre; text is split by the '{spec.kind}' rules")
    elif pre not in PRE_TOKENIZER_KINDS:
        warnings.append(
            f"{where}: tokenizer.ggml.pre '{pre}' is not implemented here; text is split by the "
            f"'{spec.kind}' rules, so encodings may differ from llama.cpp"
        )
    elif PRE_TOKENIZER_KINDS[pre] != spec.kind:
        warnings.append(
            f"{where}: tokenizer.ggml.pre '{pre}' needs the '{PRE_TOKENIZER_KINDS[pre]}' rules but the "
            f"vocabulary reads as '{spec.kind}' (digit tokens); encodings may differ from llama.cpp"
        )


def read_tokenizer(path: str | Path):  # -> tuple[Tokenizer, list[str]]
    """The tokenizer a GGUF file carries in its metadata, with the warnings about it."""
    from dllama_py.formats.gguf_file import read_metadata
    from dllama_py.text.tokenizer import Tokenizer

    tokenizer_file, warnings = tokenizer_file_from_gguf(read_metadata(path), str(path))
    return Tokenizer(tokenizer_file), warnings
