"""Read and write distributed-llama's tokenizer file (`.t`), byte-compatible with upstream.

Current layout (magic 0x567124), all integers little-endian int32:

    magic, header_size (= 8 + 8*K), K x (key, value)
    [chat_stop bytes, length = value of key 8]       (legacy; skipped on read, never written)
    [chat_template bytes, length = value of key 7]    (UTF-8, no NUL)
    [n_eos_tokens x int32 eos id]                    (key 9)
    vocab_size x (float32 score, uint32 len, len raw bytes)   (len > 0)

Header keys: 0 version (must be 1), 1 vocab_size, 2 max_token_length (>= 1), 3 bos_id,
4 eos_id (legacy, appended to the EOS list), 5 pad_id (ignored), 6 chat_eos_id (legacy,
appended), 7 chat_template length, 8 chat_stop length (legacy, skipped), 9 n_eos_tokens,
10 add_bos. Any other key is an error, as in distributed-llama's loader, which is why this
project stores nothing beyond these keys (see docs/tokenizer.md for what is inferred instead).

The writer emits keys in upstream's order: bos_id, version, vocab_size, max_token_length,
[chat_template], n_eos_tokens, add_bos, so a file converted from the same source is
byte-identical to the one distributed-llama's converter writes.

Legacy layout (magic 0x567123): magic, then uint32 vocab_size, uint32 max_token_length,
int32 bos_id, int32 eos_id, int32 pad_id, then the vocabulary as above. Read only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = 0x567124
LEGACY_MAGIC = 0x567123

KEY_VERSION = 0
KEY_VOCAB_SIZE = 1
KEY_MAX_TOKEN_LENGTH = 2
KEY_BOS_ID = 3
KEY_EOS_ID = 4
KEY_PAD_ID = 5
KEY_CHAT_EOS_ID = 6
KEY_CHAT_TEMPLATE = 7
KEY_CHAT_STOP = 8
KEY_N_EOS_TOKENS = 9
KEY_ADD_BOS = 10
KNOWN_KEYS = frozenset(range(11))


class TokenizerFormatError(ValueError):
    """A `.t` file (or a TokenizerFile to be written) is malformed; the message names the file."""


@dataclass(frozen=True)
class TokenizerFile:
    """The content of a `.t` file.

    vocab: the raw bytes of every token, indexed by id (no `▁` escapes, byte tokens as the byte).
    scores: one float32 score per token (merge priority: higher merges first).
    bos_id: id of the beginning-of-sequence token, or None when the file has none.
    eos_ids: every id that ends generation, in file order (the first is upstream's "eos" text).
    add_bos: whether encode() prepends BOS by default.
    chat_template: the Jinja chat template, or None.
    max_token_length: the longest token in bytes (upstream sizes its decode buffer from it).
    """

    vocab: tuple[bytes, ...]
    scores: tuple[float, ...]
    bos_id: int | None
    eos_ids: tuple[int, ...]
    add_bos: bool
    chat_template: str | None
    max_token_length: int

    @property
    def vocab_size(self) -> int:
        """Number of tokens."""
        return len(self.vocab)

    @classmethod
    def create(
        cls,
        vocab: list[bytes] | tuple[bytes, ...],
        scores: list[float] | tuple[float, ...],
        bos_id: int | None,
        eos_ids: list[int] | tuple[int, ...],
        add_bos: bool = True,
        chat_template: str | None = None,
    ) -> TokenizerFile:
        """Build a validated TokenizerFile, computing max_token_length from the vocabulary."""
        vocab = tuple(bytes(piece) for piece in vocab)
        tokenizer_file = cls(
            vocab=vocab,
            scores=tuple(float(score) for score in scores),
            bos_id=bos_id,
            eos_ids=tuple(int(i) for i in eos_ids),
            add_bos=bool(add_bos),
            chat_template=chat_template,
            max_token_length=max((len(piece) for piece in vocab), default=0),
        )
        tokenizer_file.validate("<new tokenizer>")
        return tokenizer_file

    def validate(self, where: str) -> None:
        """Raise TokenizerFormatError (naming `where`) if any field is out of range."""
        size = len(self.vocab)
        if size < 1:
            raise TokenizerFormatError(f"{where}: vocabulary is empty")
        if len(self.scores) != size:
            raise TokenizerFormatError(f"{where}: {len(self.scores)} scores for {size} tokens")
        for token_id, piece in enumerate(self.vocab):
            if not piece:
                raise TokenizerFormatError(f"{where}: token {token_id} is empty (length 0)")
        if self.max_token_length < 1:
            raise TokenizerFormatError(f"{where}: max_token_length {self.max_token_length} < 1")
        if self.bos_id is not None and not 0 <= self.bos_id < size:
            raise TokenizerFormatError(f"{where}: bos_id {self.bos_id} outside vocabulary of {size}")
        for eos_id in self.eos_ids:
            if not 0 <= eos_id < size:
                raise TokenizerFormatError(f"{where}: eos id {eos_id} outside vocabulary of {size}")


class _Reader:
    """Sequential little-endian reader that reports truncation with the file name and offset."""

    def __init__(self, data: bytes, where: str) -> None:
        self.data = data
        self.where = where
        self.offset = 0

    def take(self, size: int, what: str) -> bytes:
        end = self.offset + size
        if size < 0 or end > len(self.data):
            raise TokenizerFormatError(
                f"{self.where}: truncated: need {size} bytes for {what} at offset {self.offset}, "
                f"file has {len(self.data)} bytes"
            )
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def int32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]

    def uint32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]


def read_tokenizer_file(path: str | Path) -> TokenizerFile:
    """Read a `.t` file (current or legacy magic) and return its validated content."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TokenizerFormatError(f"{path}: cannot read tokenizer file: {error.strerror}") from error
    return parse_tokenizer_bytes(data, str(path))


def parse_tokenizer_bytes(data: bytes, where: str = "<bytes>") -> TokenizerFile:
    """Parse the bytes of a `.t` file; `where` names the source in error messages."""
    reader = _Reader(data, where)
    magic = reader.int32("magic")
    if magic == LEGACY_MAGIC:
        vocab_size = reader.uint32("vocab_size")
        max_token_length = reader.uint32("max_token_length")
        bos_id = reader.int32("bos_id")
        eos_ids = [reader.int32("eos_id")]
        reader.int32("pad_id")
        add_bos, chat_template = True, None
    elif magic == MAGIC:
        vocab_size, max_token_length, bos_id, eos_ids, add_bos, chat_template = _read_header(reader)
    else:
        raise TokenizerFormatError(
            f"{where}: bad magic 0x{magic & 0xFFFFFFFF:x}, expected 0x{MAGIC:x} "
            f"(or legacy 0x{LEGACY_MAGIC:x}); is this a distributed-llama tokenizer file?"
        )
    if vocab_size < 1:
        raise TokenizerFormatError(f"{where}: vocab_size {vocab_size} must be >= 1")
    vocab, scores = _read_vocab(reader, vocab_size)
    if reader.offset != len(data):
        raise TokenizerFormatError(
            f"{where}: {len(data) - reader.offset} unexpected bytes after the last token "
            f"(vocab_size {vocab_size} ends at offset {reader.offset})"
        )
    tokenizer_file = TokenizerFile(
        vocab=vocab,
        scores=scores,
        bos_id=None if bos_id < 0 else bos_id,
        eos_ids=tuple(eos_ids),
        add_bos=add_bos,
        chat_template=chat_template,
        max_token_length=max_token_length,
    )
    tokenizer_file.validate(where)
    return tokenizer_file


def _read_header(reader: _Reader) -> tuple[int, int, int, list[int], bool, str | None]:
    where = reader.where
    header_size = reader.int32("header size")
    if header_size < 8 or (header_size - 8) % 8 != 0:
        raise TokenizerFormatError(f"{where}: bad header size {header_size} (must be 8 + 8*K)")
    values: dict[int, int] = {}
    eos_ids: list[int] = []
    count = (header_size - 8) // 8
    pairs = [(reader.int32("header key"), reader.int32("header value")) for _ in range(count)]
    for key, value in pairs:
        if key not in KNOWN_KEYS:
            raise TokenizerFormatError(f"{where}: unknown header key {key} (value {value})")
        if key in values and key not in (KEY_EOS_ID, KEY_CHAT_EOS_ID):
            raise TokenizerFormatError(f"{where}: header key {key} appears twice")
        values[key] = value
        if key in (KEY_EOS_ID, KEY_CHAT_EOS_ID):
            eos_ids.append(value)
        elif key == KEY_CHAT_STOP:
            reader.take(value, "legacy chat_stop text")  # upstream skips these bytes right away
    if values.get(KEY_VERSION) != 1:
        raise TokenizerFormatError(
            f"{where}: tokenizer version {values.get(KEY_VERSION)} is not 1 (old format, regenerate it)"
        )
    for key, name in ((KEY_VOCAB_SIZE, "vocab_size"), (KEY_MAX_TOKEN_LENGTH, "max_token_length")):
        if key not in values:
            raise TokenizerFormatError(f"{where}: header has no {name} (key {key})")
    template_length = values.get(KEY_CHAT_TEMPLATE, 0)
    chat_template = None
    if template_length > 0:
        raw = reader.take(template_length, "chat template")
        try:
            chat_template = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise TokenizerFormatError(f"{where}: chat template is not valid UTF-8 ({error})") from error
    n_eos = values.get(KEY_N_EOS_TOKENS, 0)
    if n_eos < 0:
        raise TokenizerFormatError(f"{where}: n_eos_tokens {n_eos} is negative")
    eos_ids.extend(reader.int32("eos token id") for _ in range(n_eos))
    add_bos = values.get(KEY_ADD_BOS, 1) == 1  # upstream leaves it uninitialised when absent
    return (
        values[KEY_VOCAB_SIZE],
        values[KEY_MAX_TOKEN_LENGTH],
        values.get(KEY_BOS_ID, -1),
        eos_ids,
        add_bos,
        chat_template,
    )


def _read_vocab(reader: _Reader, vocab_size: int) -> tuple[tuple[bytes, ...], tuple[float, ...]]:
    data, offset, end = reader.data, reader.offset, len(reader.data)
    unpack = struct.Struct("<fI").unpack_from
    vocab: list[bytes] = []
    scores: list[float] = []
    for token_id in range(vocab_size):
        if offset + 8 > end:
            raise TokenizerFormatError(
                f"{reader.where}: truncated: token {token_id} of {vocab_size} starts at offset {offset}, "
                f"file has {end} bytes"
            )
        score, length = unpack(data, offset)
        offset += 8
        if length == 0:
            raise TokenizerFormatError(
                f"{reader.where}: token {token_id} has length 0 at offset {offset - 4}"
            )
        if offset + length > end:
            raise TokenizerFormatError(
                f"{reader.where}: truncated: token {token_id} needs {length} bytes at offset {offset}, "
                f"file has {end} bytes"
            )
        vocab.append(data[offset : offset + length])
        scores.append(score)
        offset += length
    reader.offset = offset
    return tuple(vocab), tuple(scores)


def tokenizer_file_bytes(tokenizer_file: TokenizerFile) -> bytes:
    """Serialise a TokenizerFile in the current format with upstream's key order."""
    tokenizer_file.validate("<tokenizer to write>")
    template = tokenizer_file.chat_template.encode("utf-8") if tokenizer_file.chat_template else b""
    pairs: list[tuple[int, int]] = []
    if tokenizer_file.bos_id is not None:
        pairs.append((KEY_BOS_ID, tokenizer_file.bos_id))
    pairs += [
        (KEY_VERSION, 1),
        (KEY_VOCAB_SIZE, tokenizer_file.vocab_size),
        (KEY_MAX_TOKEN_LENGTH, tokenizer_file.max_token_length),
    ]
    if template:
        pairs.append((KEY_CHAT_TEMPLATE, len(template)))
    pairs += [(KEY_N_EOS_TOKENS, len(tokenizer_file.eos_ids)), (KEY_ADD_BOS, int(tokenizer_file.add_bos))]
    parts = [struct.pack("<ii", MAGIC, 8 + 8 * len(pairs))]
    parts += [struct.pack("<ii", key, value) for key, value in pairs]
    parts.append(template)
    parts += [struct.pack("<i", eos_id) for eos_id in tokenizer_file.eos_ids]
    pack = struct.Struct("<fI").pack
    for piece, score in zip(tokenizer_file.vocab, tokenizer_file.scores):
        parts.append(pack(score, len(piece)))
        parts.append(piece)
    return b"".join(parts)


def write_tokenizer_file(path: str | Path, tokenizer_file: TokenizerFile) -> None:
    """Write a TokenizerFile to `path` (current format, upstream key order)."""
    Path(path).write_bytes(tokenizer_file_bytes(tokenizer_file))
