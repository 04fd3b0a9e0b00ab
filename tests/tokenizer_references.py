"""Shared fixtures for tokenizer tests: converted `.t` files and the reference libraries.

Each reference `encode(text)` returns ids without BOS, the way the reference data was made:
sentencepiece `encode`, tiktoken `encode(allowed_special="all")`, and Hugging Face tokenizers
built from Qwen3's vocab.json + merges.txt with the pre-tokenizer of its tokenizer.json
(NFC, the Qwen2 split regex, byte-level) and the added tokens of tokenizer_config.json.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from dllama_py.converter.convert_tokenizer import convert
from dllama_py.converter.tokenizer_sources import LLAMA3_SPECIALS

from dllama_py.formats.tokenizer_file import write_tokenizer_file
from dllama_py.text.tokenizer import Tokenizer
from dllama_py.text.tokenizer_kind import QWEN2_PATTERN

SOURCES = {
    "tok512": "stories260K/tok512.model",
    "llama2": "llama2_tokenizer/tokenizer.model",
    "llama3": "llama3_tokenizer",
    "qwen3": "qwen3_tokenizer",
}
NAMES = tuple(SOURCES)


@pytest.fixture(scope="session")
def converted_paths(testdata: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every reference tokenizer converted once to a `.t` file."""
    folder = tmp_path_factory.mktemp("converted_tokenizers")
    paths = {}
    for name, source in SOURCES.items():
        tokenizer_file, _ = convert(testdata / source)
        paths[name] = folder / f"dllama_tokenizer_{name}.t"
        write_tokenizer_file(paths[name], tokenizer_file)
    return paths


@pytest.fixture(scope="session")
def tokenizers(converted_paths: dict[str, Path]) -> dict[str, Tokenizer]:
    """Our tokenizer for each converted file."""
    return {name: Tokenizer.load(path) for name, path in converted_paths.items()}


@pytest.fixture(scope="session")
def references(testdata: Path) -> dict[str, Callable[[str], list[int]]]:
    """The reference library's encode function for each tokenizer."""
    import sentencepiece
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HuggingFaceTokenizer
    from tokenizers.models import BPE

    tok512 = sentencepiece.SentencePieceProcessor(model_file=str(testdata / SOURCES["tok512"]))
    llama2 = sentencepiece.SentencePieceProcessor(model_file=str(testdata / SOURCES["llama2"]))
    reference = json.loads((testdata / "reference" / "tokenizers_reference.json").read_text(encoding="utf-8"))
    llama3 = tiktoken.Encoding(
        "llama3",
        pat_str=reference["llama3_pattern"],
        mergeable_ranks=load_tiktoken_bpe(str(testdata / "llama3_tokenizer" / "tokenizer.model")),
        special_tokens={name: 128000 + i for i, name in enumerate(LLAMA3_SPECIALS)},
    )
    qwen_folder = testdata / "qwen3_tokenizer"
    qwen3 = HuggingFaceTokenizer(BPE.from_file(str(qwen_folder / "vocab.json"), str(qwen_folder / "merges.txt")))
    qwen3.normalizer = normalizers.NFC()
    qwen3.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    config = json.loads((qwen_folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = sorted(config["added_tokens_decoder"].items(), key=lambda item: int(item[0]))
    qwen3.add_special_tokens([AddedToken(e["content"], special=e["special"], normalized=False) for _, e in added])
    return {
        "tok512": lambda text: tok512.encode(text),
        "llama2": lambda text: llama2.encode(text),
        "llama3": lambda text: llama3.encode(text, allowed_special="all"),
        "qwen3": lambda text: qwen3.encode(text, add_special_tokens=False).ids,
    }
