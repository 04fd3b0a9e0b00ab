"""convert-hf: Hugging Face safetensors model folder -> distributed-llama `.m` file.

    convert-hf HF_DIR FLOAT_TYPE NAME [--output PATH]

Writes what distributed-llama's `convert-hf.py` writes (same header keys in the same order,
same tensor order, Llama q/k row permutation, f32 embedding/norms/router), but reads row
chunks instead of whole tensors, quantizes in the C++ core and writes large buffers, so memory
stays bounded and a 1B model converts in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import numpy.typing as npt
from dllama_py.converter.hf_config import ConversionError, parse_hf_config
from dllama_py.converter.hf_safetensors import SafetensorsCheckpoint

from dllama_py.formats.model_file import ModelFormatError, ModelWriter
from dllama_py.model.config import ArchType, ConfigError, FloatType, ModelConfig
from dllama_py.model.structure import TensorSpec, tensor_specs

CHUNK_BYTES = 64 << 20  # float32 bytes converted at a time
Transform = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]


def rotate_half_to_interleaved(rows: npt.NDArray[np.float32], head_dim: int) -> npt.NDArray[np.float32]:
    """Permute q/k projection rows (n_heads*head_dim, cols) from HF's rotate-half order to Meta's
    interleaved pairs, head by head: row h*hd + 2i + j <- row h*hd + j*hd/2 + i.
    `rows` must hold whole heads; returns a new float32 array of the same shape."""
    n_rows, cols = rows.shape
    heads = rows.reshape(n_rows // head_dim, 2, head_dim // 2, cols)  # (heads, half, pair, cols)
    return heads.swapaxes(1, 2).reshape(n_rows, cols)


@dataclass(frozen=True)
class Source:
    """Where a `.m` tensor comes from: HF tensor name, optional row transform and its row granularity."""

    hf_name: str
    transform: Transform | None = None
    row_multiple: int = 1


def plan_sources(config: ModelConfig, checkpoint: SafetensorsCheckpoint, tied: bool) -> dict[str, Source]:
    """Map every `.m` tensor name to its HF source. Tied models (or models without lm_head.weight)
    take the classifier from the embedding."""
    hd = config.head_dim
    permute: Transform | None = None
    if config.arch == ArchType.LLAMA:  # Qwen3 keeps rotate-half order (Falcon RoPE at run time)

        def permute(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
            return rotate_half_to_interleaved(rows, hd)

    sources = {"embedding": Source("model.embed_tokens.weight"), "final_norm": Source("model.norm.weight")}
    use_embedding = tied or "lm_head.weight" not in checkpoint
    sources["classifier"] = Source("model.embed_tokens.weight" if use_embedding else "lm_head.weight")
    mlp = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
    for layer in range(config.n_layers):
        hf, ours = f"model.layers.{layer}.", f"layers.{layer}."
        sources[ours + "wq"] = Source(hf + "self_attn.q_proj.weight", permute, hd)
        sources[ours + "wk"] = Source(hf + "self_attn.k_proj.weight", permute, hd)
        sources[ours + "wv"] = Source(hf + "self_attn.v_proj.weight")
        sources[ours + "wo"] = Source(hf + "self_attn.o_proj.weight")
        sources[ours + "q_norm"] = Source(hf + "self_attn.q_norm.weight")
        sources[ours + "k_norm"] = Source(hf + "self_attn.k_norm.weight")
        sources[ours + "attention_norm"] = Source(hf + "input_layernorm.weight")
        sources[ours + "ffn_norm"] = Source(hf + "post_attention_layernorm.weight")
        sources[ours + "router"] = Source(hf + "mlp.gate.weight")
        for w, proj in mlp.items():
            sources[ours + w] = Source(f"{hf}mlp.{proj}.weight")
            for expert in range(config.n_experts):
                sources[f"{ours}experts.{expert}.{w}"] = Source(f"{hf}mlp.experts.{expert}.{proj}.weight")
    return sources


def check_sources(
    specs: list[TensorSpec],
    sources: dict[str, Source],
    checkpoint: SafetensorsCheckpoint,
) -> list[str]:
    """Check that every needed HF tensor exists with the expected shape and that no bias is present.
    Returns the names of ignored HF tensors; raises ConversionError."""
    biases = sorted(name for name in checkpoint.tensors if name.endswith(".bias"))
    if biases:
        raise ConversionError(
            f"{checkpoint.folder}: the model has bias tensors ({biases[0]}, ... {len(biases)} "
            f"in all); biases are not supported"
        )
    used = set()
    for spec in specs:
        source = sources[spec.name]
        if source.hf_name not in checkpoint:
            raise ConversionError(
                f"{checkpoint.folder}: tensor {source.hf_name} is missing (needed for {spec.name})"
            )
        found = checkpoint.tensors[source.hf_name].rows_cols
        if found != spec.shape:
            raise ConversionError(
                f"{checkpoint.folder}: tensor {source.hf_name} has shape {list(found)}, "
                f"expected {list(spec.shape)} from config.json"
            )
        used.add(source.hf_name)
    return sorted(set(checkpoint.tensors) - used)


def convert_chunks(
    checkpoint: SafetensorsCheckpoint,
    source: Source,
    rows: int,
    cols: int,
) -> Iterator[npt.NDArray[np.float32]]:
    """Yield the source tensor as float32 row chunks of about CHUNK_BYTES, transformed."""
    step = max(1, CHUNK_BYTES // (4 * cols) // source.row_multiple) * source.row_multiple
    for start in range(0, rows, step):
        chunk = checkpoint.read_rows(source.hf_name, start, min(rows, start + step))
        yield source.transform(chunk) if source.transform else chunk


def convert(
    hf_dir: Path, float_type: FloatType, output: Path, progress: bool = True, allow_non_finite: bool = False
) -> ModelConfig:
    """Convert the HF model folder `hf_dir` to `output` with weights in `float_type`.

    Returns the written ModelConfig; raises ConversionError (unsupported or damaged input, such as
    a weight that is NaN or infinite unless `allow_non_finite`) or OSError.
    The output appears only when complete (written to `output + '.tmp'`, then renamed).
    """
    config_path = hf_dir / "config.json"
    try:
        hf = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{hf_dir}: no config.json (is this a Hugging Face model folder?)") from None
    except json.JSONDecodeError as error:
        raise ConversionError(f"{config_path}: not valid JSON ({error})") from None
    parsed = parse_hf_config(hf, float_type)
    config = parsed.config
    try:
        specs = tensor_specs(config)
    except ConfigError as error:
        raise ConversionError(f"{hf_dir}: {error}") from None
    if float_type != FloatType.F32:
        _require_core()
    for warning in parsed.warnings:
        print(f"convert-hf: warning: {warning}", file=sys.stderr)
    checkpoint = SafetensorsCheckpoint(hf_dir)
    try:
        sources = plan_sources(config, checkpoint, parsed.tied_embeddings)
        ignored = check_sources(specs, sources, checkpoint)
        if ignored:
            print(
                f"convert-hf: warning: ignoring {len(ignored)} tensors not used by the model "
                f"({', '.join(ignored[:3])}{', ...' if len(ignored) > 3 else ''})",
                file=sys.stderr,
            )
        _write(output, config, specs, sources, checkpoint, progress, allow_non_finite)
    finally:
        checkpoint.close()
    return config


def _write(
    output: Path,
    config: ModelConfig,
    specs: list[TensorSpec],
    sources: dict[str, Source],
    checkpoint: SafetensorsCheckpoint,
    progress: bool,
    allow_non_finite: bool = False,
) -> None:
    from tqdm import tqdm

    total = sum(spec.nbytes for spec in specs)
    with (
        ModelWriter(output, config) as writer,
        tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="convert-hf",
            file=sys.stderr,
            disable=not progress,
            dynamic_ncols=True,
        ) as bar,
    ):
        for index, spec in enumerate(specs, 1):
            bar.set_postfix_str(f"tensor {index}/{len(specs)} {spec.name}", refresh=False)
            rows, cols = spec.shape
            non_finite = 0
            for chunk in convert_chunks(checkpoint, sources[spec.name], rows, cols):
                bad = chunk.size - int(np.count_nonzero(np.isfinite(chunk)))
                if bad and not allow_non_finite:
                    raise ConversionError(
                        f"tensor {sources[spec.name].hf_name} (for {spec.name}) holds NaN or infinite values: "
                        "the checkpoint is damaged, and the model would compute NaN (--allow-non-finite "
                        "converts it anyway)"
                    )
                non_finite += bad
                before = writer.bytes_written
                writer.write(spec.name, chunk)
                bar.update(writer.bytes_written - before)
            if non_finite:
                tqdm.write(
                    f"convert-hf: warning: tensor {sources[spec.name].hf_name} (for {spec.name}) holds "
                    f"{non_finite} NaN or infinite values",
                    file=sys.stderr,
                )


def _require_core() -> None:
    try:
        from dllama_py import _core  # noqa: F401
    except ImportError:
        raise ConversionError(
            "f16, q40 and q80 need the C++ extension dllama_py._core, which is not built "
            "(run: pip install -e .); f32 works without it"
        ) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Report a usage mistake in one line and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of convert-hf."""
    parser = _Parser(
        prog="convert-hf",
        description="Convert a Hugging Face model folder (config.json + *.safetensors) to a "
        "distributed-llama .m file. Architectures: llama, mistral, qwen3, qwen3_moe.",
    )
    parser.add_argument(
        "hf_dir",
        metavar="HF_DIR",
        type=Path,
        help="model folder with config.json and one or more *.safetensors files (with or without "
        "model.safetensors.index.json); tensors in f32, f16 or bf16",
    )
    parser.add_argument(
        "float_type",
        metavar="FLOAT_TYPE",
        choices=[t.label for t in FloatType],
        help="encoding of the weight matrices: f32, f16, q40 or q80 (embedding and norms stay f32). "
        "q40 is what dllama runs fastest",
    )
    parser.add_argument("name", metavar="NAME", help="model name used in the output file name")
    parser.add_argument(
        "--output",
        "-o",
        metavar="PATH",
        type=Path,
        help="where to write the .m file (default: dllama_model_NAME_FLOAT_TYPE.m in the current folder)",
    )
    parser.add_argument(
        "--threads", metavar="N", type=int, help="threads for quantization (default: all CPU cores)"
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.add_argument(
        "--allow-non-finite",
        action="store_true",
        help="convert weights that are NaN or infinite instead of refusing the model (the default names "
        "the first such tensor); the converted model will most likely produce NaN",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run convert-hf with `argv` (default sys.argv[1:]); returns the exit status (0 ok, 2 user error)."""
    args = build_parser().parse_args(argv)
    float_type = FloatType.from_label(args.float_type)
    output = args.output or Path(f"dllama_model_{args.name}_{args.float_type}.m")
    try:
        if not args.hf_dir.is_dir():
            raise ConversionError(f"{args.hf_dir} is not a folder")
        if args.threads is not None:
            if args.threads < 1:
                raise ConversionError(f"--threads must be at least 1, got {args.threads}")
            _require_core()
            from dllama_py import _core

            _core.set_num_threads(args.threads)
        config = convert(
            args.hf_dir, float_type, output, progress=not args.quiet, allow_non_finite=args.allow_non_finite
        )
    except (ConversionError, ModelFormatError, OSError) as error:
        message = (
            error.strerror + f": {error.filename}" if isinstance(error, OSError) and error.filename else error
        )
        print(f"convert-hf: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convert-hf: interrupted; no output written", file=sys.stderr)
        return 130
    size = os.path.getsize(output)
    if not args.quiet:
        print(
            f"convert-hf: wrote {output} ({size / 2**20:.1f} MiB, {config.arch.name.lower()}, "
            f"{config.n_layers} layers, weights {float_type.label})",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
