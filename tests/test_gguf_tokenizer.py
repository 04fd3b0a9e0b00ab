"""tokenizer_file_from_gguf: a GGUF file's tokenizer metadata gives llama.cpp's token ids and text,
and the same tokenizer as convert-tokenizer makes from the original files.

Reference outputs are llama-server's (../shared/testdata/gguf/README.md); the metadata is read with
gguf-py's GGUFReader, llama.cpp's own reader, so these tests do not depend on this project's GGUF reader.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import pytest
from dllama_py.converter.convert_tokenizer import convert
from dllama_py.converter.gguf_tokenizer import tokenizer_file_from_gguf
from dllama_py.converter.tokenizer_sources import SourceError, gpt2_unicode_to_byte

from dllama_py.formats.tokenizer_file import TokenizerFile
from dllama_py.text.tokenizer import Tokenizer

# name -> (GGUF file, llama-server reference JSON, original tokenizer source), under testdata
GGUF_FILES = {
    "llama-spm-q4_0": ("gguf/llama-spm-q4_0.gguf", "gguf/llama-spm-q4_0.json", "llama2_tokenizer/tokenizer.model"),
    "llama-spm-q4_k_m": (
        "gguf/llama-spm-q4_k_m.gguf", "gguf/llama-spm-q4_k_m.json", "llama2_tokenizer/tokenizer.model"
    ),
    "qwen3-q4_k_m": ("gguf/qwen3-q4_k_m.gguf", "gguf/qwen3-q4_k_m.json", "qwen3_tokenizer"),
    "stories260K-f16": ("gguf/stories260K-f16.gguf", "gguf/stories260K-f16.json", "stories260K/tok512.model"),
    "stories260K": ("stories260K/stories260K.gguf", "gguf/stories260K.json", "stories260K/tok512.model"),
}
NAMES = tuple(GGUF_FILES)
SENTENCEPIECE_NAMES = tuple(name for name in NAMES if name != "qwen3-q4_k_m")
QWEN3_REAL_TOKENS = 151669  # the rest of qwen3's 151936 ids are [PAD...] padding (token type 5, unused)

HARD_STRINGS = [
    "Hello world",
    " Hello world",
    "   leading spaces and trailing   ",
    "two  spaces\tand a tab",
    "line one\nline two\n\n\nthree newlines\r\n",
    "\n",
    "   ",
    "digits 0 12 345 6789 3.14159 1,000,000",
    "unicode: naïve café, Straße, ñandú, Ελληνικά, русский язык",
    "中文：你好，世界！北京是中国的首都。",
    "emoji 🦙🚀👍🏽 and ❤️‍🔥",
    "code: def f(x):\n    return x ** 2  # square\n",
    "don't you're we'll I'M 'quoted'",
    "▁ a literal lower one eighth block ▁▁",
    "<s> and </s> and <unk> as text",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>",
    "<tool_call>{\"name\": \"f\"}</tool_call><|endoftext|>",
]


def _gguf_metadata(path: Path) -> dict[str, object]:
    """Every metadata key of a GGUF file as a plain value: str, int, float, bool or a list of them."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    metadata: dict[str, object] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's own header entries (version, counts), not metadata
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            if field.types[-1] == GGUFValueType.STRING:
                metadata[key] = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                metadata[key] = [field.parts[i].tolist()[0] for i in field.data]
        elif field.types[0] == GGUFValueType.STRING:
            metadata[key] = bytes(field.parts[-1]).decode("utf-8")
        else:
            metadata[key] = field.parts[-1].tolist()[0]
    return metadata


@functools.cache
def _metadata_of(path: Path) -> dict[str, object]:
    return _gguf_metadata(path)  # reading qwen3's 300,000 strings takes GGUFReader ~20 s: once per session


@functools.cache
def _built(path: Path) -> tuple[TokenizerFile, tuple[str, ...], Tokenizer]:
    tokenizer_file, warnings = tokenizer_file_from_gguf(_metadata_of(path), path.name)
    return tokenizer_file, tuple(warnings), Tokenizer(tokenizer_file)


