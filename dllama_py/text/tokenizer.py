"""Exact tokenizer over a distributed-llama `.t` file (pure Python: `regex` only).

`Tokenizer.load(path).encode(text)` gives the same ids as sentencepiece (Llama 2, tok512),
tiktoken (Llama 3) and Hugging Face tokenizers (Qwen2/Qwen3) for files written by
`convert-tokenizer`. The `.t` format has no room for the tokenizer family, so it is inferred
from the vocabulary (see `dllama_py.text.tokenizer_kind` and docs/tokenizer.md):

1. special tokens in the text are matched as whole tokens (longest first) when
   `parse_special` is true: the default for byte-level BPE (HF added tokens, tiktoken
   `allowed_special="all"`), off for sentencepiece (which never matches `<s>` in text);
2. each remaining segment is normalised (sentencepiece: `▁` -> space, optional collapse of
   space runs, dummy-prefix space; Qwen: NFC) and pre-tokenized (the Llama 3 or Qwen2 regex;
   for sentencepiece, a split before every space that follows a non-space, exact because no
   piece contains such a pair — checked at load);
3. every pre-token is BPE-merged by the scores (higher merges first, ties leftmost) and cached.
   Sentencepiece symbols that are not in the vocabulary fall back to their UTF-8 byte tokens.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from pathlib import Path

import regex

from dllama_py.formats.tokenizer_file import TokenizerFile, read_tokenizer_file
from dllama_py.text.bpe import bpe_merge
from dllama_py.text.tokenizer_kind import KIND_SENTENCEPIECE, TokenizerSpec, infer_spec, merge_ranks

_CACHE_LIMIT = 200_000
_SPACE_PRETOKEN = regex.compile(r" *[^ ]+| +")
_SPACE_RUN = regex.compile(r" {2,}")


class Tokenizer:
    """Encode text to token ids and back, exactly as the tokenizer the `.t` file came from."""

    def __init__(self, tokenizer_file: TokenizerFile) -> None:
        """Build a tokenizer from a parsed `.t` file (see `Tokenizer.load`)."""
        self.file = tokenizer_file
        self.spec: TokenizerSpec = infer_spec(tokenizer_file)
        self._ranks = merge_ranks(tokenizer_file, self.spec)
        self._piece_to_id: dict[bytes, int] = {}
        byte_block = self._byte_block_range()
        for token_id, piece in enumerate(tokenizer_file.vocab):
            if token_id not in self.spec.special_ids and token_id not in byte_block:
                self._piece_to_id.setdefault(piece, token_id)
        self._special_to_id: dict[str, int] = {}
        for token_id in sorted(self.spec.special_ids):
            try:
                self._special_to_id.setdefault(tokenizer_file.vocab[token_id].decode("utf-8"), token_id)
            except UnicodeDecodeError:
                continue
        ordered = sorted(self._special_to_id, key=len, reverse=True)
        self._special_pattern = regex.compile("|".join(regex.escape(s) for s in ordered)) if ordered else None
        self._special_first_chars = frozenset(s[0] for s in ordered)
        self._pretoken_pattern = regex.compile(self.spec.split_pattern) if self.spec.split_pattern else None
        self._split_on_spaces = self.spec.kind == KIND_SENTENCEPIECE and not any(
            _has_space_after_non_space(piece) for piece in self._ranks
        )
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a `.t` file (current or legacy format) and build its tokenizer."""
        return cls(read_tokenizer_file(path))

    # ---- properties -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        return self.file.vocab_size

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None."""
        return self.file.bos_id

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """All ids that end generation."""
        return self.file.eos_ids

    @property
    def add_bos(self) -> bool:
        """Whether the file asks for BOS at the start of a prompt."""
        return self.file.add_bos

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template stored in the file, or None."""
        return self.file.chat_template

    @property
    def kind(self) -> str:
        """Inferred family: 'sentencepiece', 'llama3' or 'qwen2'."""
        return self.spec.kind

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of control / added tokens."""
        return self.spec.special_ids

    def id_to_piece(self, token_id: int) -> bytes:
        """The raw bytes of one token."""
        self._check_id(token_id)
        return self.file.vocab[token_id]

    def token_to_id(self, text: str) -> int | None:
        """Id of a special token given its text (e.g. '<|eot_id|>'), else of a regular piece."""
        if text in self._special_to_id:
            return self._special_to_id[text]
        return self._piece_to_id.get(text.encode("utf-8"))

    # ---- encode -----------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True, parse_special: bool | None = None) -> list[int]:
        """Token ids for `text`, with BOS first when `add_bos` and the vocabulary has one.

        parse_special: match special-token strings in the text as single tokens; None picks the
        reference library's behaviour (True for byte-level BPE, False for sentencepiece).
        """
        ids: list[int] = [self.bos_id] if add_bos and self.bos_id is not None else []
        if parse_special is None:
            parse_special = self.spec.kind != KIND_SENTENCEPIECE
        at_start = True
        for segment, special_id in self._split_special(text, parse_special):
            if special_id is not None:
                ids.append(special_id)
            elif segment:
                ids.extend(self._encode_ordinary(segment, at_start))
            at_start = False
        return ids

    def encode_continuation(self, text: str) -> list[int]:
        """Token ids for `text` as it would continue other text: no BOS, no sentencepiece dummy
        prefix, special-token strings taken as text (what a grammar engine tokenizes)."""
        return self._encode_ordinary(text, at_start=False) if text else []

    def _split_special(self, text: str, parse_special: bool) -> Iterable[tuple[str, int | None]]:
        if not parse_special or self._special_pattern is None:
            return [(text, None)]
        if not any(char in text for char in self._special_first_chars):
            return [(text, None)]
        segments: list[tuple[str, int | None]] = []
        position = 0
        for match in self._special_pattern.finditer(text):
            segments.append((text[position : match.start()], None))
            segments.append((match.group(), self._special_to_id[match.group()]))
            position = match.end()
        segments.append((text[position:], None))
        return segments

    def _encode_ordinary(self, text: str, at_start: bool) -> list[int]:
        if self.spec.kind == KIND_SENTENCEPIECE:
            if self.spec.remove_extra_whitespaces:
                # sentencepiece collapses runs of ' ' and drops leading ones in the input, then
                # escapes (a literal '▁' is a space from here on) and drops trailing spaces
                text = _SPACE_RUN.sub(" ", text).lstrip(" ").replace("\u2581", " ").rstrip(" ")
            else:
                text = text.replace("\u2581", " ")
            if not text:
                return []
            if at_start:
                text = " " + text
            pretokens = _SPACE_PRETOKEN.findall(text) if self._split_on_spaces else [text]
        else:
            if self.spec.normalize_nfc:
                text = unicodedata.normalize("NFC", text)
            assert self._pretoken_pattern is not None
            pretokens = self._pretoken_pattern.findall(text)
        ids: list[int] = []
        cache = self._cache
        for pretoken in pretokens:
            cached = cache.get(pretoken)
            if cached is None:
                cached = self._encode_pretoken(pretoken)
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[pretoken] = cached
            ids.extend(cached)
        return ids

    def _encode_pretoken(self, pretoken: str) -> tuple[int, ...]:
        piece_to_id = self._piece_to_id
        if self.spec.kind == KIND_SENTENCEPIECE:
            parts = [char.encode("utf-8") for char in pretoken]
        else:
            data = pretoken.encode("utf-8")
            if self.spec.whole_pretoken_lookup and data in piece_to_id:
                return (piece_to_id[data],)
            parts = [data[i : i + 1] for i in range(len(data))]
        ids: list[int] = []
        for part in bpe_merge(parts, self._ranks):
            token_id = piece_to_id.get(part)
            if token_id is not None:
                ids.append(token_id)
            else:
                ids.extend(self._fallback(part))
        return tuple(ids)

    def _fallback(self, part: bytes) -> list[int]:
        offset = self.spec.byte_fallback_offset
        if offset is not None:
            return [offset + byte for byte in part]
        if self.spec.unknown_id is None:
            raise ValueError(f"cannot encode {part!r}: not in the vocabulary and no <unk> token")
        return [self.spec.unknown_id]

    # ---- decode -----------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special_tokens: bool | None = None) -> str:
        """Text for `ids`; invalid UTF-8 becomes U+FFFD.

        skip_special_tokens: None follows the reference library (sentencepiece drops control
        tokens; HF/tiktoken keep their text). Sentencepiece also drops the dummy-prefix space.
        """
        pieces = [piece for _, piece in self._pieces(ids, skip_special_tokens)]
        data = b"".join(pieces)
        if self.spec.kind == KIND_SENTENCEPIECE and data.startswith(b" "):
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def _pieces(self, ids: Iterable[int], skip_special_tokens: bool | None) -> Iterable[tuple[int, bytes]]:
        if skip_special_tokens is None:
            skip_special_tokens = self.spec.kind == KIND_SENTENCEPIECE
        for token_id in ids:
            self._check_id(token_id)
            if skip_special_tokens and token_id in self.spec.special_ids:
                continue
            yield token_id, self.file.vocab[token_id]

    def stream_decoder(self, skip_special_tokens: bool | None = None) -> StreamDecoder:
        """A decoder for one generated stream (see StreamDecoder)."""
        return StreamDecoder(self, skip_special_tokens)

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.file.vocab_size:
            raise ValueError(f"token id {token_id} outside vocabulary of {self.file.vocab_size}")

    def _byte_block_range(self) -> range:
        offset = self.spec.byte_fallback_offset
        return range(offset, offset + 256) if offset is not None else range(0)


class StreamDecoder:
    """Turns ids into text one at a time, emitting only complete UTF-8 characters.

    Bytes of a character split over several tokens are held back until it is complete;
    bytes that can never form a character are emitted as U+FFFD. Call `flush()` at the end.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool | None = None) -> None:
        """Start an empty stream over `tokenizer`."""
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._pending = b""

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now complete (possibly '')."""
        for _, piece in self._tokenizer._pieces((token_id,), self._skip):
            self._pending += piece
        complete = _complete_utf8_length(self._pending)
        text = self._pending[:complete].decode("utf-8", errors="replace")
        self._pending = self._pending[complete:]
        return text

    def flush(self) -> str:
        """Return whatever is still pending (incomplete bytes become U+FFFD) and reset."""
        text = self._pending.decode("utf-8", errors="replace")
        self._pending = b""
        return text


def _complete_utf8_length(data: bytes) -> int:
    """Length of the prefix of `data` that does not end inside an unfinished UTF-8 character."""
    size = len(data)
    for back in range(1, min(4, size) + 1):
        byte = data[size - back]
        if byte & 0xC0 == 0x80:
            continue  # continuation byte: look further back for the lead byte
        if 0xF0 <= byte <= 0xF7:
            needed = 4
        elif 0xE0 <= byte <= 0xEF:
            needed = 3
        elif 0xC0 <= byte <= 0xDF:
            needed = 2
        else:
            needed = 1
        return size - back if back < needed else size
    return size


def _has_space_after_non_space(piece: bytes) -> bool:
    return any(piece[i] != 0x20 and piece[i + 1] == 0x20 for i in range(len(piece) - 1))
