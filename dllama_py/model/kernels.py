"""Typed Python face of the C++ core (`dllama_py._core`).

Everything here is a thin wrapper: arrays go to C++ without copies and the GIL is released
for the whole call. Quantized tensors are uint8 arrays of blocks: Q40 is 18 bytes per 32
values, Q80 34 bytes per 32 values (distributed-llama's layout).
"""

from __future__ import annotations

from enum import Enum

import numpy as np
import numpy.typing as npt

from dllama_py import _core

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


class WeightLayout(Enum):
    """How a node holds a weight matrix in memory: a file's float types, or Q40 regrouped 16 rows
    at a time (`repack_q40x16`) for the SIMD paths with a kernel for it. The loader chooses it
    (engine/loader.py); the forward pass hands it to `matmul` as it is."""

    F32 = "f32"
    F16 = "f16"
    Q40 = "q40"
    Q80 = "q80"
    Q40X16 = "q40x16"

    @property
    def quantized_input(self) -> bool:
        """Whether a matmul over these weights takes Q80 blocks of x (else float32 x)."""
        return self not in (WeightLayout.F32, WeightLayout.F16)


def weight_layout(layout: WeightLayout | str) -> WeightLayout:
    """`layout` as a WeightLayout; a name that is none raises ValueError with the known ones."""
    if isinstance(layout, WeightLayout):
        return layout
    try:
        return WeightLayout(layout)
    except ValueError:
        raise ValueError(f"unknown weight type {layout!r}; expected one of {WEIGHT_TYPES}") from None


def q80_row_bytes(cols: int) -> int:
    """Bytes of one row of `cols` values in Q80 blocks (the activations' quantized form)."""
    return cols // BLOCK_SIZE * Q80_BLOCK_BYTES


def row_bytes(weight_type: str, cols: int) -> int:
    """Bytes of one row of `cols` values stored as `weight_type` (f32, f16, q40 or q80)."""
    if weight_type == "f32":
        return 4 * cols
    if weight_type == "f16":
        return 2 * cols
    if weight_type not in ("q40", "q80"):
        raise ValueError(f"unknown weight type {weight_type!r}; expected one of {WEIGHT_TYPES}")
    if cols % BLOCK_SIZE:
        raise ValueError(f"{weight_type} rows need a multiple of {BLOCK_SIZE} values, got {cols}")
    return cols // BLOCK_SIZE * (Q40_BLOCK_BYTES if weight_type == "q40" else Q80_BLOCK_BYTES)


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
    return "q80" if weight_layout(weight_type).quantized_input else "f32"


_MATMUL = {
    WeightLayout.F32: matmul_f32_f32_f32,
    WeightLayout.F16: matmul_f32_f16_f32,
    WeightLayout.Q40: matmul_q80_q40_f32,
    WeightLayout.Q80: matmul_q80_q80_f32,
    WeightLayout.Q40X16: matmul_q80_q40x16_f32,
}


def matmul_many(x: np.ndarray, ws: list[np.ndarray], layout: WeightLayout | str | list[WeightLayout],
                ys: list[npt.NDArray[np.float32]]) -> None:
    """ys[i] = x @ ws[i]^T for several matrices sharing the input x (q/k/v, w1/w3), of one
    layout or one each: Q40 and Q80 blocks of one layout prepare x once and run in one pass
    over the thread pool."""
    if isinstance(layout, list):
        if len(set(layout)) > 1:
            for w, lay, y in zip(ws, layout, ys, strict=True):
                matmul(x, w, lay, y)
            return
        layout = layout[0]
    layout = weight_layout(layout)
    if layout in (WeightLayout.Q40, WeightLayout.Q80):
        _core.matmul_q80_many(x, ws, ys, layout == WeightLayout.Q80)
    else:
        for w, y in zip(ws, ys):
            _MATMUL[layout](x, w, y)


def matmul(x: np.ndarray, w: np.ndarray, layout: WeightLayout | str, y: npt.NDArray[np.float32]) -> None:
    """y (B, rows) = x (B, cols) @ W^T for weights w held in `layout`.

    x is float32 (B, cols) for f32/f16 weights and Q80 blocks uint8 (B, cols/32*34) otherwise.
    """
    _MATMUL[weight_layout(layout)](x, w, y)


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
    layout = WeightLayout.Q40
    if q40x16_fast():
        w, layout = repack_q40x16_inplace(w), WeightLayout.Q40X16
    x = np.zeros((1, blocks * 34), dtype=np.uint8)
    quantize_q80_into(np.linspace(-1, 1, cols, dtype=np.float32).reshape(1, cols), x)
    y = np.zeros((1, rows), dtype=np.float32)
    matmul(x, w, layout, y)
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        matmul(x, w, layout, y)
        seconds.append(time.perf_counter() - start)
    return w.nbytes / sorted(seconds)[runs // 2] / 1e9
