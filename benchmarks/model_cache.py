"""Random-weight benchmark models, made once and cached.

`llama_1b_q40()` is a model of Llama 3.2 1B's shape (dim 2048, 16 layers, 32 heads, 8 KV heads,
hidden 8192, vocab 128256, tied-size classifier) in q40; its weights are random bytes with a
sane fp16 scale, so making it takes seconds, not minutes. Speed does not depend on the values.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dllama_py.formats.model_file import ModelWriter
from dllama_py.model.config import ArchType, FloatType, ModelConfig
from dllama_py.model.structure import tensor_specs

CACHE = Path(os.environ.get("DLLAMA_BENCH_CACHE", Path.home() / ".cache" / "dllama-py" / "bench"))


def llama_1b_config(weight_type: FloatType = FloatType.Q40, n_layers: int = 16, dim: int = 2048,
                    hidden: int = 8192, vocab: int = 128256, heads: int = 32, kv_heads: int = 8) -> ModelConfig:
    return ModelConfig(arch=ArchType.LLAMA, dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=heads,
                       n_kv_heads=kv_heads, vocab_size=vocab, max_seq_len=2048, weight_float_type=weight_type,
                       rope_theta=500000, norm_epsilon=1e-5)


def write_random_model(path: Path, config: ModelConfig, seed: int = 0) -> Path:
    """Write a random model: block weights as random bytes with scale fp16(0.01), f32 tensors
    N(0, 0.02) (norms 1). Rows are written in chunks so memory stays small."""
    rng = np.random.default_rng(seed)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    tmp = path.with_suffix(".partial")
    with ModelWriter(tmp, config) as writer:
        for spec in tensor_specs(config):
            rows, cols = spec.shape
            ft = spec.float_type
            step = max(1, (64 << 20) // max(1, ft.row_bytes(cols)))
            for start in range(0, rows, step):
                n = min(step, rows - start)
                if spec.name.endswith("norm"):
                    writer.write_encoded(spec.name, np.ones((n, cols), dtype=np.float32))
                elif ft in (FloatType.Q40, FloatType.Q80):
                    block = ft.block_bytes
                    data = rng.integers(0, 256, size=(n, cols // 32, block), dtype=np.uint8)
                    data[:, :, :2] = scale
                    if ft == FloatType.Q80:  # keep int8 values away from -128
                        data[:, :, 2:] &= 0x7F
                    writer.write_encoded(spec.name, data.reshape(n, -1))
                else:
                    writer.write(spec.name, rng.standard_normal((n, cols), dtype=np.float32) * 0.02)
    tmp.replace(path)
    return path


def llama_1b_q40() -> Path:
    """The cached 1B-shaped q40 model (about 1.7 GB: q40 matrices plus the f32 embedding)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / "dllama_model_llama1b-shape_q40.m"
    if not path.exists():
        print(f"making {path} (once)...", flush=True)
        write_random_model(path, llama_1b_config())
    return path


def tiny_twin(config: ModelConfig) -> Path:
    """A model with the same layers and heads structure but tiny widths: its time per token is
    almost only the Python side of the forward pass."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"dllama_model_twin{config.n_layers}_q40.m"
    if not path.exists():
        twin = llama_1b_config(n_layers=config.n_layers, dim=256, hidden=256, vocab=256,
                               heads=config.n_heads // 4, kv_heads=config.n_kv_heads // 4)
        write_random_model(path, twin)
    return path
