"""Typed Python face of the C++ core (`dllama_py._core`).

Everything here is a thin wrapper: arrays go to C++ without copies and the GIL is released
for the whole call. Quantized tensors are uint8 arrays of blocks: Q40 is 18 bytes per 32
values, Q80 34 bytes per 32 values (distributed-llama's layout).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from . import _core

Q40_BLOCK_BYTES: int = _core.Q40_BLOCK_BYTES
Q80_BLOCK_BYTES: int = _core.Q80_BLOCK_BYTES
BLOCK_SIZE: int = _core.Q40_BLOCK_SIZE

compiled_isas = _core.compiled_isas
supported_isas = _core.supported_isas
best_isa = _core.best_isa
get_isa = _core.get_isa
set_isa = _core.set_isa
get_num_threads = _core.get_num_threads
set_num_threads = _core.set_num_threads
hardware_threads = _core.hardware_threads

quantize_q40 = _core.quantize_q40
dequantize_q40 = _core.dequantize_q40
quantize_q80 = _core.quantize_q80
dequantize_q80 = _core.dequantize_q80
quantize_q80_into = _core.quantize_q80_into
f32_to_f16 = _core.f32_to_f16
f16_to_f32 = _core.f16_to_f32

rms_norm = _core.rms_norm
silu = _core.silu
gelu = _core.gelu
mul = _core.mul
add = _core.add
add_q80 = _core.add_q80
softmax = _core.softmax
embedding = _core.embedding
rope_frequencies = _core.rope_frequencies
rope = _core.rope
attention = _core.attention
moe_gate = _core.moe_gate
stream_read = _core.stream_read

matmul_f32_f32_f32 = _core.matmul_f32_f32_f32
matmul_f32_f16_f32 = _core.matmul_f32_f16_f32
matmul_q80_q40_f32 = _core.matmul_q80_q40_f32
matmul_q80_q80_f32 = _core.matmul_q80_q80_f32
matmul_q80_q40x16_f32 = _core.matmul_q80_q40x16_f32
repack_q40x16 = _core.repack_q40x16
repack_q40x16_inplace = _core.repack_q40x16_inplace
q40x16_fast = _core.q40x16_fast

WEIGHT_TYPES = ("f32", "f16", "q40", "q80")


def row_bytes(weight_type: str, cols: int) -> int:
    """Bytes of one row of `cols` values stored as `weight_type` (f32, f16, q40 or q80)."""
    if weight_type == "f32":
        return 4 * cols
    if weight_type == "f16":
        return 2 * cols
    if cols % BLOCK_SIZE:
        raise ValueError(f"{weight_type} rows need a multiple of {BLOCK_SIZE} values, got {cols}")
    per_block = Q40_BLOCK_BYTES if weight_type == "q40" else Q80_BLOCK_BYTES
    if weight_type not in ("q40", "q80"):
        raise ValueError(f"unknown weight type {weight_type!r}; expected one of {WEIGHT_TYPES}")
    return cols // BLOCK_SIZE * per_block


def encode_weights(w: npt.NDArray[np.float32], weight_type: str) -> np.ndarray:
    """Encode a float32 matrix (rows, cols) in `weight_type`: f32 as is, f16 as uint16 bits,
    q40/q80 as uint8 blocks (rows, row_bytes)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if weight_type == "f32":
        return w
    if weight_type == "f16":
        return f32_to_f16(w)
    if weight_type == "q40":
        return quantize_q40(w)
    if weight_type == "q80":
        return quantize_q80(w)
    raise ValueError(f"unknown weight type {weight_type!r}; expected one of {WEIGHT_TYPES}")


def decode_weights(w: np.ndarray, weight_type: str) -> npt.NDArray[np.float32]:
    """Inverse of `encode_weights`: the float32 values the stored weights stand for."""
    if weight_type == "f32":
        return np.asarray(w, dtype=np.float32)
    if weight_type == "f16":
        return f16_to_f32(np.ascontiguousarray(w))
    if weight_type == "q40":
        return dequantize_q40(np.ascontiguousarray(w))
    if weight_type == "q80":
        return dequantize_q80(np.ascontiguousarray(w))
    raise ValueError(f"unknown weight type {weight_type!r}; expected one of {WEIGHT_TYPES}")


def input_type_for(weight_type: str) -> str:
    """The input type a matmul with these weights takes: q80 for block weights, f32 otherwise."""
    return "q80" if weight_type in ("q40", "q80") else "f32"


def matmul_many(x: np.ndarray, ws: list[np.ndarray], weight_type: str, ys: list[npt.NDArray[np.float32]]) -> None:
    """ys[i] = x @ ws[i]^T for several matrices of one weight type sharing the input x (q/k/v,
    w1/w3): block weights prepare x once and run in one pass over the thread pool."""
    if weight_type in ("q40", "q80"):
        _core.matmul_q80_many(x, ws, ys, weight_type == "q80")
    elif weight_type == "q40x16":
        for w, y in zip(ws, ys):
            matmul_q80_q40x16_f32(x, w, y)
    else:
        for w, y in zip(ws, ys):
            matmul(x, w, weight_type, y)


def matmul(x: np.ndarray, w: np.ndarray, weight_type: str, y: npt.NDArray[np.float32]) -> None:
    """y (B, rows) = x (B, cols) @ W^T for stored weights w of `weight_type`.

    x is float32 (B, cols) for f32/f16 weights and Q80 blocks uint8 (B, cols/32*34) for q40/q80.
    """
    if weight_type == "f32":
        matmul_f32_f32_f32(x, w, y)
    elif weight_type == "f16":
        matmul_f32_f16_f32(x, w, y)
    elif weight_type == "q40":
        matmul_q80_q40_f32(x, w, y)
    elif weight_type == "q80":
        matmul_q80_q80_f32(x, w, y)
    elif weight_type == "q40x16":  # Q40 regrouped 16 rows at a time (repack_q40x16)
        matmul_q80_q40x16_f32(x, w, y)
    else:
        raise ValueError(f"unknown weight type {weight_type!r}; expected one of {WEIGHT_TYPES}")


def measure_matmul_speed(rows: int = 16384, cols: int = 8192, runs: int = 7) -> float:
    """How fast this computer runs the decoding matmul: GB/s of Q40 weights that one B=1
    product streams, on the current SIMD path and thread count, in the layout the engine uses.
    Generation is this matmul over every weight, so a node's tokens/s is proportional to it
    (whether memory or arithmetic is what limits the node). The 75 MB matrix is larger than
    any cache; about 0.1-0.3 s in all."""
    import time

    blocks = cols // 32
    w = np.resize(np.arange(251, dtype=np.uint8), rows * blocks * 18).reshape(rows, blocks, 18)
    w[:, :, 0], w[:, :, 1] = 0x00, 0x2C  # every block scale the f16 0.0625 (no inf/NaN/denormal)
    w = w.reshape(rows, blocks * 18)
    weight_type = "q40"
    if q40x16_fast():
        w, weight_type = repack_q40x16_inplace(w), "q40x16"
    x = np.zeros((1, blocks * 34), dtype=np.uint8)
    quantize_q80_into(np.linspace(-1, 1, cols, dtype=np.float32).reshape(1, cols), x)
    y = np.zeros((1, rows), dtype=np.float32)
    matmul(x, w, weight_type, y)
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        matmul(x, w, weight_type, y)
        seconds.append(time.perf_counter() - start)
    return w.nbytes / sorted(seconds)[runs // 2] / 1e9
