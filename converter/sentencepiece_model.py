"""A small reader for sentencepiece `tokenizer.model` files (protobuf ModelProto).

Only the fields a converter needs are decoded, so neither `sentencepiece` nor `protobuf`
is required at run time. Field numbers follow sentencepiece_model.proto:
ModelProto{1: pieces, 2: trainer_spec, 3: normalizer_spec},
SentencePiece{1: piece, 2: score (float), 3: type},
TrainerSpec{3: model_type, 35: byte_fallback, 40: unk_id, 41: bos_id, 42: eos_id, 43: pad_id},
NormalizerSpec{1: name, 3: add_dummy_prefix, 4: remove_extra_whitespaces, 5: escape_whitespaces}.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED, PIECE_UNUSED, PIECE_BYTE = 1, 2, 3, 4, 5, 6
MODEL_UNIGRAM, MODEL_BPE = 1, 2


class ProtobufError(ValueError):
    """The bytes are not a well-formed protobuf message."""


@dataclass(frozen=True)
class SentencePieceModel:
    """The parts of a sentencepiece model that a `.t` file needs."""

    pieces: tuple[str, ...]
    scores: tuple[float, ...]
    types: tuple[int, ...]
    model_type: int
    bos_id: int
    eos_id: int
    unk_id: int
    byte_fallback: bool
    normalizer_name: str
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if offset >= len(data):
            raise ProtobufError("truncated varint")
        byte = data[offset]
        offset += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, offset
        shift += 7
        if shift > 63:
            raise ProtobufError("varint too long")


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """Split one message into (field number, value) pairs; value is int or bytes."""
    fields: list[tuple[int, int | bytes]] = []
    offset = 0
    while offset < len(data):
        tag, offset = _varint(data, offset)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise ProtobufError("field number 0")
        if wire == 0:
            value, offset = _varint(data, offset)
            fields.append((number, value))
        elif wire == 1:
            fields.append((number, data[offset : offset + 8]))
            offset += 8
        elif wire == 2:
            length, offset = _varint(data, offset)
            if offset + length > len(data):
                raise ProtobufError("truncated length-delimited field")
            fields.append((number, data[offset : offset + length]))
            offset += length
        elif wire == 5:
            fields.append((number, data[offset : offset + 4]))
            offset += 4
        else:
            raise ProtobufError(f"unsupported wire type {wire}")
    if offset != len(data):
        raise ProtobufError("truncated message")
    return fields


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def parse_sentencepiece_model(data: bytes) -> SentencePieceModel:
    """Decode a sentencepiece ModelProto; raises ProtobufError if it is not one."""
    pieces: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    trainer: dict[int, int | bytes] = {}
    normalizer: dict[int, int | bytes] = {}
    for number, value in _fields(data):
        if number == 1 and isinstance(value, bytes):
            piece, score, piece_type = "", 0.0, PIECE_NORMAL
            for sub_number, sub_value in _fields(value):
                if sub_number == 1 and isinstance(sub_value, bytes):
                    piece = sub_value.decode("utf-8")
                elif sub_number == 2 and isinstance(sub_value, bytes) and len(sub_value) == 4:
                    score = struct.unpack("<f", sub_value)[0]
                elif sub_number == 3 and isinstance(sub_value, int):
                    piece_type = sub_value
            pieces.append(piece)
            scores.append(score)
            types.append(piece_type)
        elif number == 2 and isinstance(value, bytes):
            trainer = dict(_fields(value))
        elif number == 3 and isinstance(value, bytes):
            normalizer = dict(_fields(value))
    if not pieces:
        raise ProtobufError("no sentencepiece pieces found")

    def flag(fields: dict[int, int | bytes], number: int, default: bool) -> bool:
        value = fields.get(number, int(default))
        return bool(value) if isinstance(value, int) else default

    def number_or(fields: dict[int, int | bytes], number: int, default: int) -> int:
        value = fields.get(number, default)
        return _signed(value) if isinstance(value, int) else default

    name = normalizer.get(1, b"")
    return SentencePieceModel(
        pieces=tuple(pieces),
        scores=tuple(scores),
        types=tuple(types),
        model_type=number_or(trainer, 3, MODEL_UNIGRAM),
        bos_id=number_or(trainer, 41, 1),
        eos_id=number_or(trainer, 42, 2),
        unk_id=number_or(trainer, 40, 0),
        byte_fallback=flag(trainer, 35, False),
        normalizer_name=name.decode("utf-8", "replace") if isinstance(name, bytes) else "",
        add_dummy_prefix=flag(normalizer, 3, True),
        remove_extra_whitespaces=flag(normalizer, 4, True),
    )