@functools.cache
def _converted(source: Path) -> tuple[TokenizerFile, Tokenizer]:
    tokenizer_file, _ = convert(source)
    return tokenizer_file, Tokenizer(tokenizer_file)


def _from_gguf(testdata: Path, name: str) -> tuple[TokenizerFile, tuple[str, ...], Tokenizer]:
    return _built(testdata / GGUF_FILES[name][0])


def _reference(testdata: Path, name: str) -> dict:
    return json.loads((testdata / GGUF_FILES[name][1]).read_text(encoding="utf-8"))


def _from_source(testdata: Path, name: str) -> tuple[TokenizerFile, Tokenizer]:
    return _converted(testdata / GGUF_FILES[name][2])


# ---- the five reference files -------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_prompts_encode_to_llamacpp_prompt_ids(testdata: Path, name: str) -> None:
    _, _, tokenizer = _from_gguf(testdata, name)
    for case in _reference(testdata, name)["cases"]:
        assert tokenizer.encode(case["prompt"], add_bos=tokenizer.add_bos) == case["prompt_ids"], case["prompt"]


@pytest.mark.parametrize("name", NAMES)
def test_generated_ids_decode_to_llamacpp_text(testdata: Path, name: str) -> None:
    _, _, tokenizer = _from_gguf(testdata, name)
    for case in _reference(testdata, name)["cases"]:
        stream = tokenizer.stream_decoder()
        streamed = "".join(stream.push(token_id) for token_id in case["generated_ids"]) + stream.flush()
        # llama.cpp's /detokenize keeps a sentencepiece continuation's leading space, as a stream does;
        # U+FFFD stands where a byte token leaves UTF-8 incomplete, in both
        assert streamed == case["generated_text"], case["prompt"]
        whole = tokenizer.decode(case["prompt_ids"] + case["generated_ids"])
        assert whole == case["prompt"] + case["generated_text"], case["prompt"]


def test_an_incomplete_utf8_byte_decodes_to_a_replacement_character(testdata: Path) -> None:
    _, _, tokenizer = _from_gguf(testdata, "llama-spm-q4_0")
    generated = _reference(testdata, "llama-spm-q4_0")["cases"][1]["generated_ids"]
    assert generated[3] == 196 and tokenizer.id_to_piece(196) == b"\xc1"  # <0xC1>, a lead byte
    stream = tokenizer.stream_decoder()
    for token_id in generated[:3]:
        stream.push(token_id)
    assert stream.push(196) == ""  # held back: the character may still complete
    assert stream.push(generated[4]).startswith("\ufffd")  # it did not


@pytest.mark.parametrize("name", ["llama-spm-q4_0", "llama-spm-q4_k_m"])
def test_llama_spm_markers_are_the_metadata_ones(testdata: Path, name: str) -> None:
    tokenizer_file, warnings, tokenizer = _from_gguf(testdata, name)
    assert (tokenizer_file.vocab_size, tokenizer_file.bos_id, tokenizer_file.eos_ids) == (32000, 1, (2,))
    assert tokenizer_file.add_bos and tokenizer_file.chat_template is None
    assert tokenizer.kind == "sentencepiece" and warnings == ()
    assert tokenizer_file.vocab[0] == b"<unk>" and tokenizer_file.vocab[3] == b"\x00"
    assert tokenizer_file.vocab[258] == b"\xff" and tokenizer_file.vocab[29871] == b" "


@pytest.mark.parametrize("name", ["stories260K-f16", "stories260K"])
def test_stories_markers_and_whitespace_warning(testdata: Path, name: str) -> None:
    tokenizer_file, warnings, tokenizer = _from_gguf(testdata, name)
    assert (tokenizer_file.vocab_size, tokenizer_file.bos_id, tokenizer_file.eos_ids) == (512, 1, (2,))
    assert tokenizer_file.add_bos  # no add_bos_token key: llama.cpp's default for "llama" is true
    assert tokenizer_file.chat_template is None and tokenizer.kind == "sentencepiece"
    # tok512 collapses runs of spaces (sentencepiece); llama.cpp does not: said once, naming the file
    assert len(warnings) == 1 and warnings[0].startswith(f"{name}.gguf: runs of spaces are collapsed")


