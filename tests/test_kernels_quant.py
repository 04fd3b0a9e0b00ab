"""Q40, Q80 and F16 in the C++ core: the exact bytes of distributed-llama's format rules
(dllama-format.md section 2), on every SIMD path and thread count, and the round-trip error bound.

Golden blocks are derived by hand below; random data is compared byte for byte with the numpy
reference quantizer in kernel_reference.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from kernel_reference import (
    BLOCK,
    PATHS,
    THREADS,
    awkward_values,
    dequantize_q40_reference,
    dequantize_q80_reference,
    fp16_bits,
    fp16_value,
    kernel_settings,
    q40_scale_f32,
    q80_scale_f32,
    quantize_q40_reference,
    quantize_q80_reference,
)

from dllama_py.model import kernels

# ---- golden blocks, derived by hand -------------------------------------------------------------------
# Q40 block: fp16 d (2 bytes, little-endian) + 16 bytes: byte j = q[j] | q[j+16] << 4, q = trunc(clamp(x/d + 8.5, 0, 15)).
Q40_GOLDEN = {
    # +8 and -8 tie for the largest magnitude: the positive one wins, max = 8, d = 8/-8 = -1 (fp16 0xBC00),
    # id = -1, so q = trunc(clamp(8.5 - x, 0, 15)):
    #   x[0..15]  =  8  -8  0  3.2  -3.2  .5  -.5  7.6  -7.6  1  -1  2.49  4  -4  6  -6
    #   q[0..15]  =  0  15  8  5    11    8   9    0    15    7  9   6     4  12  2  14   (16.5, 16.1 clamp to 15)
    #   x[16..31] = -8 -7 -6 -5 -4 -3 -2 -1 0 1 2 3 4 5 6 7
    #   q[16..31] = 15 15 14 13 12 11 10  9 8 7 6 5 4 3 2 1
    #   bytes: 0|15<<4 = f0, 15|15<<4 = ff, 8|14<<4 = e8, d5, cb, b8, a9, 90, 8f, 77, 69, 56, 44, 3c, 22, 1e
    "positive_max_wins_a_tie": (
        [8.0, -8.0, 0.0, 3.2, -3.2, 0.5, -0.5, 7.6, -7.6, 1.0, -1.0, 2.49, 4.0, -4.0, 6.0, -6.0]
        + [float(v) for v in range(-8, 8)],
        "00bc" + "f0ffe8d5cbb8a9908f776956443c221e",
    ),
    # The largest magnitude is negative: max = -4, d = -4/-8 = 0.5 (fp16 0x3800), id = 2, q = trunc(clamp(2x + 8.5)):
    #   x[0..8]   = -4  3.5   1.2   -0.3  0    0.26  -0.26  3.9   -3.9,  x[9..15] = 0
    #   2x + 8.5  = .5  15.5  10.9  7.9   8.5  9.02  7.98   16.3  0.7
    #   q[0..15]  = 0   15    10    7     8    9     7      15    0     8 8 8 8 8 8 8
    #   x[16..31] = -2 + 0.25*i: 2x + 8.5 = 4.5 5 5.5 6 ... 12 -> q = 4 5 5 6 6 7 7 8 8 9 9 10 10 11 11 12
    #   bytes: 0|4<<4 = 40, 15|5<<4 = 5f, 5a, 67, 68, 79, 77, 8f, 80, 98, 98, a8, a8, b8, b8, c8
    "negative_max": (
        [-4.0, 3.5, 1.2, -0.3, 0.0, 0.26, -0.26, 3.9, -3.9]
        + [0.0] * 7
        + [-2.0 + 0.25 * i for i in range(16)],
        "0038" + "405f5a676879778f809898a8a8b8b8c8",
    ),
    # d not exact in fp16: max = 0.3, d = -0.0375 = -1.2 * 2^-5; fp16 exponent field 10, mantissa
    # 0.2 * 1024 = 204.8 -> 205 = 0x0cd, sign set: 0xa8cd. id = -26.67, q = trunc(clamp(8.5 - 26.67x)):
    #   x = 0.3 0.1 -0.1 0.2 -0.2 -0.29 then zeros -> 0.5 5.83 11.17 3.17 13.83 16.23 8.5
    #   q = 0 5 11 3 13 15 (clamped) 8 ...; high nibbles all 8: 80 85 8b 83 8d 8f 88 x 10
    "inexact_scale": (
        [0.3, 0.1, -0.1, 0.2, -0.2, -0.29] + [0.0] * 26,
        "cda8" + "80858b838d8f" + "88" * 10,
    ),
    # Every value zero: max = +0.0, d = +0.0 / -8 = -0.0 (fp16 0x8000), id = 0, q = trunc(8.5) = 8 everywhere.
    "all_zero": ([0.0] * 32, "0080" + "88" * 16),
    # Negative zeros: max = -0.0, d = -0.0 / -8 = +0.0 (fp16 0x0000), nibbles 8.
    "negative_zeros": ([-0.0] * 32, "0000" + "88" * 16),
}

# Q80 block: fp16 d (2 bytes, little-endian) + 32 int8 q = round_half_even(x / d), d = max|x| / 127.
Q80_GOLDEN = {
    # max|x| = 127/16 so d = 1/16 exactly (fp16: exponent field -4+15 = 11 -> 0x2c00), id = 16, q = round(16x):
    #   x = 127/16 -127/16 .5/16 1.5/16 -2.5/16 2.5/16 -.5/16  1   -1   0.1  3.3   -3.3
    #   16x = 127  -127    .5    1.5    -2.5    2.5    -.5     16  -16  1.6  52.8  -52.8
    #   q   = 127  -127    0     2      -2      2      0       16  -16  2    53    -53   (halves go to even)
    #   hex = 7f   81      00    02     fe      02     00      10  f0   02   35    cb
    #   x[12..31] = 0.25 * (i - 20) -> q = 4 * (i - 20) = -32 ... 44 -> e0 e4 e8 ec f0 f4 f8 fc 00 04 ... 2c
    "exact_scale_and_half_to_even": (
        [127 / 16, -127 / 16, 0.5 / 16, 1.5 / 16, -2.5 / 16, 2.5 / 16, -0.5 / 16, 1.0, -1.0, 0.1, 3.3, -3.3]
        + [0.25 * (i - 20) for i in range(12, 32)],
        "002c" + "7f810002fe020010f00235cb" + "e0e4e8ecf0f4f8fc0004080c1014181c2024282c",
    ),
    # max|x| = 1: d = 1/127 = 2^-7 * 1.00787; fp16 exponent field 8, mantissa 0.00787 * 1024 = 8.06 -> 8:
    # 0x2008. q uses id = 1/d(f32) = 127: 1 -1 .25 -.25 .1 -.1 .3 -> 127 -127 31.75 -31.75 12.7 -12.7 38.1
    # -> 7f 81 20 e0 0d f3 26, then zeros.
    "inexact_scale": (
        [1.0, -1.0, 0.25, -0.25, 0.1, -0.1, 0.3] + [0.0] * 25,
        "0820" + "7f8120e00df326" + "00" * 25,
    ),
    "all_zero": ([0.0] * 32, "0000" + "00" * 32),
    "negative_zeros": ([-0.0] * 32, "0000" + "00" * 32),
}


def golden_values(values: list[float]) -> np.ndarray:
    return np.array(values, dtype=np.float32)


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("name", Q40_GOLDEN)
def test_q40_golden_block_has_the_hand_derived_bytes(isa: str, name: str) -> None:
    values, expected = Q40_GOLDEN[name]
    with kernel_settings(isa, 1):
        got = kernels.quantize_q40(golden_values(values))
    assert got.tobytes().hex() == expected
    assert quantize_q40_reference(golden_values(values)).tobytes().hex() == expected


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("name", Q80_GOLDEN)
def test_q80_golden_block_has_the_hand_derived_bytes(isa: str, name: str) -> None:
    values, expected = Q80_GOLDEN[name]
    x = golden_values(values)
    with kernel_settings(isa, 1):
        got = kernels.quantize_q80(x)
        into = np.full(34, 0xAA, np.uint8)
        kernels.quantize_q80_into(x, into)
    assert got.tobytes().hex() == expected
    assert into.tobytes().hex() == expected
    assert quantize_q80_reference(x).tobytes().hex() == expected


def test_golden_blocks_dequantize_to_the_hand_derived_values() -> None:
    # positive_max_wins_a_tie: value = (q - 8) * -1 = 8 - q
    q = [
        0,
        15,
        8,
        5,
        11,
        8,
        9,
        0,
        15,
        7,
        9,
        6,
        4,
        12,
        2,
        14,
        15,
        15,
        14,
        13,
        12,
        11,
        10,
        9,
        8,
        7,
        6,
        5,
        4,
        3,
        2,
        1,
    ]
    block = bytes.fromhex(Q40_GOLDEN["positive_max_wins_a_tie"][1])
    np.testing.assert_array_equal(
        kernels.dequantize_q40(np.frombuffer(block, np.uint8)), [8.0 - v for v in q]
    )
    # inexact_scale (Q40): fp16 0xa8cd = -(1 + 205/1024) * 2^-5 = -0.037506103515625
    block = bytes.fromhex(Q40_GOLDEN["inexact_scale"][1])
    d = -0.037506103515625
    expected = [-8 * d, -3 * d, 3 * d, -5 * d, 5 * d, 7 * d] + [0.0] * 26
    np.testing.assert_array_equal(kernels.dequantize_q40(np.frombuffer(block, np.uint8)), expected)
    # inexact_scale (Q80): fp16 0x2008 = (1 + 8/1024) * 2^-7 = 0.00787353515625
    block = bytes.fromhex(Q80_GOLDEN["inexact_scale"][1])
    d = 0.00787353515625
    expected = [q * d for q in (127, -127, 32, -32, 13, -13, 38)] + [0.0] * 25
    np.testing.assert_array_equal(kernels.dequantize_q80(np.frombuffer(block, np.uint8)), expected)


# ---- random data, byte for byte against the numpy reference --------------------------------------------
# (37, 544) holds 629 blocks, past the 512-block threshold where quantization splits over the pool.
SHAPES = [(32,), (3, 96), (2, 5, 160), (37, 544)]


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("nthreads", THREADS)
def test_q40_and_q80_equal_the_reference_quantizer_byte_for_byte(isa: str, nthreads: int) -> None:
    rng = np.random.default_rng(40)
    with kernel_settings(isa, nthreads):
        for shape in SHAPES:
            for scale in (1.0, 1e-3, 300.0):
                n_blocks = int(np.prod(shape)) // BLOCK
                x = awkward_values(rng, n_blocks, scale).reshape(shape)
                q40 = kernels.quantize_q40(x)
                q80 = kernels.quantize_q80(x)
                into = np.empty_like(q80)
                kernels.quantize_q80_into(x, into)
                assert q40.shape == shape[:-1] + (shape[-1] // 32 * 18,) and q40.dtype == np.uint8
                assert q80.shape == shape[:-1] + (shape[-1] // 32 * 34,) and q80.dtype == np.uint8
                np.testing.assert_array_equal(q40, quantize_q40_reference(x), err_msg=f"q40 {shape} {scale}")
                np.testing.assert_array_equal(q80, quantize_q80_reference(x), err_msg=f"q80 {shape} {scale}")
                np.testing.assert_array_equal(into, q80, err_msg=f"quantize_q80_into {shape}")


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("nthreads", THREADS)
def test_dequantize_equals_the_reference_for_any_bytes(isa: str, nthreads: int) -> None:
    rng = np.random.default_rng(41)
    with kernel_settings(isa, nthreads):
        for n_blocks in (1, 3, 700):
            q40 = rng.integers(0, 256, (n_blocks * 18,), dtype=np.uint8)
            q80 = rng.integers(0, 256, (n_blocks * 34,), dtype=np.uint8)
            # assert_array_equal counts NaN == NaN: random fp16 scales include inf and NaN
            with np.errstate(invalid="ignore"):
                q40_values, q80_values = dequantize_q40_reference(q40), dequantize_q80_reference(q80)
            np.testing.assert_array_equal(kernels.dequantize_q40(q40), q40_values)
            np.testing.assert_array_equal(kernels.dequantize_q80(q80), q80_values)
        shaped = rng.integers(0, 256, (2, 3, 5 * 34), dtype=np.uint8)
        assert kernels.dequantize_q80(shaped).shape == (2, 3, 160)


@pytest.mark.parametrize("isa", PATHS)
def test_all_zero_blocks_give_zero_scale_and_zero_values(isa: str) -> None:
    x = np.zeros((3, 64), np.float32)
    x[1] = -0.0
    with kernel_settings(isa, 1):
        q40, q80 = kernels.quantize_q40(x), kernels.quantize_q80(x)
        # d = max / -8 keeps IEEE signs: +0 blocks store -0.0 (0x8000), -0 blocks +0.0; both read as 0.
        np.testing.assert_array_equal(
            q40.reshape(-1, 18)[:, :2].copy().view(np.uint16)[:, 0], [0x8000, 0x8000, 0, 0, 0x8000, 0x8000]
        )
        assert not q80.reshape(-1, 34)[:, :2].any()
        assert (q40.reshape(-1, 18)[:, 2:] == 0x88).all()  # nibble 8 stands for zero
        assert not q80.reshape(-1, 34)[:, 2:].any()
        assert not kernels.dequantize_q40(q40).any() and not kernels.dequantize_q80(q80).any()


@pytest.mark.parametrize("isa", PATHS)
def test_blocks_too_small_for_an_fp16_scale_dequantize_to_zero(isa: str) -> None:
    # max|x| ~ 1e-39 makes d subnormal in float32 and 1/d infinite; fp16(d) is 0 so every value reads 0.
    x = (np.random.default_rng(42).standard_normal((4, 32)) * 1e-39).astype(np.float32)
    with kernel_settings(isa, 1):
        assert not kernels.dequantize_q40(kernels.quantize_q40(x)).any()
        assert not kernels.dequantize_q80(kernels.quantize_q80(x)).any()


# ---- round trip within the format's error bound -----------------------------------------------------
U = 2.0**-24  # float32 unit roundoff


@pytest.mark.parametrize("isa", PATHS)
def test_q80_round_trip_is_within_half_a_step_plus_the_fp16_rounding_of_d(isa: str) -> None:
    # q = round(x * id) with |x * id| <= 127, so |x - q*d| <= d/2 (plus float32 rounding of id and x*id:
    # <= 127 * 2u steps); reading back uses fp16(d), which moves q*d by |q| * |fp16(d) - d|.
    x = awkward_values(np.random.default_rng(43), 2000, 2.5)
    with kernel_settings(isa, 2):
        q = kernels.quantize_q80(x)
        back = kernels.dequantize_q80(q)
    d = np.repeat(q80_scale_f32(x).astype(np.float64), 32)
    d16 = np.repeat(fp16_value(fp16_bits(q80_scale_f32(x))).astype(np.float64), 32)
    levels = np.abs(q.reshape(-1, 34)[:, 2:].view(np.int8).reshape(-1).astype(np.float64))
    error = np.abs(x.astype(np.float64) - back)
    bound = d * (0.5 + 127 * 2 * U) + levels * np.abs(d16 - d)
    assert (error <= bound).all(), f"worst excess {np.max(error - bound)}"
    assert (error <= d * (0.5 + 127 * 2.0**-11) + 1e-30).all()  # the same bound with |fp16(d)-d| <= d*2^-11
    print(f"q80 {isa}: max |x - deq| / d = {np.max(error[d > 0] / d[d > 0]):.6f}")


@pytest.mark.parametrize("isa", PATHS)
def test_q40_round_trip_is_within_half_a_step_except_the_clamped_opposite_extreme(isa: str) -> None:
    # With t = x/d in [-8, 8], q - 8 = min(floor(t + 0.5), 7): |t - (q - 8)| <= 1/2, except for
    # t > 7.5 (values of the opposite sign to max, above 15/16 of |max|) which clamp to 7 and err by t - 7 <= 1.
    # Plus float32 rounding of x*id + 8.5 (<= 2^-18 steps) and |q - 8| * |fp16(d) - d| from the stored scale.
    x = awkward_values(np.random.default_rng(44), 2000, 2.5)
    x[:64] = np.concatenate(
        [[4.0, -4.0, -3.9, 3.8], np.zeros(28), [-2.0, 1.95], np.zeros(30)]
    )  # clamped cases
    with kernel_settings(isa, 2):
        q = kernels.quantize_q40(x)
        back = kernels.dequantize_q40(q)
    d = np.repeat(q40_scale_f32(x).astype(np.float64), 32)
    d16 = np.repeat(fp16_value(fp16_bits(q40_scale_f32(x))).astype(np.float64), 32)
    t = np.divide(x, d, out=np.zeros_like(d), where=d != 0)
    blocks = q.reshape(-1, 18)[:, 2:]
    levels = np.abs(np.concatenate([blocks & 0x0F, blocks >> 4], axis=1).reshape(-1).astype(np.float64) - 8)
    error = np.abs(x.astype(np.float64) - back)
    bound = np.abs(d) * (np.maximum(0.5, t - 7) + 2.0**-18) + levels * np.abs(d16 - d)
    assert (error <= bound).all(), f"worst excess {np.max(error - bound)}"
    assert (error <= np.abs(d) * (1 + 8 * 2.0**-11) + 1e-30).all()
    clamped = t > 7.5
    assert clamped.sum() >= 2  # the hand-placed -3.9 against max 4 and 1.95 against max -2
    assert np.max(error[clamped] / np.abs(d[clamped])) > 0.5  # the clamp really costs more than half a step
    rest = ~clamped & (d != 0)
    print(
        f"q40 {isa}: max |x - deq| / |d| = {np.max(error[rest] / np.abs(d[rest])):.6f} unclamped, "
        f"{np.max(error[clamped] / np.abs(d[clamped])):.6f} clamped"
    )


# ---- argument checks -----------------------------------------------------------------------------------
def test_quantize_rejects_a_last_dimension_that_is_not_whole_blocks() -> None:
    for quantize in (kernels.quantize_q40, kernels.quantize_q80):
        with pytest.raises(ValueError, match=r"x: the last dimension \(48\) must be a multiple of 32"):
            quantize(np.zeros((2, 48), np.float32))
    with pytest.raises(
        ValueError, match=r"q: the last dimension \(20\) must be a multiple of the block size 18"
    ):
        kernels.dequantize_q40(np.zeros(20, np.uint8))
    with pytest.raises(ValueError, match=r"q: .* block size 34"):
        kernels.dequantize_q80(np.zeros(40, np.uint8))


def test_quantize_rejects_wrong_dtypes_and_layouts_naming_the_argument() -> None:
    with pytest.raises(TypeError, match="x must be a float32 array, got float64"):
        kernels.quantize_q40(np.zeros(32))
    with pytest.raises(TypeError, match="q must be a uint8 array, got int8"):
        kernels.dequantize_q80(np.zeros(34, np.int8))
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        kernels.quantize_q80(np.zeros((64, 2), np.float32).T)


def test_quantize_q80_into_rejects_an_output_of_the_wrong_size_type_or_writability() -> None:
    x = np.ones((2, 64), np.float32)
    with pytest.raises(ValueError, match="out must hold 136 bytes, has 135"):
        kernels.quantize_q80_into(x, np.zeros(135, np.uint8))
    with pytest.raises(ValueError, match="out must hold 136 bytes, has 170"):
        kernels.quantize_q80_into(x, np.zeros((2, 85), np.uint8))
    with pytest.raises(TypeError, match="out must be a uint8 array"):
        kernels.quantize_q80_into(x, np.zeros(136, np.int8))
    read_only = np.zeros(136, np.uint8)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writable"):
        kernels.quantize_q80_into(x, read_only)
    flat = np.zeros(136, np.uint8)  # any shape of the right size is accepted
    kernels.quantize_q80_into(x, flat)
    np.testing.assert_array_equal(flat, quantize_q80_reference(x).reshape(-1))


# ---- F16 --------------------------------------------------------------------------------------------
def assert_same_half_bits(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal bits, except that any NaN matches any NaN of the same sign (payloads are not specified)."""
    is_nan = (expected & 0x7C00 == 0x7C00) & (expected & 0x03FF != 0)
    got_nan = (got & 0x7C00 == 0x7C00) & (got & 0x03FF != 0)
    np.testing.assert_array_equal(got_nan, is_nan)
    np.testing.assert_array_equal(got[is_nan] & 0x8000, expected[is_nan] & 0x8000)
    np.testing.assert_array_equal(got[~is_nan], expected[~is_nan])


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("nthreads", THREADS)
def test_f32_to_f16_matches_numpy_on_random_bit_patterns(isa: str, nthreads: int) -> None:
    # Random 32-bit patterns: every exponent, so normals, subnormals, overflow, inf and NaN all occur.
    bits = np.random.default_rng(45).integers(0, 2**32, 300_000, dtype=np.uint64).astype(np.uint32)
    narrow = (np.random.default_rng(46).standard_normal(100_000) * 1e-5).astype(np.float32)  # fp16 subnormals
    with kernel_settings(isa, nthreads):
        for x in (bits.view(np.float32), narrow, narrow.reshape(100, 1000)):
            got = kernels.f32_to_f16(x)
            assert got.dtype == np.uint16 and got.shape == x.shape
            with np.errstate(over="ignore", invalid="ignore"):
                assert_same_half_bits(got, fp16_bits(x))


