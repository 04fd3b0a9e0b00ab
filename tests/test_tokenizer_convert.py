"""convert-tokenizer: source detection by content, carried BOS/EOS/template, user errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from dllama_py.converter.convert_tokenizer import convert, main

from dllama_py.formats.tokenizer_file import read_tokenizer_file


def test_writes_named_file_in_current_folder(testdata: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([str(testdata / "stories260K" / "tok512.model"), "tok512"]) == 0
    written = tmp_path / "dllama_tokenizer_tok512.t"
    assert written.read_bytes() == (testdata / "compat" / "dllama" / "dllama_tokenizer_tok512.t").read_bytes()


def test_output_flag_writes_elsewhere(testdata: Path, tmp_path: Path) -> None:
    target = tmp_path / "out" / "x.t"
    target.parent.mkdir()
    assert main([str(testdata / "llama2_tokenizer"), "llama2", "--output", str(target)]) == 0
    tokenizer_file = read_tokenizer_file(target)
    assert (tokenizer_file.vocab_size, tokenizer_file.bos_id, tokenizer_file.eos_ids) == (32000, 1, (2,))
    assert tokenizer_file.vocab[3] == b"\x00" and tokenizer_file.vocab[29871] == b" "


def test_llama3_tiktoken_carries_all_end_of_turn_ids(testdata: Path) -> None:
    tokenizer_file, _ = convert(testdata / "llama3_tokenizer" / "tokenizer.model")
    assert tokenizer_file.vocab_size == 128256
    assert tokenizer_file.bos_id == 128000 and tokenizer_file.add_bos
    assert tokenizer_file.eos_ids[0] == 128009  # upstream appends the first EOS after each chat turn
    assert set(tokenizer_file.eos_ids) == {128001, 128008, 128009}
    assert tokenizer_file.vocab[128006] == b"<|start_header_id|>"
    assert tokenizer_file.scores[1000] == -1000.0  # -rank: tiktoken merge priority
    assert "<|start_header_id|>" in (tokenizer_file.chat_template or "")


def test_qwen3_vocab_and_merges_carry_config(testdata: Path) -> None:
    tokenizer_file, _ = convert(testdata / "qwen3_tokenizer")
    config = json.loads((testdata / "qwen3_tokenizer" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert tokenizer_file.vocab_size == 151669
    assert tokenizer_file.chat_template == config["chat_template"]
    assert tokenizer_file.bos_id == 151643 and not tokenizer_file.add_bos
    assert tokenizer_file.eos_ids[0] == 151645 and 151643 in tokenizer_file.eos_ids
    assert tokenizer_file.vocab[151667] == b"<think>"
    assert tokenizer_file.vocab[220] == b" "
    # merges follow ids in Qwen's files, so -rank equals distributed-llama's -id
    assert all(tokenizer_file.scores[i] == -float(i) for i in range(256, 151643, 997))


def test_tokenizer_json_gives_the_same_file_as_vocab_and_merges(testdata: Path, tmp_path: Path) -> None:
    folder = tmp_path / "qwen_json"
    folder.mkdir()
    shutil.copy(testdata / "qwen3_tokenizer" / "tokenizer_config.json", folder)
    _qwen_hf_tokenizer(testdata).save(str(folder / "tokenizer.json"))
    from_json, warnings = convert(folder)
    from_merges, _ = convert(testdata / "qwen3_tokenizer")
    assert warnings == []
    assert from_json == from_merges


def _qwen_hf_tokenizer(testdata: Path):
    from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HuggingFaceTokenizer
    from tokenizers.models import BPE

    from dllama_py.text.tokenizer_kind import QWEN2_PATTERN

    folder = testdata / "qwen3_tokenizer"
    tokenizer = HuggingFaceTokenizer(BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = sorted(config["added_tokens_decoder"].items(), key=lambda item: int(item[0]))
    tokenizer.add_special_tokens([AddedToken(e["content"], special=e["special"], normalized=False) for _, e in added])
    return tokenizer


def test_missing_source_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "missing"), "x"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no such file or folder" in error and "Traceback" not in error


def test_unknown_content_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "tokenizer.model"
    source.write_bytes(b"\xff\xfe not a tokenizer \x00\x07")
    assert main([str(source), "x"]) == 2
    assert "unknown content" in capsys.readouterr().err


def test_folder_without_tokenizer_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "x"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err


def test_vocab_json_without_merges_exits_2(testdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(testdata / "qwen3_tokenizer" / "vocab.json", tmp_path)
    assert main([str(tmp_path / "vocab.json"), "x"]) == 2
    assert "merges.txt" in capsys.readouterr().err


def test_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("SOURCE", "NAME", "--output", "tiktoken", "tokenizer_config.json"):
        assert word in text
