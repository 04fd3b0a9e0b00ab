"""Numpy references for the C++ core's tests, written from the math (dllama-format.md section 2),
plus the switch that runs a test on one SIMD path with a given number of threads.

Nothing here calls the C++ core except `kernel_settings`, which only selects the path and threads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import numpy.typing as npt

from dllama_py.model import kernels

BLOCK = 32  # values per Q40 / Q80 block
Q40_BYTES = 18  # fp16 d + 16 bytes of nibbles
Q80_BYTES = 34  # fp16 d + 32 int8

# Every SIMD path this machine runs; tests are parametrized over exactly these (no skips).
PATHS: list[str] = kernels.supported_isas()
THREADS = (1, 2, 3)

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


@contextmanager
def kernel_settings(isa: str, nthreads: int) -> Iterator[None]:
    """Run the body on SIMD path `isa` with a pool of `nthreads`, then restore both."""
    previous_isa, previous_threads = kernels.get_isa(), kernels.get_num_threads()
    kernels.set_isa(isa)
    kernels.set_num_threads(nthreads)
    try:
        yield
    finally:
        kernels.set_isa(previous_isa)
        kernels.set_num_threads(previous_threads)


# ---- fp16 ------------------------------------------------------------------------------------------
def fp16_bits(x: npt.ArrayLike) -> npt.NDArray[np.uint16]:
    """IEEE half bits of float32 values, rounded to nearest even (numpy's conversion)."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).view(np.uint16)


def fp16_value(bits: npt.ArrayLike) -> F32:
    """float32 values of IEEE half bits."""
    return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(np.float32)


# ---- Q80: d = max|x| / 127 (f32), id = 1/d (f32, 0 when d = 0), q = round_half_even(x * id) ------------
def _blocks(x: npt.ArrayLike) -> F32:
    values = np.ascontiguousarray(x, dtype=np.float32)
    assert values.shape[-1] % BLOCK == 0
    return values.reshape(-1, BLOCK)


def _inverse(d: F32) -> F32:
    """1/d in float32, 0 where d is 0."""
    safe = np.where(d != 0, d, np.float32(1)).astype(np.float32)
    return np.where(d != 0, np.float32(1) / safe, np.float32(0)).astype(np.float32)


def q80_scale_f32(x: npt.ArrayLike) -> F32:
    """The float32 d of every block (before fp16 rounding), shape (n_blocks,)."""
    return (np.abs(_blocks(x)).max(axis=1) / np.float32(127)).astype(np.float32)


def quantize_q80_reference(x: npt.ArrayLike) -> U8:
    """(..., n) float32 -> (..., n/32*34) uint8 Q80 blocks."""
    values = np.asarray(x, dtype=np.float32)
    blocks = _blocks(values)
    d = q80_scale_f32(values)
    q = np.rint(blocks * _inverse(d)[:, None]).astype(np.int8)  # rint rounds half to even
    out = np.empty((blocks.shape[0], Q80_BYTES), np.uint8)
    out[:, :2] = fp16_bits(d).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out.reshape(*values.shape[:-1], values.shape[-1] // BLOCK * Q80_BYTES)


def dequantize_q80_reference(q: npt.ArrayLike) -> F32:
    """(..., nb*34) uint8 -> (..., nb*32) float32: value = q * fp16(d)."""
    data = np.ascontiguousarray(q, dtype=np.uint8)
    blocks = data.reshape(-1, Q80_BYTES)
    d = fp16_value(blocks[:, :2].copy().view(np.uint16)[:, 0])
    values = blocks[:, 2:].view(np.int8).astype(np.float32) * d[:, None]
    return values.reshape(*data.shape[:-1], data.shape[-1] // Q80_BYTES * BLOCK)


# ---- Q40: max = signed value of largest |x| (positive wins a tie), d = max / -8, id = 1/d,
#      q = trunc(clamp(x * id + 8.5, 0, 15)); byte j = q[j] | q[j+16] << 4 --------------------------------
def q40_scale_f32(x: npt.ArrayLike) -> F32:
    """The float32 d of every block (before fp16 rounding), shape (n_blocks,)."""
    blocks = _blocks(x)
    high, low = blocks.max(axis=1), blocks.min(axis=1)
    signed_max = np.where(-low > high, low, high)  # a tie (-low == high) keeps the positive value
    return (signed_max / np.float32(-8)).astype(np.float32)


def quantize_q40_reference(x: npt.ArrayLike) -> U8:
    """(..., n) float32 -> (..., n/32*18) uint8 Q40 blocks."""
    values = np.asarray(x, dtype=np.float32)
    blocks = _blocks(values)
    d = q40_scale_f32(values)
    shifted = blocks * _inverse(d)[:, None] + np.float32(8.5)  # float32 throughout, no fused multiply-add
    q = np.clip(shifted, np.float32(0), np.float32(15)).astype(np.uint8)  # truncation: the values are >= 0
    out = np.empty((blocks.shape[0], Q40_BYTES), np.uint8)
    out[:, :2] = fp16_bits(d).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
    return out.reshape(*values.shape[:-1], values.shape[-1] // BLOCK * Q40_BYTES)


def dequantize_q40_reference(q: npt.ArrayLike) -> F32:
    """(..., nb*18) uint8 -> (..., nb*32) float32: value = (nibble - 8) * fp16(d)."""
    data = np.ascontiguousarray(q, dtype=np.uint8)
    blocks = data.reshape(-1, Q40_BYTES)
    d = fp16_value(blocks[:, :2].copy().view(np.uint16)[:, 0])
    nibbles = np.concatenate([blocks[:, 2:] & 0x0F, blocks[:, 2:] >> 4], axis=1).astype(np.float32)
    values = (nibbles - 8) * d[:, None]
    return values.reshape(*data.shape[:-1], data.shape[-1] // Q40_BYTES * BLOCK)


# ---- test data -------------------------------------------------------------------------------------
def awkward_values(rng: np.random.Generator, n_blocks: int, scale: float = 1.0) -> F32:
    """(n_blocks*32,) float32 with the blocks quantizers get wrong: random normal blocks, plus blocks
    whose largest magnitude is negative, exact +/- ties of the extreme, all zeros, negative zeros,
    constants, one non-zero value, and Q80 values at exact half steps (x * id = k + 0.5)."""
    blocks = (rng.standard_normal((n_blocks, BLOCK)) * scale).astype(np.float32)
    half_steps = np.concatenate([[127 / 8], (np.arange(31) - 15 + 0.5) / 8])  # max 127/8: d = 1/8, id = 8
    special = [
        -np.abs(blocks[0]),  # every value negative: the largest magnitude is negative
        np.concatenate([[3 * scale, -3 * scale], np.clip(blocks[0, 2:], -2 * scale, 2 * scale)]),  # a +/- tie
        np.zeros(BLOCK),
        np.full(BLOCK, -0.0),
        np.full(BLOCK, 0.7 * scale),
        np.concatenate([np.zeros(BLOCK - 1), [-2.0 * scale]]),  # a single non-zero value
        half_steps,  # x * id = k + 0.5 exactly: Q80 rounds these half to even
    ]
    picks = rng.choice(n_blocks, size=min(len(special), n_blocks), replace=False)
    for block, values in zip(picks, special):
        blocks[block] = values
    return blocks.reshape(-1)
