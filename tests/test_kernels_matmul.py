"""Matmul y = x W^T for f32, f16, q40 and q80 weights on every SIMD path, thread count and batch
size, against a float64 numpy product of the dequantized operands; argument checks; weights that
are read-only views into a memory-mapped file.
"""

from __future__ import annotations

import functools
import threading
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from kernel_reference import (
    PATHS,
    THREADS,
    dequantize_q40_reference,
    dequantize_q80_reference,
    fp16_bits,
    fp16_value,
    kernel_settings,
    quantize_q40_reference,
    quantize_q80_reference,
)

from dllama_py.model import kernels

WEIGHT_TYPES = ("f32", "f16", "q40", "q80")
# Rows not a multiple of the 4-row tile (13, 37) and one that is (20, 256); 1, 3, 5, 17, 33 and 129
# blocks per row (odd, not multiples of 4 or 16) and 16 (a whole number of 4-block groups). Shapes with
# rows * cols >= 16384 are split over the pool; 256 x 4128 also runs the prefetching loop for long rows.
SHAPES = [(13, 32), (13, 96), (37, 160), (20, 512), (37, 544), (13, 1056), (37, 1056), (256, 4128)]
U = 2.0**-24  # float32 unit roundoff


@dataclass(frozen=True)
class MatmulCase:
    x: np.ndarray  # the argument: float32 (B, cols) or Q80 blocks (B, cols/32*34)
    w: np.ndarray  # the argument: stored weights
    expected: np.ndarray  # float64 (B, rows): dequantized x times dequantized W
    magnitude: np.ndarray  # float64 (B, rows): sum over c of |x[b, c]| * |W[r, c]|
    float_additions: int  # length of the longest chain of float32 additions in any kernel


def encode(w: np.ndarray, weight_type: str) -> tuple[np.ndarray, np.ndarray]:
    """(stored weights, the float32 values they stand for), from the numpy reference encoders."""
    if weight_type == "f32":
        return w, w
    if weight_type == "f16":
        bits = fp16_bits(w)
        return bits, fp16_value(bits)
    if weight_type == "q40":
        blocks = quantize_q40_reference(w)
        return blocks, dequantize_q40_reference(blocks)
    blocks = quantize_q80_reference(w)
    return blocks, dequantize_q80_reference(blocks)


@functools.cache
def matmul_case(rows: int, cols: int, weight_type: str, batch: int) -> MatmulCase:
    rng = np.random.default_rng(rows * 100_003 + cols * 7 + batch)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    w[rng.integers(0, rows, 3), rng.integers(0, cols, 3)] = 0.9  # a few outliers, as real weights have
    x = rng.standard_normal((batch, cols)).astype(np.float32)
    stored, w_values = encode(w, weight_type)
    if weight_type in ("q40", "q80"):
        x_arg = quantize_q80_reference(x)
        x_values = dequantize_q80_reference(x_arg)
        additions = cols // 32 + 16  # at most one addition per block, then a sum over up to 16 SIMD lanes
    else:
        x_arg, x_values = x, x
        additions = cols
    for array in (x_arg, stored):
        array.flags.writeable = False  # inputs may be read-only
    x64, w64 = x_values.astype(np.float64), w_values.astype(np.float64)
    return MatmulCase(x_arg, stored, x64 @ w64.T, np.abs(x64) @ np.abs(w64).T, additions)


