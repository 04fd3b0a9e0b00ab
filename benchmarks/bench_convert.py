"""Benchmark convert-hf on a random-weight model shaped like Llama 3.2 1B (bf16 safetensors).

    python benchmarks/bench_convert.py [--cache DIR] [--float-type q40] [--json PATH]

The input model (2.5 GB) is made once and cached. Each run converts it in a subprocess and
reports wall seconds and the subprocess's peak resident memory (getrusage RUSAGE_CHILDREN).
Targets (issue 3): under 30 s and under 2 GB; distributed-llama's converter takes 223 s and 9 GB.
Note: the input usually sits in the page cache after it is made, so this measures a warm read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "llama3.2-1b-shape-bf16"
TARGET_SECONDS, TARGET_PEAK_BYTES = 30.0, 2_000_000_000
UPSTREAM = {"seconds": 223.0, "peak_gb": 9.0}

# Llama 3.2 1B's config.json fields (weights here are random)
HF_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "rope_scaling": {
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}


def model_tensors(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a tied Llama checkpoint with this config."""
    dim, hidden, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q_dim = cfg["head_dim"] * cfg["num_attention_heads"]
    kv_dim = cfg["head_dim"] * cfg["num_key_value_heads"]
    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, dim))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors += [
            (p + "self_attn.q_proj.weight", (q_dim, dim)),
            (p + "self_attn.k_proj.weight", (kv_dim, dim)),
            (p + "self_attn.v_proj.weight", (kv_dim, dim)),
            (p + "self_attn.o_proj.weight", (dim, q_dim)),
            (p + "mlp.gate_proj.weight", (hidden, dim)),
            (p + "mlp.up_proj.weight", (hidden, dim)),
            (p + "mlp.down_proj.weight", (dim, hidden)),
            (p + "input_layernorm.weight", (dim,)),
            (p + "post_attention_layernorm.weight", (dim,)),
        ]
    return tensors + [("model.norm.weight", (dim,))]


def write_bf16_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int = 0) -> None:
    """Write random bf16 tensors in the safetensors layout, streaming a repeated 8 MiB random block,
    so memory stays small whatever the model size."""
    header, offset = {}, 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned, as safetensors does
    values = (np.random.default_rng(seed).standard_normal(4 << 20) * 0.02).astype(np.float32)
    block = memoryview((values.view(np.uint32) >> 16).astype(np.uint16)).cast("B")  # bf16 bits
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as file:
        file.write(struct.pack("<Q", len(blob)) + blob)
        remaining = offset
        while remaining:
            n = min(remaining, len(block))
            file.write(block[:n])
            remaining -= n
    os.replace(tmp, path)


def ensure_model(cache: Path) -> Path:
    """The cached benchmark model folder, made on first use (about 2.5 GB)."""
    folder = cache / MODEL_NAME
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    print(f"making {folder} (once) ...", file=sys.stderr)
    write_bf16_safetensors(folder / "model.safetensors", model_tensors(HF_CONFIG))
    (folder / "config.json").write_text(json.dumps(HF_CONFIG, indent=2))
    return folder


def run_convert(model: Path, float_type: str, output: Path, threads: int | None) -> tuple[float, int]:
    """Run convert-hf in a subprocess; returns (wall seconds, peak RSS bytes of the subprocess)."""
    command = [
        sys.executable,
        "-m",
        "dllama_py.converter.convert_hf",
        str(model),
        float_type,
        "bench",
        "--output",
        str(output),
        "--quiet",
    ]
    if threads:
        command += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    result = subprocess.run(command, check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"convert-hf failed ({result.returncode}): {result.stderr.strip()}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    return seconds, peak_kib * 1024


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints a table and optionally writes JSON.
    Returns 0 when the targets are met, 1 if not."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "dllama-py" / "bench",
        help="folder for the generated input model (default: ~/.cache/dllama-py/bench)",
    )
    parser.add_argument(
        "--float-type",
        default="q40",
        choices=["f32", "f16", "q40", "q80"],
        help="output weight type (default: q40)",
    )
    parser.add_argument("--threads", type=int, help="quantization threads (default: all cores)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    model = ensure_model(args.cache)
    input_bytes = (model / "model.safetensors").stat().st_size
    with tempfile.TemporaryDirectory(dir=args.cache) as out_dir:
        output = Path(out_dir) / "out.m"
        seconds, peak = run_convert(model, args.float_type, output, args.threads)
        output_bytes = output.stat().st_size
    ok = seconds < TARGET_SECONDS and peak < TARGET_PEAK_BYTES
    results = {
        "benchmark": "convert-hf",
        "model": MODEL_NAME,
        "float_type": args.float_type,
        "input_bytes": input_bytes,
        "output_bytes": output_bytes,
        "seconds": round(seconds, 2),
        "peak_rss_bytes": peak,
        "input_gb_per_s": round(input_bytes / seconds / 1e9, 3),
        "targets": {"seconds": TARGET_SECONDS, "peak_rss_bytes": TARGET_PEAK_BYTES},
        "targets_met": ok,
        "distributed_llama": UPSTREAM,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    rows = [
        ("model", MODEL_NAME),
        ("float type", args.float_type),
        ("input (bf16)", f"{input_bytes / 2**30:.2f} GiB"),
        ("output", f"{output_bytes / 2**30:.2f} GiB"),
        ("wall time", f"{seconds:.1f} s  (target < {TARGET_SECONDS:.0f} s; distributed-llama 223 s)"),
        ("peak RSS", f"{peak / 1e9:.2f} GB  (target < 2 GB; distributed-llama 9 GB)"),
        ("read speed", f"{input_bytes / seconds / 1e9:.2f} GB/s of input"),
        ("targets met", "yes" if ok else "NO"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