def test_qwen3_markers_template_and_padding(testdata: Path) -> None:
    tokenizer_file, warnings, tokenizer = _from_gguf(testdata, "qwen3-q4_k_m")
    metadata = _metadata_of(testdata / GGUF_FILES["qwen3-q4_k_m"][0])
    assert tokenizer_file.vocab_size == 151936 and tokenizer.kind == "qwen2" and warnings == ()
    assert tokenizer_file.bos_id == 151643 and not tokenizer_file.add_bos
    assert tokenizer_file.eos_ids == (151645, 151643)  # <|im_end|> first: it ends every chat turn
    assert tokenizer_file.vocab[151645] == b"<|im_end|>" and tokenizer_file.vocab[151667] == b"<think>"
    assert tokenizer_file.chat_template == metadata["tokenizer.chat_template"]
    assert len(tokenizer_file.chat_template) == 4116 and "<|im_start|>" in tokenizer_file.chat_template
    padding = range(QWEN3_REAL_TOKENS, 151936)
    assert [tokenizer_file.vocab[i] for i in padding] == [f"[PAD{i}]".encode() for i in padding]
    assert all(tokenizer_file.scores[i] == -math.inf for i in padding)
    assert tokenizer_file.vocab[220] == b" " and tokenizer_file.vocab[198] == b"\n"


# ---- the same tokenizer as convert-tokenizer makes from the original files ------------------------

@pytest.mark.parametrize("name", SENTENCEPIECE_NAMES)
def test_sentencepiece_gguf_gives_the_converted_file_exactly(testdata: Path, name: str) -> None:
    tokenizer_file, _, _ = _from_gguf(testdata, name)
    converted, _ = _from_source(testdata, name)
    assert tokenizer_file == converted


def test_qwen3_gguf_gives_the_converted_file_plus_padding(testdata: Path) -> None:
    tokenizer_file, _, _ = _from_gguf(testdata, "qwen3-q4_k_m")
    converted, _ = _from_source(testdata, "qwen3-q4_k_m")
    assert converted.vocab_size == QWEN3_REAL_TOKENS
    assert tokenizer_file.vocab[:QWEN3_REAL_TOKENS] == converted.vocab
    assert tokenizer_file.scores[:QWEN3_REAL_TOKENS] == converted.scores  # merge ranks from the GGUF merges
    assert (tokenizer_file.bos_id, tokenizer_file.eos_ids, tokenizer_file.add_bos, tokenizer_file.chat_template) == (
        converted.bos_id, converted.eos_ids, converted.add_bos, converted.chat_template
    )


@pytest.mark.parametrize("name", ["llama-spm-q4_0", "qwen3-q4_k_m", "stories260K-f16"])
def test_hard_strings_encode_like_the_converted_tokenizer(testdata: Path, name: str) -> None:
    _, _, tokenizer = _from_gguf(testdata, name)
    _, converted = _from_source(testdata, name)
    for text in HARD_STRINGS:
        assert tokenizer.encode(text) == converted.encode(text), repr(text)
        assert tokenizer.encode(text, add_bos=False, parse_special=False) == converted.encode(
            text, add_bos=False, parse_special=False
        ), repr(text)
    assert tokenizer.special_ids >= converted.special_ids


def test_qwen3_special_token_text_is_one_token(testdata: Path) -> None:
    _, _, tokenizer = _from_gguf(testdata, "qwen3-q4_k_m")
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>", add_bos=tokenizer.add_bos)
    assert ids[0] == 151644 and ids[-1] == 151645 and len(ids) == 5


