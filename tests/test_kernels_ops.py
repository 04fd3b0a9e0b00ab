"""The forward-pass ops of the C++ core against numpy written from the math, on every SIMD path,
with 1, 2 and 3 threads and batches of 1 and 7. Sizes are chosen so that the batch-7 cases cross
each op's threshold for splitting over the pool (32768 elements of work).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from kernel_reference import PATHS, THREADS, kernel_settings, quantize_q80_reference

from dllama_py.model import kernels

U = 2.0**-24  # float32 unit roundoff
TINY = 2.0**-126  # smallest normal float32: results below it may come out as zero
SETTINGS = [(isa, n) for isa in PATHS for n in THREADS]
BATCHES = (1, 7)


# ---- normalisation and elementwise ------------------------------------------------------------------
def rms_norm_reference(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return w.astype(np.float64) * x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps)


@pytest.mark.parametrize(("isa", "nthreads"), SETTINGS)
@pytest.mark.parametrize("batch", BATCHES)
def test_rms_norm_over_rows_and_per_head(isa: str, nthreads: int, batch: int) -> None:
    rng = np.random.default_rng(batch)
    # (B, dim) as before attention and FFN; (B * heads, head_dim) as Qwen3's q/k norm uses it.
    for rows, n, eps in ((batch, 4800, 1e-5), (batch, 37, 1e-6), (batch * 40, 128, 1e-6)):
        x = (rng.standard_normal((rows, n)) * 3).astype(np.float32)
        x[0, :5] = 0.0
        w = rng.uniform(0.5, 1.5, n).astype(np.float32)
        expected = rms_norm_reference(x, w, eps)
        # sum of n squares: relative error <= n u, halved by the square root, plus a few roundings
        bound = (n / 2 + 4) * U * np.abs(expected) + 1e-30
        with kernel_settings(isa, nthreads):
            out = np.full_like(x, np.nan)
            kernels.rms_norm(x, w, out, eps)
            in_place = x.copy()
            kernels.rms_norm(in_place, w, in_place, eps)
            heads = x.reshape(1, -1, n).copy()  # any leading shape: normalised over the last dimension
            kernels.rms_norm(heads, w, heads, eps)
        assert (np.abs(out - expected) <= bound).all(), (rows, n)
        np.testing.assert_array_equal(in_place, out)
        np.testing.assert_array_equal(heads.reshape(rows, n), out)


def test_rms_norm_of_a_zero_row_is_zero_and_eps_matters() -> None:
    x = np.zeros((2, 64), np.float32)
    x[1] = 1e-3
    out = np.empty_like(x)
    kernels.rms_norm(x, np.ones(64, np.float32), out, 1e-5)
    assert not out[0].any()
    np.testing.assert_allclose(out[1], 1e-3 / math.sqrt(1e-6 + 1e-5), rtol=1e-6)


def test_rms_norm_rejects_a_weight_or_output_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="w must have 64 elements"):
        kernels.rms_norm(
            np.zeros((2, 64), np.float32), np.ones(32, np.float32), np.zeros((2, 64), np.float32), 1e-5
        )
    with pytest.raises(ValueError, match="x and out must have the same number of elements"):
        kernels.rms_norm(
            np.zeros((2, 64), np.float32), np.ones(64, np.float32), np.zeros((1, 64), np.float32), 1e-5
        )


def activation_inputs(batch: int) -> np.ndarray:
    x = np.random.default_rng(batch).uniform(-12, 12, (batch, 4400)).astype(np.float32)
    x[0, :8] = [0.0, -0.0, 1e-30, -1e-30, 100.0, -100.0, 88.0, -88.0]
    return x


@pytest.mark.parametrize(("isa", "nthreads"), SETTINGS)
@pytest.mark.parametrize("batch", BATCHES)
def test_silu_is_x_times_sigmoid_x(isa: str, nthreads: int, batch: int) -> None:
    x = activation_inputs(batch)
    x64 = x.astype(np.float64)
    expected = x64 / (1 + np.exp(-x64))
    got = x.copy()
    with kernel_settings(isa, nthreads):
        kernels.silu(got)
    # expf and one division: a few ulp of the result (no cancellation: 1 + e^-x > 1)
    assert (np.abs(got - expected) <= 8 * U * np.abs(expected) + TINY).all()


@pytest.mark.parametrize(("isa", "nthreads"), SETTINGS)
@pytest.mark.parametrize("batch", BATCHES)
def test_gelu_is_the_exact_erf_form(isa: str, nthreads: int, batch: int) -> None:
    x = activation_inputs(batch)
    erf = np.vectorize(math.erf)
    x64 = x.astype(np.float64)
    expected = 0.5 * x64 * (1 + erf(x64 / math.sqrt(2)))
    got = x.copy()
    with kernel_settings(isa, nthreads):
        kernels.gelu(got)
    # For x << 0, 1 + erf(x/sqrt 2) cancels in float32: the error is absolute, about u * |x|, not relative.
    assert (np.abs(got - expected) <= 8 * U * np.abs(expected) + 2 * U * np.abs(x64) + TINY).all()
    tanh_form = 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)))
    assert np.max(np.abs(got - tanh_form)) > 1e-4  # really the erf form, not the tanh approximation


@pytest.mark.parametrize(("isa", "nthreads"), SETTINGS)
def test_mul_and_add_are_exact_float32_elementwise(isa: str, nthreads: int) -> None:
    rng = np.random.default_rng(5)
    for shape in ((7, 40_000), (1, 37), (3, 5, 7)):
        x = rng.standard_normal(shape).astype(np.float32)
        y = rng.standard_normal(shape).astype(np.float32)
        product, total = x.copy(), x.copy()
        with kernel_settings(isa, nthreads):
            kernels.mul(product, y)
            kernels.add(total, y)
        np.testing.assert_array_equal(product, x * y)
        np.testing.assert_array_equal(total, x + y)


def test_mul_and_add_reject_mismatched_sizes_and_read_only_targets() -> None:
    with pytest.raises(ValueError, match="x and y must have the same number of elements"):
        kernels.mul(np.zeros(8, np.float32), np.zeros(9, np.float32))
    frozen = np.zeros(8, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="x must be writable"):
        kernels.add(frozen, np.zeros(8, np.float32))
    with pytest.raises(TypeError, match="y must be a float32 array"):
        kernels.add(np.zeros(8, np.float32), np.zeros(8))


@pytest.mark.parametrize(("isa", "nthreads"), SETTINGS)
def test_add_q80_adds_the_dequantized_blocks(isa: str, nthreads: int) -> None:
    rng = np.random.default_rng(6)
    for shape in ((7, 4096), (1, 96)):
        x = rng.standard_normal(shape).astype(np.float32)
        q = quantize_q80_reference(rng.standard_normal(shape).astype(np.float32))
        blocks = q.reshape(-1, 34)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        values = (blocks[:, 2:].view(np.int8).astype(np.float32) * d).reshape(shape)
        got = x.copy()
        with kernel_settings(isa, nthreads):
            kernels.add_q80(got, q)
        np.testing.assert_array_equal(got, x + values)  # q * d is exact in float32, then one rounded add
    with pytest.raises(ValueError, match="q must hold the Q80 blocks of exactly x.size values"):
        kernels.add_q80(np.zeros(64, np.float32), np.zeros(34, np.uint8))


@pytest.mark.parametrize(("isa", "nthreads"), SETTINGS)
@pytest.mark.parametrize("batch", BATCHES)
def test_softmax_over_each_row(isa: str, nthreads: int, batch: int) -> None:
    rng = np.random.default_rng(batch)
    for n in (1, 3, 37, 1200):
        x = (rng.standard_normal((batch, n)) * 4).astype(np.float32)
        x[0, 0] = 80.0  # exp(80) overflows float32 unless the row maximum is subtracted first
        x64 = x.astype(np.float64)
        shifted = x64 - x64.max(axis=-1, keepdims=True)
        expected = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
        got = x.copy()
        with kernel_settings(isa, nthreads):
            kernels.softmax(got)
        # exp of a rounded x - max (relative error ~ u |x - max|), n rounded additions, one division
        bound = (n + 4 + np.abs(shifted)) * U * expected + 1e-44
        assert (np.abs(got - expected) <= bound).all(), n
        np.testing.assert_allclose(got.sum(axis=-1), 1.0, rtol=(n + 4) * U)


@pytest.mark.parametrize("batch", BATCHES)
def test_embedding_copies_the_rows_of_the_ids(batch: int) -> None:
    table = np.random.default_rng(1).standard_normal((50, 37)).astype(np.float32)
    ids = np.array([0, 49, 7, 7, 13, 1, 48][:batch], np.int32)
    out = np.full((batch, 37), np.nan, np.float32)
    kernels.embedding(table, ids, out)
    np.testing.assert_array_equal(out, table[ids])


@pytest.mark.parametrize("bad_id", [50, -1, 2**31 - 1])
def test_embedding_of_an_id_outside_the_vocabulary_raises_index_error(bad_id: int) -> None:
    table = np.zeros((50, 4), np.float32)
    with pytest.raises(IndexError, match=rf"token id {bad_id} is outside the vocabulary \[0, 50\)"):
        kernels.embedding(table, np.array([3, bad_id], np.int32), np.zeros((2, 4), np.float32))


def test_embedding_checks_its_arguments() -> None:
    table = np.zeros((50, 4), np.float32)
    with pytest.raises(TypeError, match="ids must be a int32 array, got int64"):
        kernels.embedding(table, np.array([1, 2]), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"out must have shape \(len\(ids\), dim\)"):
        kernels.embedding(table, np.array([1, 2], np.int32), np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="table must be 2-D"):
        kernels.embedding(np.zeros(200, np.float32), np.array([1], np.int32), np.zeros((1, 4), np.float32))


# ---- RoPE -----------------------------------------------------------------------------------------
def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """theta^(-2j/head_dim), j < head_dim/2, in float64."""
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def llama3_frequencies(
    head_dim: int, theta: float, factor: float, low: float, high: float, original: int
) -> np.ndarray:
    """A numpy port of transformers' _compute_llama3_parameters (modeling_rope_utils.py)."""
    inv_freq = inverse_frequencies(head_dim, theta)
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, inv_freq_llama)


