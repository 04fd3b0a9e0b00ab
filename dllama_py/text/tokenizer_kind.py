"""Infer how to tokenize from the content of a `.t` file.

distributed-llama's loader rejects unknown header keys, so a `.t` file cannot say which
tokenizer family it holds. Everything the exact encoder needs is inferred from the vocabulary
instead (see docs/tokenizer.md):

* sentencepiece BPE (Llama 2, tok512): 256 consecutive ids hold the single bytes 0x00..0xFF in
  order (sentencepiece's `<0xNN>` byte-fallback pieces, written as the raw byte). Control
  tokens are the ids before that block plus BOS/EOS. Text is escaped (`▁` -> space), gets a
  dummy-prefix space, and `remove_extra_whitespaces` is inferred as "no regular piece contains
  two spaces" (such pieces could never be produced if runs of spaces were collapsed).
* byte-level BPE: every single byte is a token but not as one ordered block (tiktoken and
  GPT-2 order bytes differently). Special tokens are the ids from BOS upwards (upstream's rule)
  plus the EOS ids. If the vocabulary has a regular token made of 2+ ASCII digits, numbers are
  pre-split in groups of up to three: the Llama 3 pattern, where a whole pre-token found in the
  vocabulary is taken as is (tiktoken; HF's `ignore_merges`). Otherwise digits are single: the
  Qwen2/Qwen3 pattern with NFC normalisation, where pre-tokens always go through the merges.

Merge priority is the score (higher merges first, ties leftmost), stored by the converter as
the sentencepiece score or as -rank for byte-level BPE (rank = tiktoken rank, or 256 + the
merges.txt line index). Tokens scored -inf are never the result of a merge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dllama_py.formats.tokenizer_file import TokenizerFile

KIND_SENTENCEPIECE = "sentencepiece"
KIND_LLAMA3 = "llama3"
KIND_QWEN2 = "qwen2"

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class TokenizerSpec:
    """How to encode with a given vocabulary (all of it inferred, nothing stored)."""

    kind: str
    special_ids: frozenset[int]
    byte_fallback_offset: int | None  # id of byte 0x00 in a sentencepiece vocabulary
    unknown_id: int | None
    remove_extra_whitespaces: bool
    split_pattern: str | None
    normalize_nfc: bool
    whole_pretoken_lookup: bool


def find_byte_block(vocab: tuple[bytes, ...]) -> int | None:
    """Return the id of byte 0x00 if 256 consecutive ids hold bytes 0x00..0xFF in order."""
    for start, piece in enumerate(vocab):
        if piece == b"\x00" and start + 256 <= len(vocab):
            if all(vocab[start + value] == bytes((value,)) for value in range(256)):
                return start
    return None


def infer_spec(tokenizer_file: TokenizerFile) -> TokenizerSpec:
    """Work out the tokenizer family and its encoding rules from a `.t` file's content."""
    vocab = tokenizer_file.vocab
    markers = {i for i in tokenizer_file.eos_ids}
    if tokenizer_file.bos_id is not None:
        markers.add(tokenizer_file.bos_id)
    byte_block = find_byte_block(vocab)
    has_all_bytes = len({piece for piece in vocab if len(piece) == 1}) == 256
    if byte_block is not None or not has_all_bytes:
        specials = set(markers)
        if byte_block is not None:
            specials.update(range(byte_block))
        control_names = (b"<unk>", b"<pad>", b"<s>", b"</s>")
        specials.update(i for i, piece in enumerate(vocab[:16]) if piece in control_names)
        unknown = next((i for i, piece in enumerate(vocab) if piece == b"<unk>"), None)
        regular = (piece for i, piece in enumerate(vocab) if i not in specials)
        collapses_spaces = not any(b"  " in piece for piece in regular)
        return TokenizerSpec(
            kind=KIND_SENTENCEPIECE,
            special_ids=frozenset(specials),
            byte_fallback_offset=byte_block,
            unknown_id=unknown,
            remove_extra_whitespaces=collapses_spaces,
            split_pattern=None,
            normalize_nfc=False,
            whole_pretoken_lookup=False,
        )
    bos_id = tokenizer_file.bos_id
    specials = set(markers)
    if bos_id is not None and bos_id >= 256:
        specials.update(range(bos_id, len(vocab)))
    grouped_digits = any(
        len(piece) > 1 and piece.isdigit() and i not in specials for i, piece in enumerate(vocab)
    )
    return TokenizerSpec(
        kind=KIND_LLAMA3 if grouped_digits else KIND_QWEN2,
        special_ids=frozenset(specials),
        byte_fallback_offset=None,
        unknown_id=None,
        remove_extra_whitespaces=False,
        split_pattern=LLAMA3_PATTERN if grouped_digits else QWEN2_PATTERN,
        normalize_nfc=not grouped_digits,
        whole_pretoken_lookup=grouped_digits,
    )


def merge_ranks(tokenizer_file: TokenizerFile, spec: TokenizerSpec) -> dict[bytes, float]:
    """Map each mergeable regular token's bytes to its merge rank (lower merges first)."""
    scores = tokenizer_file.scores
    regular = [i for i in range(len(scores)) if i not in spec.special_ids]
    if spec.byte_fallback_offset is not None:
        block = range(spec.byte_fallback_offset, spec.byte_fallback_offset + 256)
        regular = [i for i in regular if i not in block]
    distinct = len({scores[i] for i in regular}) > 1
    ranks: dict[bytes, float] = {}
    for token_id in regular:
        score = scores[token_id]
        if math.isinf(score) and score < 0:
            continue
        piece = tokenizer_file.vocab[token_id]
        if piece not in ranks:
            ranks[piece] = -score if distinct else float(token_id)
    return ranks
