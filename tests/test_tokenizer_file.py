"""Reading and writing distributed-llama's `.t` tokenizer files."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from dllama_py.converter.convert_tokenizer import convert

from dllama_py.formats.tokenizer_file import (
    LEGACY_MAGIC,
    MAGIC,
    TokenizerFile,
    TokenizerFormatError,
    parse_tokenizer_bytes,
    read_tokenizer_file,
    tokenizer_file_bytes,
    write_tokenizer_file,
)


@pytest.fixture(scope="module")
def upstream_bytes(testdata: Path) -> bytes:
    return (testdata / "compat" / "dllama" / "dllama_tokenizer_tok512.t").read_bytes()


def _small(chat_template: str | None = None) -> TokenizerFile:
    return TokenizerFile.create(
        [b"<unk>", b"<s>", b"</s>", b"a", b" ab"], [0.0, 0.0, 0.0, -1.0, -2.5], 1, [2, 4], True, chat_template
    )


def test_reads_file_written_by_distributed_llama(testdata: Path) -> None:
    tokenizer_file = read_tokenizer_file(testdata / "compat" / "dllama" / "dllama_tokenizer_tok512.t")
    assert tokenizer_file.vocab_size == 512
    assert tokenizer_file.bos_id == 1
    assert tokenizer_file.eos_ids == (2,)
    assert tokenizer_file.add_bos is True
    assert tokenizer_file.max_token_length == 7
    assert tokenizer_file.chat_template is None
    assert tokenizer_file.vocab[:4] == (b"<unk>", b"<s>", b"</s>", b"\x00")


def test_rewriting_upstream_file_is_byte_identical(upstream_bytes: bytes) -> None:
    assert tokenizer_file_bytes(parse_tokenizer_bytes(upstream_bytes)) == upstream_bytes


def test_converter_output_is_byte_identical_to_distributed_llama(testdata: Path, upstream_bytes: bytes) -> None:
    tokenizer_file, _ = convert(testdata / "stories260K" / "tok512.model")
    assert tokenizer_file_bytes(tokenizer_file) == upstream_bytes


def test_writer_uses_upstream_key_order_and_round_trips(tmp_path: Path) -> None:
    original = _small("{{ messages }}")
    path = tmp_path / "small.t"
    write_tokenizer_file(path, original)
    data = path.read_bytes()
    magic, header_size = struct.unpack_from("<ii", data)
    keys = [struct.unpack_from("<i", data, 8 + 8 * i)[0] for i in range((header_size - 8) // 8)]
    assert (magic, keys) == (MAGIC, [3, 0, 1, 2, 7, 9, 10])
    assert read_tokenizer_file(path) == original


def test_reads_legacy_magic() -> None:
    vocab = b"".join(struct.pack("<fI", -float(i), 1) + bytes((65 + i,)) for i in range(3))
    data = struct.pack("<iIIiii", LEGACY_MAGIC, 3, 1, 0, 2, -1) + vocab
    tokenizer_file = parse_tokenizer_bytes(data, "legacy.t")
    assert tokenizer_file.vocab == (b"A", b"B", b"C")
    assert (tokenizer_file.bos_id, tokenizer_file.eos_ids, tokenizer_file.scores[2]) == (0, (2,), -2.0)


def test_legacy_eos_keys_and_chat_stop_are_read() -> None:
    pairs = [(0, 1), (1, 2), (2, 1), (4, 1), (8, 3), (9, 1)]
    header = struct.pack("<ii", MAGIC, 8 + 8 * len(pairs)) + b"".join(struct.pack("<ii", k, v) for k, v in pairs)
    data = header + b"xyz" + struct.pack("<i", 0) + struct.pack("<fI", 0.0, 1) + b"a" + struct.pack("<fI", 0.0, 1) + b"b"
    tokenizer_file = parse_tokenizer_bytes(data)
    assert tokenizer_file.eos_ids == (1, 0)
    assert tokenizer_file.bos_id is None


def test_wrong_magic_is_rejected_with_file_name(upstream_bytes: bytes) -> None:
    with pytest.raises(TokenizerFormatError, match=r"model\.t: bad magic 0xa00abcd"):
        parse_tokenizer_bytes(struct.pack("<i", 0x0A00ABCD) + upstream_bytes[4:], "model.t")


@pytest.mark.parametrize("cut", [2, 6, 20, 60, 61, 100, 4998])
def test_truncated_file_is_rejected(upstream_bytes: bytes, cut: int) -> None:
    with pytest.raises(TokenizerFormatError, match="tok.t: truncated"):
        parse_tokenizer_bytes(upstream_bytes[:cut], "tok.t")


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(TokenizerFormatError, match="cannot read tokenizer file"):
        read_tokenizer_file(tmp_path / "nope.t")


def _with_header(pairs: list[tuple[int, int]], body: bytes = b"") -> bytes:
    header = struct.pack("<ii", MAGIC, 8 + 8 * len(pairs)) + b"".join(struct.pack("<ii", k, v) for k, v in pairs)
    return header + body


ONE_TOKEN = struct.pack("<fI", 0.0, 1) + b"a"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_with_header([(0, 1), (1, 1), (2, 1), (11, 5)], ONE_TOKEN), "unknown header key 11"),
        (_with_header([(0, 2), (1, 1), (2, 1)], ONE_TOKEN), "version 2 is not 1"),
        (_with_header([(0, 1), (1, 1), (2, 0)], ONE_TOKEN), "max_token_length 0"),
        (_with_header([(0, 1), (2, 1)], ONE_TOKEN), "no vocab_size"),
        (_with_header([(0, 1), (1, 0), (2, 1)]), "vocab_size 0"),
        (_with_header([(0, 1), (1, 1), (2, 1)], struct.pack("<fI", 0.0, 0)), "token 0 has length 0"),
        (_with_header([(0, 1), (1, 1), (2, 1)], ONE_TOKEN + b"junk"), "4 unexpected bytes"),
        (_with_header([(0, 1), (1, 1), (2, 1), (3, 7)], ONE_TOKEN), "bos_id 7 outside"),
        (_with_header([(0, 1), (1, 1), (2, 1), (9, 1)], struct.pack("<i", 5) + ONE_TOKEN), "eos id 5 outside"),
        (_with_header([(0, 1), (1, 1), (1, 1), (2, 1)], ONE_TOKEN), "key 1 appears twice"),
        (struct.pack("<ii", MAGIC, 12) + b"\0" * 8, "bad header size 12"),
    ],
)
def test_malformed_files_are_rejected_with_reason(data: bytes, message: str) -> None:
    with pytest.raises(TokenizerFormatError, match=message):
        parse_tokenizer_bytes(data, "bad.t")


def test_create_rejects_inconsistent_fields() -> None:
    with pytest.raises(TokenizerFormatError, match="2 scores for 3 tokens"):
        TokenizerFile.create([b"a", b"b", b"c"], [0.0, 0.0], None, [])
    with pytest.raises(TokenizerFormatError, match="token 1 is empty"):
        TokenizerFile.create([b"a", b""], [0.0, 0.0], None, [])
