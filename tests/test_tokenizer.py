"""The runtime tokenizer encodes exactly like sentencepiece, tiktoken and HF tokenizers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from tokenizer_corpus import long_text, make_corpus
from tokenizer_references import NAMES, converted_paths, references, tokenizers  # noqa: F401

from dllama_py.text.tokenizer import Tokenizer

REFERENCE_KEYS = {
    "tok512": "tok512_sentencepiece",
    "llama2": "llama2_sentencepiece",
    "llama3": "llama3_tiktoken",
    "qwen3": "qwen3_hf",
}
VOCAB_TESTS = {"llama2": "ggml-vocab-llama-spm", "llama3": "ggml-vocab-llama-bpe", "qwen3": "ggml-vocab-qwen2"}
CORPUS = make_corpus()


def _vocab_test_cases(testdata: Path, stem: str) -> list[tuple[str, list[int]]]:
    folder = testdata / "llamacpp_vocab_tests"
    inputs = (folder / f"{stem}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = (folder / f"{stem}.gguf.out").read_text(encoding="utf-8").split("\n")
    assert inputs[-1] == "" and outputs[-1] == ""
    assert len(inputs) == len(outputs) and len(inputs) > 40
    return [(text, [int(i) for i in ids.split()]) for text, ids in zip(inputs[:-1], outputs[:-1])]


def test_kind_is_inferred_from_the_vocabulary(tokenizers: dict[str, Tokenizer]) -> None:
    assert {name: tok.kind for name, tok in tokenizers.items()} == {
        "tok512": "sentencepiece",
        "llama2": "sentencepiece",
        "llama3": "llama3",
        "qwen3": "qwen2",
    }
    assert tokenizers["tok512"].spec.remove_extra_whitespaces
    assert not tokenizers["llama2"].spec.remove_extra_whitespaces
    assert tokenizers["llama3"].special_ids == frozenset(range(128000, 128256))
    assert tokenizers["qwen3"].special_ids == frozenset(range(151643, 151669))


@pytest.mark.parametrize("name", NAMES)
def test_encode_matches_reference_json(testdata: Path, tokenizers: dict[str, Tokenizer], name: str) -> None:
    reference = json.loads((testdata / "reference" / "tokenizers_reference.json").read_text(encoding="utf-8"))
    for case in reference["encode_cases"]:
        assert tokenizers[name].encode(case["text"], add_bos=False) == case[REFERENCE_KEYS[name]], case["text"]


@pytest.mark.parametrize("name", sorted(VOCAB_TESTS))
def test_encode_matches_llamacpp_vocab_tests(testdata: Path, tokenizers: dict[str, Tokenizer], name: str) -> None:
    for text, expected in _vocab_test_cases(testdata, VOCAB_TESTS[name]):
        assert tokenizers[name].encode(text, add_bos=False) == expected, repr(text)


@pytest.mark.parametrize("name", NAMES)
def test_encode_matches_reference_library_on_generated_corpus(
    tokenizers: dict[str, Tokenizer], references: dict, name: str
) -> None:
    assert len(CORPUS) >= 2000
    mismatches = [line for line in CORPUS if tokenizers[name].encode(line, add_bos=False) != references[name](line)]
    assert not mismatches, f"{len(mismatches)} lines differ, first: {mismatches[0]!r}"


@pytest.mark.parametrize("name", NAMES)
def test_encode_of_100k_characters_is_fast_and_exact(
    converted_paths: dict[str, Path], references: dict, name: str
) -> None:
    text = long_text(100_000)
    tokenizer = Tokenizer.load(converted_paths[name])  # fresh: nothing cached
    start = time.perf_counter()
    ids = tokenizer.encode(text, add_bos=False)
    elapsed = time.perf_counter() - start
    print(f"{name}: 100k characters -> {len(ids)} tokens in {elapsed * 1000:.1f} ms")
    assert elapsed < 0.5
    assert ids == references[name](text)


def test_upstream_tok512_file_encodes_like_sentencepiece(testdata: Path, references: dict) -> None:
    upstream = Tokenizer.load(testdata / "compat" / "dllama" / "dllama_tokenizer_tok512.t")
    for line in CORPUS[:300]:
        assert upstream.encode(line, add_bos=False) == references["tok512"](line)
    assert upstream.encode("Once upon a time") == [1, 403, 407, 261, 378]


def test_bos_is_added_only_when_asked_and_present(tokenizers: dict[str, Tokenizer]) -> None:
    assert tokenizers["llama2"].encode("Hello")[0] == 1
    assert tokenizers["llama3"].encode("Hello")[0] == 128000
    assert tokenizers["llama3"].encode("Hello", add_bos=False)[0] != 128000
    assert tokenizers["qwen3"].encode("", add_bos=False) == []


def test_special_tokens_in_text_are_single_tokens(tokenizers: dict[str, Tokenizer]) -> None:
    llama3, qwen3, llama2 = tokenizers["llama3"], tokenizers["qwen3"], tokenizers["llama2"]
    assert llama3.encode("a<|eot_id|>b", add_bos=False) == [64, 128009, 65]
    assert qwen3.encode("<|im_start|>user\nhi<|im_end|>", add_bos=False)[0] == 151644
    assert qwen3.encode("<|im_start|>user\nhi<|im_end|>", add_bos=False)[-1] == 151645
    assert 128009 not in llama3.encode("a<|eot_id|>b", add_bos=False, parse_special=False)
    # sentencepiece never matches control tokens in text unless asked to
    assert 1 not in llama2.encode("<s>hi", add_bos=False)
    assert llama2.encode("<s>hi", add_bos=False, parse_special=True)[0] == 1


@pytest.mark.parametrize("name", NAMES)
def test_decode_inverts_encode(tokenizers: dict[str, Tokenizer], name: str) -> None:
    tokenizer = tokenizers[name]
    for line in CORPUS[:400]:
        expected = line
        if tokenizer.spec.remove_extra_whitespaces:
            continue  # collapsing spaces is lossy by design
        if name == "llama2":
            expected = line.replace("\u2581", " ")
        if name == "qwen3":
            import unicodedata

            expected = unicodedata.normalize("NFC", line)
        assert tokenizer.decode(tokenizer.encode(line, add_bos=False), skip_special_tokens=False) == expected


def test_sentencepiece_decode_drops_dummy_prefix_and_control_tokens(tokenizers: dict[str, Tokenizer]) -> None:
    llama2 = tokenizers["llama2"]
    assert llama2.decode([1, 15043, 3186, 2]) == "Hello world"
    assert llama2.decode([29871, 15043]) == " Hello"


@pytest.mark.parametrize("name", ["llama2", "llama3", "qwen3"])
def test_stream_decoder_emits_only_complete_utf8(tokenizers: dict[str, Tokenizer], name: str) -> None:
    tokenizer = tokenizers[name]
    text = "a 🦙 日本 ü👨‍👩‍👧"
    ids = tokenizer.encode(text, add_bos=False)
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(token_id) for token_id in ids]
    pieces.append(decoder.flush())
    assert "\ufffd" not in "".join(pieces)
    streamed = "".join(pieces)
    assert streamed.lstrip(" ") == text
    # at least one token boundary falls inside a character, and it was held back
    partial = [tokenizer.id_to_piece(i) for i in ids]
    assert any(_splits_utf8(piece) for piece in partial)


def _splits_utf8(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_stream_decoder_replaces_invalid_bytes_and_flushes(tokenizers: dict[str, Tokenizer]) -> None:
    llama2 = tokenizers["llama2"]
    decoder = llama2.stream_decoder()
    byte = lambda value: 3 + value  # noqa: E731  byte-fallback ids start at 3
    assert decoder.push(byte(0xF0)) == ""
    assert decoder.push(byte(0x9F)) == ""
    assert decoder.push(byte(0xA6)) == ""
    assert decoder.push(byte(0x99)) == "🦙"
    assert decoder.push(byte(0xC3)) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.push(byte(0x80)) == "\ufffd"


def test_properties_expose_the_file(tokenizers: dict[str, Tokenizer]) -> None:
    llama3 = tokenizers["llama3"]
    assert llama3.vocab_size == 128256
    assert llama3.bos_id == 128000
    assert set(llama3.eos_ids) == {128001, 128008, 128009}
    assert llama3.id_to_piece(128009) == b"<|eot_id|>"
    assert llama3.token_to_id("<|eot_id|>") == 128009
    assert "<|start_header_id|>" in (llama3.chat_template or "")
    with pytest.raises(ValueError, match="outside vocabulary"):
        llama3.id_to_piece(128256)
