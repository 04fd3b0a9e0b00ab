"""Q40 weights regrouped 16 rows at a time (Q40x16): the layout written by hand, and the matmul
against numpy on every SIMD path (the AVX-512 VNNI path has its own kernel; the others use the
reference one), with 1-3 threads, batches 1, 7 and 33, row counts that leave a partial group.
"""

from __future__ import annotations

import numpy as np
import pytest
from kernel_reference import (
    PATHS,
    THREADS,
    dequantize_q40_reference,
    dequantize_q80_reference,
    kernel_settings,
    quantize_q40_reference,
    quantize_q80_reference,
)

from dllama_py.model import kernels

U = 2.0**-24


def test_repack_puts_each_rows_scale_and_nibble_quads_where_the_layout_says() -> None:
    rng = np.random.default_rng(0)
    rows, nb = 19, 3  # two groups, the second holding 3 rows and 13 zero rows
    w = quantize_q40_reference(rng.standard_normal((rows, nb * 32)).astype(np.float32))
    packed = kernels.repack_q40x16(w)
    assert packed.shape == (2, nb * 288)
    blocks = packed.reshape(2, nb, 288)
    source = w.reshape(rows, nb, 18)
    for row in range(32):
        g, r = divmod(row, 16)
        for k in range(nb):
            scale = blocks[g, k, 2 * r:2 * r + 2]
            quads = [blocks[g, k, 32 + c * 64 + r * 4:32 + c * 64 + r * 4 + 4] for c in range(4)]
            if row < rows:
                np.testing.assert_array_equal(scale, source[row, k, :2])
                np.testing.assert_array_equal(np.concatenate(quads), source[row, k, 2:])
            else:
                assert not scale.any() and not np.concatenate(quads).any()



@pytest.mark.parametrize("nthreads", THREADS)
@pytest.mark.parametrize("rows,nb", [(16, 1), (48, 3), (160, 64)])
def test_in_place_repack_writes_the_same_bytes_into_the_weights_own_memory(nthreads, rows, nb) -> None:
    rng = np.random.default_rng(rows)
    w = quantize_q40_reference(rng.standard_normal((rows, nb * 32)).astype(np.float32))
    expected = kernels.repack_q40x16(w)
    with kernel_settings(kernels.get_isa(), nthreads):
        packed = kernels.repack_q40x16_inplace(w)
    assert np.shares_memory(packed, w) and packed.shape == expected.shape
    np.testing.assert_array_equal(packed, expected)


def test_in_place_repack_refuses_a_partial_group_and_read_only_weights() -> None:
    with pytest.raises(ValueError, match="multiple of 16 rows"):
        kernels.repack_q40x16_inplace(np.zeros((20, 18), np.uint8))
    frozen = np.zeros((16, 18), np.uint8)
    frozen.flags.writeable = False
    with pytest.raises(ValueError):
        kernels.repack_q40x16_inplace(frozen)

@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("nthreads", THREADS)
@pytest.mark.parametrize("batch", (1, 7, 33))
def test_q40x16_matmul_equals_the_float64_product_of_the_dequantized_operands(
    isa: str, nthreads: int, batch: int
) -> None:
    rng = np.random.default_rng(batch * 10 + nthreads)
    for rows, cols in ((13, 32), (37, 96), (48, 544), (200, 1056)):
        w = quantize_q40_reference((rng.standard_normal((rows, cols)) * 0.05).astype(np.float32))
        x = quantize_q80_reference(rng.standard_normal((batch, cols)).astype(np.float32))
        w64 = dequantize_q40_reference(w).astype(np.float64)
        x64 = dequantize_q80_reference(x).astype(np.float64)
        expected, magnitude = x64 @ w64.T, np.abs(x64) @ np.abs(w64).T
        packed = kernels.repack_q40x16(w)
        y = np.full((batch, rows), np.nan, np.float32)
        with kernel_settings(isa, nthreads):
            kernels.matmul(x, packed, "q40x16", y)
        # as for Q40: integer block products, then one float addition per block and a lane sum
        bound = (cols // 32 + 18) * U * magnitude
        assert (np.abs(y - expected) <= bound).all(), (isa, rows, cols, float(np.nanmax(np.abs(y - expected) / bound)))


def test_q40x16_matmul_refuses_weights_of_the_wrong_shape() -> None:
    w = kernels.repack_q40x16(np.zeros((20, 2 * 18), np.uint8))  # 2 groups
    x = np.zeros((1, 2 * 34), np.uint8)
    with pytest.raises(ValueError, match="Q40x16"):
        kernels.matmul_q80_q40x16_f32(x, w, np.zeros((1, 40), np.float32))  # 40 rows need 3 groups