@pytest.mark.parametrize(
    ("head_dim", "theta"), [(64, 10000.0), (128, 500000.0), (128, 1000000.0), (2, 10000.0)]
)
def test_rope_frequencies_are_theta_to_the_minus_2j_over_head_dim(head_dim: int, theta: float) -> None:
    got = kernels.rope_frequencies(head_dim, theta)
    assert got.dtype == np.float32 and got.shape == (head_dim // 2,)
    np.testing.assert_allclose(got, inverse_frequencies(head_dim, theta), rtol=8 * U)
    np.testing.assert_array_equal(kernels.rope_frequencies(head_dim, theta, scaling_factor=1.0), got)


def test_rope_frequencies_with_llama31_scaling_match_transformers_formula() -> None:
    expected = llama3_frequencies(64, theta=500000.0, factor=32.0, low=1.0, high=4.0, original=8192)
    got = kernels.rope_frequencies(64, 500000.0, 32.0, 1.0, 4.0, 8192)
    # float32 pow and the smoothing blend: a few ulp (the blend is continuous, so no branch flips matter)
    np.testing.assert_allclose(got, expected, rtol=32 * U)
    plain = inverse_frequencies(64, 500000.0)
    wavelen = 2 * math.pi / plain
    assert (
        (wavelen < 2048).sum() > 0
        and (wavelen > 8192).sum() > 0
        and ((wavelen >= 2048) & (wavelen <= 8192)).sum() > 0
    )
    np.testing.assert_allclose(
        got[wavelen < 2048], plain[wavelen < 2048], rtol=8 * U
    )  # high frequencies kept
    np.testing.assert_allclose(
        got[wavelen > 8192], plain[wavelen > 8192] / 32, rtol=8 * U
    )  # low ones slowed 32x


def test_rope_frequencies_refuse_an_odd_head_dim() -> None:
    with pytest.raises(ValueError, match="head_dim must be even"):
        kernels.rope_frequencies(63, 10000.0)


def rope_reference(
    x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray, n_heads: int, style: str
) -> np.ndarray:
    batch, head_dim = x.shape[0], x.shape[1] // n_heads
    heads = x.astype(np.float64).reshape(batch, n_heads, head_dim)
    angle = (
        positions.astype(np.float64)[:, None, None] * inv_freq.astype(np.float64)[None, None, :]
    )  # (B, 1, hd/2)
    cos, sin = np.cos(angle), np.sin(angle)
    if style == "interleaved":  # Meta Llama: pairs (x[2j], x[2j+1])
        a, b = heads[..., 0::2], heads[..., 1::2]
    else:  # rotate_half (HF, Qwen3): pairs (x[j], x[j + hd/2])
        a, b = heads[..., : head_dim // 2], heads[..., head_dim // 2 :]
    out = np.empty_like(heads)
    rotated_a, rotated_b = a * cos - b * sin, a * sin + b * cos
    if style == "interleaved":
        out[..., 0::2], out[..., 1::2] = rotated_a, rotated_b
    else:
        out[..., : head_dim // 2], out[..., head_dim // 2 :] = rotated_a, rotated_b
    return out.reshape(batch, -1)


ROPE_POSITIONS = {1: [12345], 7: [0, 1, 7, 300, 4095, 65535, 131071]}


@pytest.mark.parametrize(("isa", "nthreads"), SETTINGS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("style", ["interleaved", "rotate_half"])
def test_rope_rotates_pairs_by_position_times_frequency(
    isa: str, nthreads: int, batch: int, style: str
) -> None:
    rng = np.random.default_rng(batch)
    positions = np.array(ROPE_POSITIONS[batch], np.int32)
    for n_heads, head_dim in ((12, 64), (3, 128)):
        # any float32 frequencies will do; Llama 3.1's are the awkward ones
        inv_freq = llama3_frequencies(head_dim, 500000.0, 32.0, 1.0, 4.0, 8192).astype(np.float32)
        x = rng.standard_normal((batch, n_heads * head_dim)).astype(np.float32)
        expected = rope_reference(x, positions, inv_freq, n_heads, style)
        got = x.copy()
        with kernel_settings(isa, nthreads):
            kernels.rope(got, positions, inv_freq, n_heads, head_dim, style)
        # cos/sin rounded to float32, two products and a sum: a few u times the pair's magnitude
        scale = np.abs(x).max()
        assert np.max(np.abs(got - expected)) <= 8 * U * scale * 2, (n_heads, head_dim)
        np.testing.assert_allclose(  # a rotation keeps each pair's length
            np.linalg.norm(got.reshape(batch, n_heads, -1), axis=-1),
            np.linalg.norm(x.reshape(batch, n_heads, -1), axis=-1),
            rtol=1e-5,
        )


def test_rope_at_position_zero_changes_nothing_and_styles_differ_elsewhere() -> None:
    x = np.random.default_rng(2).standard_normal((1, 64)).astype(np.float32)
    inv_freq = inverse_frequencies(64, 10000.0).astype(np.float32)
    at_zero = x.copy()
    kernels.rope(at_zero, np.array([0], np.int32), inv_freq, 1, 64, "interleaved")
    np.testing.assert_array_equal(at_zero, x)
    a, b = x.copy(), x.copy()
    kernels.rope(a, np.array([5], np.int32), inv_freq, 1, 64, "interleaved")
    kernels.rope(b, np.array([5], np.int32), inv_freq, 1, 64, "rotate_half")
    assert not np.allclose(a, b)


def test_rope_checks_its_arguments() -> None:
    x = np.zeros((2, 64), np.float32)
    inv_freq = np.ones(16, np.float32)
    positions = np.array([0, 1], np.int32)
    with pytest.raises(ValueError, match="rope style must be 'interleaved' or 'rotate_half', got 'neox'"):
        kernels.rope(x, positions, inv_freq, 2, 32, "neox")
    with pytest.raises(ValueError, match=r"x must have shape \(len\(positions\), n_heads \* head_dim\)"):
        kernels.rope(x, positions, inv_freq, 3, 32, "interleaved")
    with pytest.raises(ValueError, match="inv_freq must have head_dim / 2 elements"):
        kernels.rope(x, positions, np.ones(8, np.float32), 2, 32, "interleaved")
    with pytest.raises(TypeError, match="positions must be a int32 array"):
        kernels.rope(x, positions.astype(np.int64), inv_freq, 2, 32, "interleaved")