def test_f32_to_f16_rounds_values_halfway_between_halves_to_even() -> None:
    finite = np.arange(0x7C00, dtype=np.uint16)  # every non-negative finite half
    low, high = fp16_value(finite[:-1]).astype(np.float64), fp16_value(finite[1:]).astype(np.float64)
    halfway = ((low + high) / 2).astype(np.float32)  # exact: 12 significant bits
    assert np.array_equal(halfway.astype(np.float64), (low + high) / 2)
    even = np.where(finite[:-1] % 2 == 0, finite[:-1], finite[1:])
    np.testing.assert_array_equal(kernels.f32_to_f16(halfway), even)
    np.testing.assert_array_equal(kernels.f32_to_f16(-halfway), even | 0x8000)
    just_above = np.nextafter(halfway, np.float32(np.inf))
    np.testing.assert_array_equal(kernels.f32_to_f16(just_above), finite[1:])


SPECIAL_HALVES = [
    (0.0, 0x0000),
    (-0.0, 0x8000),
    (1.0, 0x3C00),
    (-2.0, 0xC000),
    (65504.0, 0x7BFF),  # largest half
    (65519.99, 0x7BFF),  # below the midpoint to 65536: rounds down
    (65520.0, 0x7C00),  # the midpoint rounds to even, which is infinity
    (1e10, 0x7C00),
    (-1e10, 0xFC00),
    (float("inf"), 0x7C00),
    (float("-inf"), 0xFC00),
    (2.0**-14, 0x0400),  # smallest normal half
    (2.0**-24, 0x0001),  # smallest subnormal half
    (2.0**-25, 0x0000),  # halfway to it: ties to even (zero)
    (2.0**-25 * 1.0001, 0x0001),
    (-(2.0**-25) * 1.0001, 0x8001),
    (3 * 2.0**-25, 0x0002),  # halfway between 1 and 2 subnormal steps: to even (2)
    (1e-40, 0x0000),  # float32 subnormal
    (-1e-40, 0x8000),
]