def _vocab_test_cases(testdata: Path, stem: str) -> list[tuple[str, list[int]]]:
    folder = testdata / "llamacpp_vocab_tests"
    inputs = (folder / f"{stem}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = (folder / f"{stem}.gguf.out").read_text(encoding="utf-8").split("\n")
    assert inputs[-1] == "" and outputs[-1] == "" and len(inputs) == len(outputs) > 40
    return [(text, [int(i) for i in ids.split()]) for text, ids in zip(inputs[:-1], outputs[:-1])]


@pytest.mark.parametrize(
    ("gguf_path", "stem"),
    [
        ("llamacpp_vocab_tests/ggml-vocab-llama-spm.gguf", "ggml-vocab-llama-spm"),
        ("gguf/qwen3-q4_k_m.gguf", "ggml-vocab-qwen2"),  # Qwen3 keeps Qwen2's regular vocabulary
    ],
)
def test_llamacpp_vocab_test_vectors(testdata: Path, gguf_path: str, stem: str) -> None:
    _, _, tokenizer = _built(testdata / gguf_path)
    for text, expected in _vocab_test_cases(testdata, stem):
        assert tokenizer.encode(text, add_bos=False) == expected, repr(text)


# ---- a small synthetic byte-level vocabulary ------------------------------------------------------

def _byte_level_metadata() -> dict[str, object]:
    """GPT-2 byte tokens in GPT-2's order, five merges, three control tokens and one unused token."""
    tokens = list(gpt2_unicode_to_byte())  # printable bytes first, as GPT-2 and Qwen order them
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w"]
    tokens += ["he", "ll", "hell", "hello", "Ġw"]
    types = [1] * len(tokens)
    tokens += ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[PAD264]"]
    types += [3, 3, 3, 5]
    return {
        "general.architecture": "qwen3",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": 263,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}",
    }


def _sentencepiece_metadata(testdata: Path) -> dict[str, object]:
    return dict(_metadata_of(testdata / GGUF_FILES["stories260K-f16"][0]))


def test_synthetic_byte_level_vocabulary_encodes_by_its_merges() -> None:
    tokenizer_file, warnings = tokenizer_file_from_gguf(_byte_level_metadata(), "tiny.gguf")
    tokenizer = Tokenizer(tokenizer_file)
    assert warnings == [] and tokenizer.kind == "qwen2"
    assert tokenizer_file.bos_id == 261 and not tokenizer_file.add_bos  # no BOS key: the first control token
    assert tokenizer_file.eos_ids == (263, 261)  # the template's <|im_end|>, then <|endoftext|>
    assert tokenizer_file.scores[259] == -(256 + 3) and tokenizer_file.scores[260] == -(256 + 4)
    assert tokenizer_file.scores[264] == -math.inf and tokenizer_file.vocab[264] == b"[PAD264]"
    hello, space_w = 259, 260
    assert tokenizer.encode("hello world", add_bos=False) == [hello, space_w] + [tokenizer.token_to_id(c) for c in "orld"]
    assert tokenizer.encode("<|im_start|>hello<|im_end|>", add_bos=False) == [262, hello, 263]
    assert tokenizer.decode([262, hello, 263]) == "<|im_start|>hello<|im_end|>"


def _without(key: str):
    return lambda metadata: metadata.pop(key)


def _setting(key: str, value: object):
    return lambda metadata: metadata.__setitem__(key, value)


def _changing(key: str, index: int, value: object):
    return lambda metadata: metadata.__setitem__(key, _replaced(metadata[key], index, value))


def _replaced(values: list, index: int, value: object) -> list:
    values = list(values)
    values[index] = value
    return values


def _truncating(key: str):
    return lambda metadata: metadata.__setitem__(key, list(metadata[key])[:-1])


SENTENCEPIECE_ERRORS = [
    ("no model", _without("tokenizer.ggml.model"), "GGUF metadata has no tokenizer.ggml.model"),
    ("unknown model", _setting("tokenizer.ggml.model", "t5"), "tokenizer.ggml.model 't5' is not supported"),
    ("model not a string", _setting("tokenizer.ggml.model", 7), "tokenizer.ggml.model should be a string, got int"),
    ("no tokens", _without("tokenizer.ggml.tokens"), "GGUF metadata has no tokenizer.ggml.tokens"),
    ("tokens not an array", _setting("tokenizer.ggml.tokens", "abc"), "tokenizer.ggml.tokens should be an array"),
    ("tokens empty", _setting("tokenizer.ggml.tokens", []), "tokenizer.ggml.tokens is empty"),
    ("token not a string", _changing("tokenizer.ggml.tokens", 7, 7), r"tokenizer.ggml.tokens\[7\] should be a string"),
    ("repeated token", _changing("tokenizer.ggml.tokens", 300, "<s>"), r"tokenizer.ggml.tokens\[300\] '<s>' repeats"),
    ("no scores", _without("tokenizer.ggml.scores"), "GGUF metadata has no tokenizer.ggml.scores"),
    ("short scores", _truncating("tokenizer.ggml.scores"), "tokenizer.ggml.scores has 511 entries for 512 tokens"),
    ("score not a number", _changing("tokenizer.ggml.scores", 5, "x"), r"tokenizer.ggml.scores\[5\] should be a number"),
    ("short token types", _truncating("tokenizer.ggml.token_type"), "token_type has 511 entries for 512 tokens"),
    ("token type 9", _changing("tokenizer.ggml.token_type", 4, 9), r"token_type\[4\] is 9, not a type 1..6"),
    ("token type float", _changing("tokenizer.ggml.token_type", 4, 1.0), r"token_type\[4\] should be an integer"),
    ("bad byte token", _changing("tokenizer.ggml.tokens", 3, "<0xZZ>"), "byte token 3 is '<0xZZ>', not '<0xNN>'"),
    ("bos too large", _setting("tokenizer.ggml.bos_token_id", 512), "bos_token_id 512 is outside the vocabulary of 512"),
    ("bos negative", _setting("tokenizer.ggml.bos_token_id", -1), "bos_token_id -1 is outside the vocabulary"),
    ("bos a string", _setting("tokenizer.ggml.bos_token_id", "1"), "bos_token_id should be a token id"),
    ("bos a boolean", _setting("tokenizer.ggml.bos_token_id", True), "bos_token_id should be a token id"),
    ("eos too large", _setting("tokenizer.ggml.eos_token_id", 4294967295), "eos_token_id 4294967295 is outside"),
    ("eot too large", _setting("tokenizer.ggml.eot_token_id", 600), "eot_token_id 600 is outside"),
    ("add_bos an int", _setting("tokenizer.ggml.add_bos_token", 1), "add_bos_token should be a boolean, got int"),
    ("template a list", _setting("tokenizer.chat_template", ["x"]), "tokenizer.chat_template should be a string"),
]


@pytest.mark.parametrize(
    ("change", "message"), [case[1:] for case in SENTENCEPIECE_ERRORS], ids=[case[0] for case in SENTENCEPIECE_ERRORS]
)
def test_bad_sentencepiece_metadata_is_a_one_line_source_error(testdata: Path, change, message: str) -> None:
    metadata = _sentencepiece_metadata(testdata)
    change(metadata)
    with pytest.raises(SourceError, match=message) as error:
        tokenizer_file_from_gguf(metadata, "bad.gguf")
    assert str(error.value).startswith("bad.gguf: ") and "\n" not in str(error.value)


def _shuffling_bytes(metadata: dict) -> None:
    tokens = list(metadata["tokenizer.ggml.tokens"])
    tokens[0], tokens[1] = tokens[1], tokens[0]  # byte tokens out of order: fine for byte-level BPE
    metadata["tokenizer.ggml.tokens"] = tokens


BYTE_LEVEL_ERRORS = [
    ("no merges", _without("tokenizer.ggml.merges"), "GGUF metadata has no tokenizer.ggml.merges"),
    ("merges not an array", _setting("tokenizer.ggml.merges", "h e"), "tokenizer.ggml.merges should be an array"),
    ("merge without space", _changing("tokenizer.ggml.merges", 1, "ll"), r"merges\[1\] is 'll', not 'left right'"),
    ("merge of three", _changing("tokenizer.ggml.merges", 0, "h e l"), r"merges\[0\] is 'h e l', not 'left right'"),
    ("merge not a string", _changing("tokenizer.ggml.merges", 0, 3), r"merges\[0\] should be a string"),
    ("not byte-level", _changing("tokenizer.ggml.tokens", 256, "h中"), "tokenizer.ggml.tokens.*not byte-level encoded"),
    ("missing byte", _changing("tokenizer.ggml.tokens", 0, "!!"), "lacks some of the 256 single-byte tokens"),
    ("add_bos without bos", _setting("tokenizer.ggml.add_bos_token", True), "add_bos_token is true but there is no"),
    ("pre not a string", _setting("tokenizer.ggml.pre", 2), "tokenizer.ggml.pre should be a string"),
]


@pytest.mark.parametrize(
    ("change", "message"), [case[1:] for case in BYTE_LEVEL_ERRORS], ids=[case[0] for case in BYTE_LEVEL_ERRORS]
)
def test_bad_byte_level_metadata_is_a_one_line_source_error(change, message: str) -> None:
    metadata = _byte_level_metadata()
    change(metadata)
    with pytest.raises(SourceError, match=message) as error:
        tokenizer_file_from_gguf(metadata, "bad.gguf")
    assert str(error.value).startswith("bad.gguf") and "\n" not in str(error.value)


def test_byte_tokens_in_another_order_are_still_byte_level() -> None:
    metadata = _byte_level_metadata()
    _shuffling_bytes(metadata)
    tokenizer_file, warnings = tokenizer_file_from_gguf(metadata, "tiny.gguf")
    assert warnings == [] and Tokenizer(tokenizer_file).encode('"!', add_bos=False) == [0, 1]


def _pre_llama_bpe(metadata: dict) -> None:
    metadata["tokenizer.ggml.pre"] = "llama-bpe"
    metadata["tokenizer.ggml.bos_token_id"] = 261  # llama-bpe prepends BOS by default: give it one


BYTE_LEVEL_WARNINGS = [
    (_without("tokenizer.ggml.pre"), "no tokenizer.ggml.pre; text is split by the 'qwen2' rules"),
    (_setting("tokenizer.ggml.pre", "deepseek-v3"), "tokenizer.ggml.pre 'deepseek-v3' is not implemented here"),
    (_pre_llama_bpe, "'llama-bpe' needs the 'llama3' rules but the vocabulary reads as 'qwen2'"),
    (_setting("tokenizer.ggml.add_eos_token", True), "add_eos_token is true, but prompts get no EOS appended"),
    (_without("tokenizer.ggml.token_type"), "no tokenizer.ggml.token_type: every token is taken as a normal one"),
    (_changing("tokenizer.ggml.tokens", 258, ""), r"tokenizer.ggml.tokens\[258\] is empty; named '\[EMPTY_258\]'"),
    (_setting("qwen3.vocab_size", 300), "qwen3.vocab_size is 300 but there are 265 tokens"),
]


@pytest.mark.parametrize(("change", "message"), BYTE_LEVEL_WARNINGS)
def test_what_cannot_be_reproduced_is_a_warning(change, message: str) -> None:
    metadata = _byte_level_metadata()
    change(metadata)
    _, warnings = tokenizer_file_from_gguf(metadata, "tiny.gguf")
    assert len(warnings) == 1 and warnings[0].startswith("tiny.gguf: ")
    assert re.search(message, warnings[0]), warnings


def test_sentencepiece_without_space_prefix_is_a_warning(testdata: Path) -> None:
    metadata = _sentencepiece_metadata(testdata)
    metadata["tokenizer.ggml.add_space_prefix"] = False
    _, warnings = tokenizer_file_from_gguf(metadata, "s.gguf")
    assert any("add_space_prefix is false" in warning for warning in warnings), warnings
