"""convert-gguf: write a distributed-llama `.m` model and `.t` tokenizer from a GGUF file.

    convert-gguf MODEL.gguf [--weight-type TYPE] [--output M] [--tokenizer-output T]

The `.m` format holds every matrix in one type (`--weight-type`, default the type most of the
GGUF's matrices are used in: q40 for a Q4_0 or Q4_K_M file, f16 for an F16 one); matrices in
another type are converted, K-quants requantized (formats/gguf_file.py says how). The embedding
and norms are written as f32, as distributed-llama's converter does. The `.t` holds the GGUF's
vocabulary, BOS/EOS and chat template (converter/gguf_tokenizer.py). Both files are what
distributed-llama itself reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import NoReturn

from dllama_py.converter.gguf_tokenizer import tokenizer_file_from_gguf
from dllama_py.converter.tokenizer_sources import SourceError

from dllama_py.formats.gguf_file import DIRECT, GGUFModel
from dllama_py.formats.model_file import ModelFormatError, ModelWriter
from dllama_py.formats.tokenizer_file import write_tokenizer_file
from dllama_py.model.config import FloatType
from dllama_py.model.structure import tensor_specs


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="convert-gguf", description=__doc__.split("\n\n")[0] + " Architectures: llama (Llama 1-3, "
                     "Mistral), qwen3, qwen3moe.")
    parser.add_argument("gguf", metavar="MODEL.gguf", type=Path, help="the GGUF file (llama.cpp's format)")
    parser.add_argument("--weight-type", choices=[t.label for t in FloatType], default=None,
                        help="type of every matrix in the .m file (default: the type most of the GGUF's matrices "
                             "are used in)")
    parser.add_argument("--output", "-o", type=Path, metavar="M",
                        help="the .m file to write (default: the GGUF's name with .m, in the current folder)")
    parser.add_argument("--tokenizer-output", type=Path, metavar="T",
                        help="the .t file to write (default: the GGUF's name with .t, in the current folder)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    return parser


def convert(gguf: Path, output: Path, tokenizer_output: Path, weight_type: str | None = None,
            progress: bool = True, log=print) -> tuple[FloatType, list[str]]:
    """Write `output` (.m) and `tokenizer_output` (.t) from `gguf`; returns the matrices' type and
    the tokenizer's warnings."""
    from tqdm import tqdm

    with GGUFModel(gguf) as model:
        tokenizer_file, warnings = tokenizer_file_from_gguf(model.metadata, str(gguf))
        target = FloatType.from_label(weight_type) if weight_type else model.config.weight_float_type
        config = dataclasses.replace(model.config, weight_float_type=target, tensor_types=())
        converted: dict[str, int] = {}
        for spec in tensor_specs(config):
            info = model.tensors[spec.name].source.info
            if DIRECT.get(info.ggml_type) != spec.float_type:
                key = f"{info.type_name} to {spec.float_type.label}"
                converted[key] = converted.get(key, 0) + 1
        for key, count in sorted(converted.items()):
            log(f"converting {count} tensor{'s' if count > 1 else ''} from {key}")
        with ModelWriter(output, config) as writer:
            total = sum(spec.nbytes for spec in writer.specs)
            with tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not progress) as bar:
                for spec in writer.specs:
                    for chunk in model.tensors[spec.name].chunks(spec.float_type):
                        writer.write_encoded(spec.name, chunk)
                        bar.update(chunk.nbytes)
                    model.release(spec.name)
        write_tokenizer_file(tokenizer_output, tokenizer_file)
    return target, warnings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stem = args.gguf.name.removesuffix(".gguf")
    output = args.output or Path(f"{stem}.m")
    tokenizer_output = args.tokenizer_output or Path(f"{stem}.t")
    try:
        if not args.gguf.is_file():
            raise ModelFormatError(f"{args.gguf}: no such file")
        target, warnings = convert(args.gguf, output, tokenizer_output, args.weight_type, progress=not args.quiet,
                                   log=(lambda message: None) if args.quiet else
                                   (lambda message: print(f"convert-gguf: {message}", file=sys.stderr)))
    except (ModelFormatError, SourceError, OSError) as error:
        message = error.strerror + f": {error.filename}" if isinstance(error, OSError) and error.filename else error
        print(f"convert-gguf: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convert-gguf: interrupted; no .m written", file=sys.stderr)
        return 130
    if not args.quiet:
        for warning in warnings:
            print(f"convert-gguf: note: {warning}", file=sys.stderr)
        print(f"convert-gguf: wrote {output} ({os.path.getsize(output) / 2**20:.1f} MiB, weights {target.label}) "
              f"and {tokenizer_output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
