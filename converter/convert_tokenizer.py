"""convert-tokenizer: write a distributed-llama `.t` file from a tokenizer source.

    convert-tokenizer SOURCE NAME [--output PATH]

SOURCE is a folder or a file; its kind is detected from the content:
sentencepiece `tokenizer.model` (protobuf, BPE), tiktoken rank file (`base64 rank` lines,
e.g. Llama 3's `tokenizer.model`), Hugging Face `tokenizer.json`, or `vocab.json` +
`merges.txt`. BOS, every EOS id and the chat template come from `tokenizer_config.json`
(and `config.json` / `generation_config.json`) in the same folder when present.
The sentencepiece protobuf is parsed by converter/sentencepiece_model.py, so the
`sentencepiece` package is not needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dllama_py.converter.sentencepiece_model import ProtobufError, parse_sentencepiece_model
from dllama_py.converter.tokenizer_sources import (
    SourceError,
    TokenizerSource,
    from_hf_bpe,
    from_sentencepiece,
    from_tiktoken,
    looks_like_tiktoken,
    read_json,
)

from dllama_py.formats.tokenizer_file import TokenizerFile, write_tokenizer_file
from dllama_py.text.chat import BUILTIN_TEMPLATES, end_of_turn_tokens
from dllama_py.text.tokenizer_kind import infer_spec

END_OF_TEXT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|eom_id|>", "<|end|>", "<end_of_turn>")


def convert(source: Path) -> tuple[TokenizerFile, list[str]]:
    """Read a tokenizer source (folder or file) and return the `.t` content plus warnings."""
    if not source.exists():
        raise SourceError(f"{source}: no such file or folder")
    folder = source if source.is_dir() else source.parent
    config = _optional_json(folder / "tokenizer_config.json")
    added = _added_tokens(config)
    tokenizer = _read_source(_pick_file(source), added)
    _apply_config(tokenizer, folder, config)
    tokenizer_file = TokenizerFile.create(
        tokenizer.vocab, tokenizer.scores, tokenizer.bos_id, tokenizer.eos_ids, tokenizer.add_bos,
        tokenizer.chat_template,
    )
    return tokenizer_file, tokenizer.warnings


def _pick_file(source: Path) -> Path:
    if source.is_file():
        return source
    for name in ("tokenizer.json", "vocab.json", "tokenizer.model"):
        if (source / name).is_file():
            return source / name
    raise SourceError(
        f"{source}: no tokenizer.json, vocab.json + merges.txt or tokenizer.model in this folder"
    )


def _read_source(path: Path, added: dict[str, int]) -> TokenizerSource:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SourceError(f"{path}: cannot read ({error.strerror})") from error
    if data.lstrip()[:1] == b"{":
        content = read_json(path)
        if isinstance(content.get("model"), dict):
            return _from_tokenizer_json(content, path, added)
        merges_path = path.parent / "merges.txt"
        if not merges_path.is_file():
            raise SourceError(f"{path}: looks like vocab.json but {merges_path} is missing")
        lines = merges_path.read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        if any(len(merge) != 2 for merge in merges):
            raise SourceError(f"{merges_path}: every line must be 'left right'")
        return from_hf_bpe(content, merges, added, str(path), byte_level=True)  # type: ignore[arg-type]
    if looks_like_tiktoken(data):
        return from_tiktoken(data, str(path), added)
    try:
        model = parse_sentencepiece_model(data)
    except (ProtobufError, UnicodeDecodeError) as error:
        raise SourceError(
            f"{path}: unknown content "
            "(not tokenizer.json, vocab.json, tiktoken ranks or a sentencepiece model)"
        ) from error
    return from_sentencepiece(model, str(path))


def _from_tokenizer_json(content: dict, path: Path, added: dict[str, int]) -> TokenizerSource:
    model = content.get("model") or {}
    if model.get("type") != "BPE":
        raise SourceError(f"{path}: model type {model.get('type')!r} is not supported (only BPE)")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    json_added = {t["content"]: int(t["id"]) for t in content.get("added_tokens", [])}
    added = {**json_added, **added}
    byte_level = not model.get("byte_fallback", False)
    vocab = model.get("vocab", {})
    source = from_hf_bpe(vocab, merges, added, str(path), byte_level)  # type: ignore[arg-type]
    pattern = _split_pattern(content.get("pre_tokenizer"))
    if byte_level and pattern is not None:
        from dllama_py.text.tokenizer_kind import LLAMA3_PATTERN, QWEN2_PATTERN

        if pattern not in (LLAMA3_PATTERN, QWEN2_PATTERN):
            source.warnings.append(
                f"{path}: pre-tokenizer pattern is not Llama 3's or Qwen2's; encoding may differ"
            )
    return source


def _split_pattern(pre_tokenizer: dict | None) -> str | None:
    if not isinstance(pre_tokenizer, dict):
        return None
    for item in [pre_tokenizer] + list(pre_tokenizer.get("pretokenizers", [])):
        if item.get("type") == "Split":
            return (item.get("pattern") or {}).get("Regex")
    return None


def _optional_json(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def _added_tokens(config: dict) -> dict[str, int]:
    decoder = config.get("added_tokens_decoder") or {}
    return {entry["content"]: int(token_id) for token_id, entry in decoder.items()}


def _token_text(value: object) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: object) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def token_lookup(tokenizer: TokenizerSource) -> dict[str, int]:
    """Token text -> id (special tokens win over regular pieces with the same text)."""
    lookup = {piece.decode("utf-8", "replace"): i for i, piece in enumerate(tokenizer.vocab)}
    lookup.update(tokenizer.special_tokens)
    return lookup


def builtin_chat_template(tokenizer: TokenizerSource) -> str | None:
    """Llama 3's template for a Llama 3 vocabulary (BOS 128000 `<|begin_of_text|>`), else None."""
    if tokenizer.bos_id == 128000 and tokenizer.vocab[128000] == b"<|begin_of_text|>":
        return BUILTIN_TEMPLATES["llama3"]
    return None