def run_matmul(case: MatmulCase, weight_type: str) -> np.ndarray:
    y = np.full(case.expected.shape, np.nan, np.float32)  # every output must be written
    kernels.matmul(case.x, case.w, weight_type, y)
    return y


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("nthreads", THREADS)
@pytest.mark.parametrize("batch", (1, 7, 33))  # 33: the batch-lanes kernel, with a padded group
@pytest.mark.parametrize("weight_type", WEIGHT_TYPES)
def test_matmul_equals_the_float64_product_of_the_dequantized_operands(
    isa: str, nthreads: int, batch: int, weight_type: str
) -> None:
    # Block products are exact integers times fp16(dw) * fp16(dx); the only errors are float32 roundings:
    # with n additions in a chain (plus 2 roundings of the scale products), |y - exact| <= (n + 2) u sum|x||w|
    # (the standard gamma_n bound). A dropped or doubled block, a wrong scale or a wrong nibble is
    # ~1/nb of the magnitude, far above it.
    worst = 0.0
    with kernel_settings(isa, nthreads):
        for rows, cols in SHAPES:
            case = matmul_case(rows, cols, weight_type, batch)
            y = run_matmul(case, weight_type)
            error = np.abs(y - case.expected)
            bound = (case.float_additions + 2) * U * case.magnitude
            assert (error <= bound).all(), (
                f"{weight_type} {rows}x{cols} B={batch}: worst error / bound "
                f"{np.nanmax(error / bound):.3g}, NaN outputs {int(np.isnan(y).sum())}"
            )
            worst = max(worst, float(np.max(error / case.magnitude)))
    print(f"{weight_type} {isa} threads={nthreads} B={batch}: max |y - ref| / sum|x||w| = {worst:.3g}")


@pytest.mark.parametrize("isa", PATHS)
def test_matmul_takes_a_1d_input_as_a_batch_of_one(isa: str) -> None:
    case = matmul_case(37, 544, "q40", 1)
    y = np.zeros((1, 37), np.float32)
    with kernel_settings(isa, 2):
        kernels.matmul_q80_q40_f32(case.x.reshape(-1), case.w, y)
    np.testing.assert_allclose(y, case.expected, rtol=0, atol=float(np.max(case.magnitude)) * 1e-5)


@pytest.mark.parametrize("isa", PATHS)
def test_q80_weights_may_hold_minus_128(isa: str) -> None:
    # The quantizer never writes -128, but the format's int8 allows it in stored weights. (Inputs stay
    # in -127..127, the quantizer's range: the AVX2 / AVX-512 sign trick cannot negate -128 in x.)
    rng = np.random.default_rng(7)
    rows, nb = 9, 5
    q = rng.integers(-128, 128, (rows, nb, 32)).astype(np.int8)
    q[:, :, :3] = -128
    w = np.zeros((rows, nb, 34), np.uint8)
    w[:, :, :2] = fp16_bits(rng.uniform(0.001, 0.01, (rows, nb))).view(np.uint8).reshape(rows, nb, 2)
    w[:, :, 2:] = q.view(np.uint8)
    w = w.reshape(rows, nb * 34)
    x = quantize_q80_reference(rng.standard_normal((3, nb * 32)).astype(np.float32))
    x_values, w_values = dequantize_q80_reference(x).astype(np.float64), dequantize_q80_reference(w)
    expected = x_values @ w_values.astype(np.float64).T
    magnitude = np.abs(x_values) @ np.abs(w_values.astype(np.float64)).T
    y = np.zeros((3, rows), np.float32)
    with kernel_settings(isa, 1):
        kernels.matmul_q80_q80_f32(x, w, y)
    assert (np.abs(y - expected) <= (nb + 18) * U * magnitude).all()