@pytest.mark.parametrize(("value", "half"), SPECIAL_HALVES)
def test_f32_to_f16_special_values(value: float, half: int) -> None:
    got = int(kernels.f32_to_f16(np.array([value], np.float32))[0])
    assert got == half, f"{value!r} -> {got:#06x}, expected {half:#06x}"
    with np.errstate(over="ignore"):
        assert int(fp16_bits([value])[0]) == half  # the hand-written table agrees with numpy


def test_f32_to_f16_keeps_nan_and_its_sign() -> None:
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF], np.uint32).view(np.float32)
    got = kernels.f32_to_f16(nans)
    assert ((got & 0x7C00) == 0x7C00).all() and ((got & 0x03FF) != 0).all()
    np.testing.assert_array_equal(got >> 15, [0, 1, 0, 0])


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("nthreads", THREADS)
def test_f16_to_f32_matches_numpy_for_every_half(isa: str, nthreads: int) -> None:
    every = np.arange(2**16, dtype=np.uint16).reshape(256, 256)
    with kernel_settings(isa, nthreads):
        got = kernels.f16_to_f32(every)
    assert got.dtype == np.float32 and got.shape == (256, 256)
    expected = fp16_value(every)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(np.signbit(got[nan]), np.signbit(expected[nan]))
    np.testing.assert_array_equal(got[~nan].view(np.uint32), expected[~nan].view(np.uint32))  # -0.0 included
    round_trip = kernels.f32_to_f16(got)
    np.testing.assert_array_equal(round_trip[~nan], every[~nan])


def test_f16_conversions_reject_wrong_dtypes() -> None:
    with pytest.raises(TypeError, match="x must be a float32 array"):
        kernels.f32_to_f16(np.zeros(4, np.float16))
    with pytest.raises(TypeError, match="h must be a uint16 array, got float16"):
        kernels.f16_to_f32(np.zeros(4, np.float16))
