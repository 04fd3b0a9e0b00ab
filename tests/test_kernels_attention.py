"""Causal attention over a KV cache with grouped KV heads, and MoE top-k gating, against numpy
written from the math, on every SIMD path with 1, 2 and 3 threads and batches of 1 and 7.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from kernel_reference import PATHS, THREADS, kernel_settings

from dllama_py.model import kernels

U = 2.0**-24  # float32 unit roundoff
SETTINGS = [(isa, n) for isa in PATHS for n in THREADS]
SEQ_LEN = 48
# A prompt chunk that does not start at 0 (B = 7), the first and the last cache position (B = 1).
POSITIONS = {7: [37, 38, 39, 40, 41, 42, 43], 1: [0], -1: [SEQ_LEN - 1]}


def attention_reference(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    positions: np.ndarray,
    n_heads: int,
    n_kv_heads: int,
) -> tuple[np.ndarray, np.ndarray]:
    """softmax(q k^T / sqrt(hd)) v over cache rows 0..pos for each head; head h reads kv head
    h // (n_heads / n_kv_heads). Returns (out (B, n_heads*hd), largest sum |q||k|/sqrt(hd) per row)."""
    batch = q.shape[0]
    head_dim = q.shape[1] // n_heads
    group = n_heads // n_kv_heads
    out = np.zeros((batch, n_heads, head_dim))
    score_magnitude = np.zeros(batch)
    for b in range(batch):
        rows = positions[b] + 1
        for h in range(n_heads):
            qh = q[b, h * head_dim : (h + 1) * head_dim].astype(np.float64)
            kv = slice((h // group) * head_dim, (h // group + 1) * head_dim)
            keys, values = k_cache[:rows, kv].astype(np.float64), v_cache[:rows, kv].astype(np.float64)
            scores = keys @ qh / math.sqrt(head_dim)  # (rows,)
            weights = np.exp(scores - scores.max())
            out[b, h] = (weights / weights.sum()) @ values
            score_magnitude[b] = max(
                score_magnitude[b], float((np.abs(keys) @ np.abs(qh)).max()) / math.sqrt(head_dim)
            )
    return out.reshape(batch, -1), score_magnitude


def transposed(k_cache: np.ndarray, n_kv_heads: int, head_dim: int) -> np.ndarray:
    """The kernel's key layout: (seq_len, n_kv_heads*head_dim) -> (n_kv_heads, head_dim, seq_len)."""
    return np.ascontiguousarray(k_cache.reshape(len(k_cache), n_kv_heads, head_dim).transpose(1, 2, 0))


@pytest.mark.parametrize(("isa", "nthreads"), SETTINGS)
@pytest.mark.parametrize("positions_key", [7, 1, -1])
@pytest.mark.parametrize("n_kv_heads", [8, 4, 2])  # GQA ratios 1, 2 and 4
def test_attention_is_softmax_of_scaled_scores_times_values_over_the_causal_prefix(
    isa: str, nthreads: int, positions_key: int, n_kv_heads: int
) -> None:
    n_heads = 8
    positions = np.array(POSITIONS[positions_key], np.int32)
    rng = np.random.default_rng(n_kv_heads * 10 + positions_key)
    for head_dim in (64, 20):  # 20: not a multiple of the SIMD width, so the tails run
        q = rng.standard_normal((len(positions), n_heads * head_dim)).astype(np.float32)
        k_cache = rng.standard_normal((SEQ_LEN, n_kv_heads * head_dim)).astype(np.float32)
        v_cache = rng.standard_normal((SEQ_LEN, n_kv_heads * head_dim)).astype(np.float32)
        # rows past every position hold garbage that must not be read
        k_cache[positions.max() + 1 :] = np.nan
        v_cache[positions.max() + 1 :] = np.nan
        expected, score_magnitude = attention_reference(q, k_cache, v_cache, positions, n_heads, n_kv_heads)
        out = np.full_like(q, np.nan)
        keys_t = transposed(k_cache, n_kv_heads, head_dim)
        with kernel_settings(isa, nthreads):
            kernels.attention(q, keys_t, v_cache, positions, out, n_heads, n_kv_heads, head_dim)
        # a score's error is <= (hd + 4) u sum|q||k|/sqrt(hd); the softmax weights inherit about twice
        # that relatively; the weighted sum of values adds (rows + 4) u. All times max|v|.
        rows = positions.max() + 1
        v_max = float(np.abs(v_cache[:rows]).max())
        bound = (2 * (head_dim + 4) * U * score_magnitude[:, None] + (rows + 8) * U) * v_max
        error = np.abs(out - expected)
        assert (error <= bound).all(), (
            f"head_dim {head_dim}: worst error / bound {np.nanmax(error / bound):.3g}"
        )


def test_attention_at_position_zero_returns_the_first_value_row() -> None:
    q = np.random.default_rng(3).standard_normal((1, 4 * 16)).astype(np.float32)
    k_cache = np.random.default_rng(4).standard_normal((5, 2 * 16)).astype(np.float32)
    v_cache = np.random.default_rng(5).standard_normal((5, 2 * 16)).astype(np.float32)
    out = np.zeros_like(q)
    kernels.attention(q, transposed(k_cache, 2, 16), v_cache, np.array([0], np.int32), out, 4, 2, 16)
    # one key: weight 1; heads 0, 1 read kv head 0 and heads 2, 3 kv head 1
    expected = np.concatenate([v_cache[0, :16], v_cache[0, :16], v_cache[0, 16:], v_cache[0, 16:]])
    np.testing.assert_allclose(out[0], expected, rtol=4 * U)


def test_attention_checks_positions_heads_and_shapes() -> None:
    q, out = np.zeros((1, 8), np.float32), np.zeros((1, 8), np.float32)
    keys, values = np.zeros((2, 4, 4), np.float32), np.zeros((4, 8), np.float32)
    with pytest.raises(IndexError, match=r"position 4 is outside the KV cache \(4 positions\)"):
        kernels.attention(q, keys, values, np.array([4], np.int32), out, 2, 2, 4)
    with pytest.raises(IndexError, match="position -1 is outside the KV cache"):
        kernels.attention(q, keys, values, np.array([-1], np.int32), out, 2, 2, 4)
    with pytest.raises(ValueError, match="n_heads must be a multiple of n_kv_heads"):
        kernels.attention(
            np.zeros((1, 12), np.float32),
            keys,
            values,
            np.array([0], np.int32),
            np.zeros((1, 12), np.float32),
            3,
            2,
            4,
        )
    with pytest.raises(ValueError, match=r"k_cache must have shape \(n_kv_heads, head_dim, seq_len\)"):
        kernels.attention(q, np.zeros((4, 8), np.float32), values, np.array([0], np.int32), out, 2, 2, 4)
    with pytest.raises(
        ValueError, match=r"q and out must have shape \(len\(positions\), n_heads \* head_dim\)"
    ):
        kernels.attention(q, keys, values, np.array([0, 1], np.int32), out, 2, 2, 4)
    with pytest.raises(ValueError, match=r"v_cache must have shape \(seq_len, n_kv_heads \* head_dim\)"):
        kernels.attention(q, keys, np.zeros((3, 8), np.float32), np.array([0], np.int32), out, 2, 2, 4)


# ---- MoE gating -----------------------------------------------------------------------------------
def moe_gate_reference(logits: np.ndarray, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """softmax over experts, the k most probable (ties: lower index first), renormalised or not."""
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    order = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    weights = np.take_along_axis(p, order, axis=-1)
    if normalize:
        weights /= weights.sum(axis=-1, keepdims=True)
    return order, weights


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize(("n_experts", "k"), [(8, 2), (128, 8), (4, 4), (60, 1)])
@pytest.mark.parametrize("normalize", [True, False])
def test_moe_gate_picks_the_top_k_softmax_probabilities(
    batch: int, n_experts: int, k: int, normalize: bool
) -> None:
    rng = np.random.default_rng(n_experts + k)
    # distinct logits at least 0.05 apart, so float32 cannot reorder them
    logits = np.stack([rng.permutation(n_experts) * 0.05 + rng.uniform(-3, 3) for _ in range(batch)]).astype(
        np.float32
    )
    expected_indices, expected_weights = moe_gate_reference(logits, k, normalize)
    for isa, nthreads in SETTINGS:  # plain C++ today; kept on every setting so a SIMD version is covered
        with kernel_settings(isa, nthreads):
            indices, weights = kernels.moe_gate(logits, k, normalize)
        assert indices.dtype == np.int32 and weights.dtype == np.float32 and indices.shape == (batch, k)
        np.testing.assert_array_equal(indices, expected_indices)
        np.testing.assert_allclose(weights, expected_weights, rtol=(n_experts + 8) * U)
        if normalize:
            np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=(k + 2) * U)


def test_moe_gate_breaks_ties_by_the_lower_expert_index() -> None:
    logits = np.array([[1.0, 2.0, 2.0, 0.5, 2.0]], np.float32)
    indices, weights = kernels.moe_gate(logits, 2)
    np.testing.assert_array_equal(indices, [[1, 2]])
    np.testing.assert_allclose(weights, [[0.5, 0.5]], rtol=4 * U)
    indices, weights = kernels.moe_gate(np.zeros((1, 6), np.float32), 3, normalize=False)
    np.testing.assert_array_equal(indices, [[0, 1, 2]])
    np.testing.assert_allclose(weights, [[1 / 6] * 3], rtol=4 * U)


@pytest.mark.parametrize("k", [0, 9])
def test_moe_gate_refuses_k_outside_one_to_n_experts(k: int) -> None:
    with pytest.raises(ValueError, match="top-k must be between 1 and the number of experts"):
        kernels.moe_gate(np.zeros((2, 8), np.float32), k)