def use_first_special_as_bos(tokenizer: TokenizerSource) -> None:
    """With no BOS, point it at the first special token (upstream treats ids >= bos as special)."""
    if tokenizer.bos_id is None and tokenizer.special_tokens:
        tokenizer.bos_id = min(tokenizer.special_tokens.values())
        tokenizer.add_bos = False


def end_of_generation_ids(tokenizer: TokenizerSource, lookup: dict[str, int], declared: list[int]) -> list[int]:
    """Every id that ends generation, without repeats, in this order: the end-of-turn tokens the
    chat template names (upstream appends the first after each message), the `declared` ids, then
    special tokens named like an end of text (END_OF_TEXT_NAMES)."""
    eos: list[int] = []
    if tokenizer.chat_template:
        eos += [lookup[t] for t in end_of_turn_tokens(tokenizer.chat_template) if t in lookup]
    eos += declared
    eos += [tokenizer.special_tokens[n] for n in END_OF_TEXT_NAMES if n in tokenizer.special_tokens]
    return list(dict.fromkeys(eos))


def _apply_config(tokenizer: TokenizerSource, folder: Path, config: dict) -> None:
    """BOS, EOS, add_bos and chat template from the folder's config files."""
    model_config = _optional_json(folder / "config.json")
    generation = _optional_json(folder / "generation_config.json")
    lookup = token_lookup(tokenizer)
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str):
        tokenizer.chat_template = template
    else:
        tokenizer.chat_template = builtin_chat_template(tokenizer) or tokenizer.chat_template
    bos_text = _token_text(config.get("bos_token"))
    if bos_text in lookup:
        tokenizer.bos_id = lookup[bos_text]
    elif _ids(model_config.get("bos_token_id")):
        tokenizer.bos_id = _ids(model_config.get("bos_token_id"))[0]
    if "add_bos_token" in config:
        tokenizer.add_bos = bool(config["add_bos_token"])
    elif tokenizer.bos_id is not None and not tokenizer.add_bos and "bos_token" not in config:
        tokenizer.add_bos = True
    use_first_special_as_bos(tokenizer)
    eos_text = _token_text(config.get("eos_token"))
    declared = [lookup[eos_text]] if eos_text in lookup else []
    declared += _ids(generation.get("eos_token_id")) + _ids(model_config.get("eos_token_id")) + tokenizer.eos_ids
    tokenizer.eos_ids = end_of_generation_ids(tokenizer, lookup, declared)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="convert-tokenizer",
        description="Convert a tokenizer to distributed-llama's .t format "
        "(readable by dllama-py and distributed-llama).",
    )
    parser.add_argument(
        "source",
        metavar="SOURCE",
        help="folder or file: sentencepiece tokenizer.model, tiktoken rank file, tokenizer.json, or vocab.json "
        "(with merges.txt beside it); tokenizer_config.json, config.json and generation_config.json in the same "
        "folder supply BOS, EOS ids and the chat template",
    )
    parser.add_argument("name", metavar="NAME",
                        help="output name: writes dllama_tokenizer_NAME.t in the current folder")
    parser.add_argument("--output", metavar="PATH", type=Path, help="write the .t file to PATH instead")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `convert-tokenizer`; returns the exit status (2 on user error)."""
    args = build_parser().parse_args(argv)
    output = args.output or Path(f"dllama_tokenizer_{args.name}.t")
    try:
        tokenizer_file, warnings = convert(Path(args.source))
        write_tokenizer_file(output, tokenizer_file)
    except (SourceError, ValueError, OSError) as error:
        print(f"convert-tokenizer: error: {error}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"convert-tokenizer: warning: {warning}", file=sys.stderr)
    spec = infer_spec(tokenizer_file)
    print(
        f"wrote {output}: {tokenizer_file.vocab_size} tokens, kind {spec.kind}, bos {tokenizer_file.bos_id}, "
        f"eos {list(tokenizer_file.eos_ids)}, add_bos {int(tokenizer_file.add_bos)}, "
        f"chat template {'yes' if tokenizer_file.chat_template else 'no'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
