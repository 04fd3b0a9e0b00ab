"""Turn a tokenizer source (sentencepiece, tiktoken, Hugging Face) into a TokenizerFile.

Scores written (they are the merge priority, see docs/tokenizer.md):
* sentencepiece: the piece's own score (as distributed-llama's converter does);
* tiktoken: -rank (rank == id), specials -id;
* Hugging Face byte-level BPE: -(256 + index of the first merges line that yields the token),
  which equals distributed-llama's -id whenever ids follow the merges (Qwen2/Qwen3 do);
  tokens that no merge yields get -inf, the 256 byte tokens and added tokens -id.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from dllama_py.converter.sentencepiece_model import (
    MODEL_BPE,
    PIECE_BYTE,
    SentencePieceModel,
)


class SourceError(ValueError):
    """The tokenizer source is missing, unreadable or of an unknown kind (user-facing message)."""


@dataclass
class TokenizerSource:
    """Vocabulary and markers gathered from a source, before chat/config extras are applied."""

    vocab: list[bytes]
    scores: list[float]
    special_tokens: dict[str, int]
    bos_id: int | None
    eos_ids: list[int]
    add_bos: bool
    chat_template: str | None = None
    warnings: list[str] = field(default_factory=list)


def from_sentencepiece(model: SentencePieceModel, where: str) -> TokenizerSource:
    """Pieces with `▁` -> space and `<0xNN>` -> that byte; scores kept."""
    if model.model_type != MODEL_BPE:
        raise SourceError(
            f"{where}: sentencepiece model type {model.model_type} is not BPE (unigram is not supported)"
        )
    vocab: list[bytes] = []
    for piece, piece_type in zip(model.pieces, model.types):
        if piece_type == PIECE_BYTE and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            vocab.append(bytes((int(piece[3:5], 16),)))
        else:
            vocab.append(piece.replace("\u2581", " ").encode("utf-8"))
    warnings = []
    if model.normalizer_name not in ("identity", ""):
        warnings.append(f"{where}: normalizer '{model.normalizer_name}' is not applied at encode time")
    specials = {model.pieces[i]: i for i, t in enumerate(model.types) if t in (2, 3)}
    bos = model.bos_id if 0 <= model.bos_id < len(vocab) else None
    eos = [model.eos_id] if 0 <= model.eos_id < len(vocab) else []
    return TokenizerSource(vocab, list(model.scores), specials, bos, eos, True, warnings=warnings)


LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>",
] + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - 12)]


def looks_like_tiktoken(data: bytes) -> bool:
    """True when the first lines are `base64 rank`."""
    head = data[:4096].split(b"\n")
    if len(data) > 4096:
        head = head[:-1]  # the last line of the excerpt may be cut
    lines = [line for line in head[:8] if line.strip()]
    if not lines:
        return False
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            return False
        try:
            base64.b64decode(parts[0], validate=True)
        except ValueError:
            return False
    return True


def from_tiktoken(data: bytes, where: str, added: dict[str, int]) -> TokenizerSource:
    """Ranks become ids; specials follow from `added` or, for 128000 ranks, Llama 3's 256."""
    ranked: dict[int, bytes] = {}
    for line_number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise SourceError(f"{where}:{line_number}: expected 'base64 rank', got {line[:40]!r}")
        ranked[int(parts[1])] = base64.b64decode(parts[0])
    count = len(ranked)
    if sorted(ranked) != list(range(count)):
        raise SourceError(f"{where}: ranks are not 0..{count - 1} without gaps")
    vocab = [ranked[i] for i in range(count)]
    scores = [-float(i) for i in range(count)]
    if not added:
        if count != 128000:
            raise SourceError(
                f"{where}: tiktoken file with {count} ranks is not Llama 3's (128000); put a "
                "tokenizer_config.json with added_tokens_decoder next to it to name the special tokens"
            )
        added = {name: count + i for i, name in enumerate(LLAMA3_SPECIALS)}
    for name, token_id in sorted(added.items(), key=lambda item: item[1]):
        if token_id != len(vocab):
            raise SourceError(f"{where}: special token {name!r} has id {token_id}, expected {len(vocab)}")
        vocab.append(name.encode("utf-8"))
        scores.append(-float(token_id))
    source = TokenizerSource(vocab, scores, dict(added), None, [], True)
    if count == 128000 and added.get("<|begin_of_text|>") == 128000:
        source.bos_id = 128000
        # end-of-turn first: upstream appends the first EOS piece after each chat message
        source.eos_ids = [added[n] for n in ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>") if n in added]
    return source


def gpt2_unicode_to_byte() -> dict[str, int]:
    """GPT-2's reversible byte <-> printable character table, character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, characters)}


def from_hf_bpe(
    vocab_map: dict[str, int],
    merges: list[tuple[str, str]],
    added: dict[str, int],
    where: str,
    byte_level: bool,
) -> TokenizerSource:
    """HF BPE vocabulary (+ merges, + added tokens) to raw-byte pieces and rank scores."""
    size = max(list(vocab_map.values()) + list(added.values())) + 1
    pieces: list[str | None] = [None] * size
    for token, token_id in vocab_map.items():
        pieces[token_id] = token
    for token, token_id in added.items():
        pieces[token_id] = token
    missing = [i for i, p in enumerate(pieces) if p is None]
    if missing:
        raise SourceError(f"{where}: ids {missing[:5]} have no token (vocabulary has gaps)")
    merge_rank: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        merge_rank.setdefault(left + right, rank)
    table = gpt2_unicode_to_byte() if byte_level else {}
    vocab: list[bytes] = []
    scores: list[float] = []
    added_ids = set(added.values())
    for token_id, piece in enumerate(pieces):
        assert piece is not None
        if token_id in added_ids:
            vocab.append(piece.encode("utf-8"))
            scores.append(-float(token_id))
            continue
        vocab.append(_hf_piece_bytes(piece, table, byte_level, where))
        rank = merge_rank.get(piece)
        if rank is not None:
            scores.append(-float(256 + rank) if byte_level else -float(rank))
        elif byte_level and len(vocab[-1]) == 1:
            scores.append(-float(token_id))
        else:
            scores.append(-math.inf if byte_level else 0.0)
    return TokenizerSource(vocab, scores, dict(added), None, [], False)


def _hf_piece_bytes(piece: str, table: dict[str, int], byte_level: bool, where: str) -> bytes:
    if not byte_level:
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes((int(piece[3:5], 16),))
        return piece.replace("\u2581", " ").encode("utf-8")
    try:
        return bytes(table[char] for char in piece)
    except KeyError as error:
        raise SourceError(f"{where}: token {piece!r} is not byte-level encoded") from error


def read_json(path: Path) -> dict:
    """Load a JSON object, with a one-line error on failure."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SourceError(f"{path}: cannot read JSON ({error})") from error
    if not isinstance(value, dict):
        raise SourceError(f"{path}: expected a JSON object")
    return value