def test_weights_may_be_read_only_row_views_into_a_memory_mapped_file(tmp_path: Path) -> None:
    rows, cols = 512, 1056
    rng = np.random.default_rng(8)
    x = rng.standard_normal((7, cols)).astype(np.float32)
    xq = quantize_q80_reference(x)
    for weight_type in WEIGHT_TYPES:
        stored, values = encode(rng.standard_normal((rows, cols)).astype(np.float32), weight_type)
        path = tmp_path / f"weights_{weight_type}.bin"
        stored.tofile(path)
        mapped = np.memmap(path, dtype=stored.dtype, mode="r", shape=stored.shape)
        view = mapped[128:384]  # a slice of rows: contiguous, read-only, backed by the file
        assert not view.flags.writeable and view.flags.c_contiguous and np.shares_memory(view, mapped)
        x_arg = xq if weight_type in ("q40", "q80") else x
        x_values = dequantize_q80_reference(xq) if weight_type in ("q40", "q80") else x
        y = np.zeros((7, 256), np.float32)
        tracemalloc.start()
        kernels.matmul(x_arg, view, weight_type, y)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < view.nbytes // 16, f"{weight_type}: {peak} bytes allocated during the call (a copy?)"
        expected = x_values.astype(np.float64) @ values[128:384].astype(np.float64).T
        magnitude = np.abs(x_values.astype(np.float64)) @ np.abs(values[128:384].astype(np.float64)).T
        assert (np.abs(y - expected) <= (cols + 2) * U * magnitude).all(), weight_type
        del mapped, view


def test_a_column_slice_of_mapped_weights_is_refused_rather_than_copied(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    np.zeros((8, 64), np.float32).tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=(8, 64))
    with pytest.raises(ValueError, match="w must be C-contiguous"):
        kernels.matmul_f32_f32_f32(
            np.zeros((1, 32), np.float32), mapped[:, :32], np.zeros((1, 8), np.float32)
        )


def test_kernels_called_from_several_python_threads_at_once_give_the_same_results() -> None:
    cases = [matmul_case(37, 1056, weight_type, 7) for weight_type in WEIGHT_TYPES]
    # The reference runs on the path the threads use (not the default one, which DLLAMA_ISA may set).
    with kernel_settings(PATHS[-1], 2):
        alone = [run_matmul(case, weight_type) for case, weight_type in zip(cases, WEIGHT_TYPES)]
    failures: list[str] = []

    def worker(index: int) -> None:
        for _ in range(20):
            y = run_matmul(cases[index % 4], WEIGHT_TYPES[index % 4])
            if not np.array_equal(y, alone[index % 4]):
                failures.append(WEIGHT_TYPES[index % 4])

    with kernel_settings(PATHS[-1], 2):
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not failures


# ---- argument checks -------------------------------------------------------------------------------
def f32(*shape: int) -> np.ndarray:
    return np.zeros(shape, np.float32)


def u8(*shape: int) -> np.ndarray:
    return np.zeros(shape, np.uint8)


WRONG_DTYPES = [
    (
        kernels.matmul_f32_f32_f32,
        (np.zeros((1, 64)), f32(5, 64), f32(1, 5)),
        "x must be a float32 array, got float64",
    ),
    (kernels.matmul_f32_f32_f32, (f32(1, 64), np.zeros((5, 64)), f32(1, 5)), "w must be a float32 array"),
    (kernels.matmul_f32_f32_f32, (f32(1, 64), f32(5, 64), np.zeros((1, 5))), "y must be a float32 array"),
    (
        kernels.matmul_f32_f16_f32,
        (f32(1, 64), np.zeros((5, 64), np.float16), f32(1, 5)),
        "w must be a uint16 array",
    ),
    (kernels.matmul_q80_q40_f32, (f32(1, 64), u8(5, 36), f32(1, 5)), "x must be a uint8 array, got float32"),
    (
        kernels.matmul_q80_q40_f32,
        (u8(1, 68), np.zeros((5, 36), np.int8), f32(1, 5)),
        "w must be a uint8 array",
    ),
    (
        kernels.matmul_q80_q80_f32,
        (u8(1, 68), u8(5, 68), np.zeros((1, 5), np.float16)),
        "y must be a float32 array",
    ),
]


@pytest.mark.parametrize(("function", "args", "message"), WRONG_DTYPES)
def test_matmul_rejects_a_wrong_dtype_naming_the_argument(
    function: Callable[..., None], args: tuple[np.ndarray, ...], message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        function(*args)


WRONG_SHAPES = [
    (
        kernels.matmul_f32_f32_f32,
        (f32(1, 64), f32(5, 32), f32(1, 5)),
        r"w has 32 columns but x has 64 per row",
    ),
    (kernels.matmul_f32_f16_f32, (f32(2, 64), np.zeros((5, 32), np.uint16), f32(2, 5)), r"w has 32"),
    (kernels.matmul_q80_q40_f32, (u8(1, 340), u8(5, 162), f32(1, 5)), r"w must have shape \(rows, 180\)"),
    (kernels.matmul_q80_q80_f32, (u8(1, 68), u8(5, 102), f32(1, 5)), r"w must have shape \(rows, 68\)"),
    (
        kernels.matmul_q80_q40_f32,
        (u8(1, 70), u8(5, 36), f32(1, 5)),
        r"x: the last dimension \(70\) .* block size 34",
    ),
    (kernels.matmul_f32_f32_f32, (f32(2, 64), f32(5, 64), f32(1, 5)), r"y must have shape \(2, 5\)"),
    (kernels.matmul_f32_f32_f32, (f32(2, 64), f32(5, 64), f32(2, 6)), r"y must have shape \(2, 5\)"),
    (kernels.matmul_f32_f32_f32, (f32(64), f32(5, 64), f32(5)), r"y must be 2-D"),
    (kernels.matmul_f32_f32_f32, (f32(1, 64), f32(320), f32(1, 5)), r"w must be 2-D"),
    (kernels.matmul_f32_f32_f32, (f32(1, 1, 64), f32(5, 64), f32(1, 5)), r"x must be 1-D or 2-D"),
    (kernels.matmul_f32_f32_f32, (f32(64, 2).T, f32(5, 64), f32(2, 5)), r"x must be C-contiguous"),
]


@pytest.mark.parametrize(("function", "args", "message"), WRONG_SHAPES)
def test_matmul_rejects_wrong_shapes_naming_the_argument(
    function: Callable[..., None], args: tuple[np.ndarray, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        function(*args)


def test_matmul_refuses_a_read_only_output() -> None:
    y = f32(1, 5)
    y.flags.writeable = False
    with pytest.raises(ValueError, match="y must be writable"):
        kernels.matmul_f32_f32_f32(f32(1, 64), f32(5, 64), y)


# ---- the Python helpers of kernels.py -------------------------------------------------------------
def test_row_bytes_input_type_and_encode_decode_follow_the_formats() -> None:
    assert [kernels.row_bytes(t, 96) for t in WEIGHT_TYPES] == [384, 192, 54, 102]
    assert [kernels.input_type_for(t) for t in WEIGHT_TYPES] == ["f32", "f32", "q80", "q80"]
    w = np.random.default_rng(9).standard_normal((5, 96)).astype(np.float32)
    for weight_type in WEIGHT_TYPES:
        stored, values = encode(w, weight_type)
        encoded = kernels.encode_weights(w, weight_type)
        np.testing.assert_array_equal(encoded, stored)
        assert encoded.shape == (5, kernels.row_bytes(weight_type, 96) // encoded.itemsize)
        np.testing.assert_array_equal(kernels.decode_weights(encoded, weight_type), values)


@pytest.mark.parametrize("weight_type", ["q40", "q80"])
def test_row_bytes_refuses_block_types_with_partial_blocks(weight_type: str) -> None:
    with pytest.raises(ValueError, match=f"{weight_type} rows need a multiple of 32 values, got 33"):
        kernels.row_bytes(weight_type, 33)


def test_unknown_weight_types_are_refused_with_the_known_ones() -> None:
    for call in (
        lambda: kernels.row_bytes("bf16", 64),
        lambda: kernels.encode_weights(f32(2, 32), "bf16"),
        lambda: kernels.decode_weights(f32(2, 32), "bf16"),
        lambda: kernels.matmul(f32(1, 32), f32(2, 32), "bf16", f32(1, 2)),
    ):
        with pytest.raises(ValueError, match=r"unknown weight type 'bf16'; expected one of .*'q40'"):
            call()
