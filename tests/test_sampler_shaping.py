"""Logit shaping and filtering in the sampler, against their definitions written out here:
OpenAI's logit_bias and presence/frequency penalties, llama.cpp's repeat_penalty, top_k, min_p,
and a grammar's mask. Every expected value is computed in plain Python over lists."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dllama_py.engine.sampler import Penalties, Sampler


def openai_penalised(logits: list[float], generated: list[int], presence: float, frequency: float) -> list[float]:
    """OpenAI's definition: mu[j] - c[j] * frequency - (c[j] > 0) * presence."""
    out = []
    for j, mu in enumerate(logits):
        c = generated.count(j)
        out.append(mu - c * frequency - (1.0 if c > 0 else 0.0) * presence)
    return out


def llamacpp_repeat(logits: list[float], history: list[int], penalty: float, last_n: int) -> list[float]:
    """llama.cpp's repeat penalty: each distinct token of the last `last_n` has a positive logit
    divided by the penalty, a negative one multiplied."""
    recent = set(history[-last_n:]) if last_n else set()
    return [(mu / penalty if mu > 0 else mu * penalty) if j in recent else mu for j, mu in enumerate(logits)]


def softmax(values: list[float]) -> list[float]:
    m = max(values)
    e = [math.exp(v - m) if v != -math.inf else 0.0 for v in values]
    s = sum(e)
    return [x / s for x in e]


RNG = np.random.default_rng(5)
LOGITS = RNG.normal(0, 2, 40).astype(np.float32)


@pytest.mark.parametrize("presence,frequency", [(0.5, 0.0), (0.0, 0.7), (1.3, -0.4), (-2.0, 2.0)])
def test_presence_and_frequency_penalties_follow_openai_definition(presence, frequency):
    s = Sampler(0.0, penalties=Penalties(presence=presence, frequency=frequency))
    s.start([1, 2, 3, 3])  # the prompt does not count for OpenAI's penalties
    generated = [5, 7, 5, 5, 9, 3]
    for t in generated:
        s.accept(t)
    expected = openai_penalised(LOGITS.astype(np.float64).tolist(), generated, presence, frequency)
    np.testing.assert_allclose(s.shape(LOGITS), expected, rtol=0, atol=1e-12)
    assert s.sample(LOGITS) == int(np.argmax(expected))


@pytest.mark.parametrize("penalty,last_n", [(1.1, 64), (1.5, 3), (0.8, 5), (2.0, 0)])
def test_repeat_penalty_follows_llamacpp_definition(penalty, last_n):
    s = Sampler(0.0, penalties=Penalties(repeat=penalty, repeat_last_n=last_n))
    prompt = [0, 1, 2, 10, 11]
    s.start(prompt)
    for t in [12, 13, 12, 1]:
        s.accept(t)
    history = prompt + [12, 13, 12, 1]
    expected = llamacpp_repeat(LOGITS.astype(np.float64).tolist(), history, penalty, last_n)
    np.testing.assert_allclose(s.shape(LOGITS), expected, rtol=0, atol=1e-12)


def test_logit_bias_adds_and_minus_100_bans():
    best = int(np.argmax(LOGITS))
    s = Sampler(0.0, logit_bias={best: -100.0, 3: 2.5, 999: 50.0})  # an id past the vocabulary is ignored
    expected = LOGITS.astype(np.float64).tolist()
    expected[best] -= 100.0
    expected[3] += 2.5
    np.testing.assert_allclose(s.shape(LOGITS), expected, rtol=0, atol=1e-12)
    assert s.sample(LOGITS) != best
    assert s.sample(LOGITS) == int(np.argmax(expected))
    forced = Sampler(0.0, logit_bias={17: 100.0})
    assert forced.sample(LOGITS) == 17


def filtered_reference(logits: list[float], temperature: float, top_k: int, min_p: float, topp: float,
                       coin: float) -> int:
    """llama.cpp's order: temperature, top_k, min_p (relative to the most likely), top-p over the
    renormalised rest (the first token whose cumulative probability passes p ends the nucleus),
    then the coin times the kept mass picks along the kept tokens (ties by id)."""
    probs = softmax([v / temperature for v in logits])
    ranked = sorted(range(len(probs)), key=lambda j: (-probs[j], j))
    if top_k:
        ranked = ranked[:top_k]
    if min_p:
        ranked = [j for j in ranked if probs[j] >= min_p * probs[ranked[0]]]
    total = sum(probs[j] for j in ranked)
    kept, cumulative = [], 0.0
    for j in ranked:
        kept.append((j, cumulative + probs[j] / total))
        cumulative += probs[j] / total
        if 0 < topp < 1 and cumulative > topp:
            break
    target = coin * kept[-1][1]
    for j, c in kept:
        if target < c:
            return j
    return kept[-1][0]


@pytest.mark.parametrize("top_k,min_p,topp", [(5, 0.0, 1.0), (0, 0.2, 1.0), (8, 0.05, 0.9), (1, 0.0, 0.9),
                                              (0, 0.5, 0.5), (40, 0.0, 0.95)])
def test_top_k_and_min_p_filter_as_llamacpp(top_k, min_p, topp):
    for seed in range(30):
        s = Sampler(0.9, topp, seed, top_k=top_k, min_p=min_p)
        coin = Sampler(0.9, topp, seed).random_f32()  # the coin the sampler draws first
        expected = filtered_reference(LOGITS.astype(np.float64).tolist(), 0.9, top_k, min_p, topp, coin)
        assert s.sample(LOGITS) == expected, seed


def test_top_k_one_is_greedy():
    for seed in range(10):
        assert Sampler(1.5, 1.0, seed, top_k=1).sample(LOGITS) == int(np.argmax(LOGITS))


class OnlyEven:
    """A stand-in grammar: even ids only, finished after three tokens."""

    def __init__(self) -> None:
        self.accepted: list[int] = []

    def allowed(self, vocab_size: int) -> np.ndarray:
        return np.arange(vocab_size) % 2 == 0

    def accept(self, token: int) -> None:
        assert token % 2 == 0
        self.accepted.append(token)

    @property
    def finished(self) -> bool:
        return len(self.accepted) >= 3


def test_a_constraint_masks_tokens_it_does_not_allow():
    for seed in range(20):
        grammar = OnlyEven()
        s = Sampler(1.0, 1.0, seed, constraint=grammar)
        token = s.sample(LOGITS)
        assert token % 2 == 0
        s.accept(token)
        assert grammar.accepted == [token]
    shaped = Sampler(0.0, constraint=OnlyEven()).shape(LOGITS)
    assert np.isneginf(shaped[1::2]).all() and np.isfinite(shaped[::2]).all()


def test_needs_all_logits_only_when_shaping_or_filtering():
    assert not Sampler(0.7, 0.9, 1).needs_all_logits
    assert not Sampler(0.0, penalties=Penalties()).needs_all_logits  # zero penalties do nothing
    assert not Sampler(0.0, logit_bias={3: 0.0}).needs_all_logits
    assert Sampler(0.0, penalties=Penalties(presence=0.1)).needs_all_logits
    assert Sampler(0.0, logit_bias={3: 1.0}).needs_all_logits
    assert Sampler(0.7, top_k=3).needs_all_logits
    assert Sampler(0.7, min_p=0.1).needs_all_logits
    assert Sampler(0.7, constraint=OnlyEven()).needs_all_logits


@pytest.mark.parametrize("kwargs", [{"top_k": -1}, {"min_p": float("nan")}, {"min_p": 1.5}, {"logprobs": -1},
                                    {"logit_bias": {1: float("inf")}}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        Sampler(0.5, **kwargs)


@pytest.mark.parametrize("kwargs", [{"repeat": 0.0}, {"repeat": 5e-324}, {"repeat": 1e3}, {"presence": float("nan")},
                                    {"repeat_last_n": -1}])
def test_bad_penalties_are_refused(kwargs):
    with pytest.raises(ValueError):
        Penalties(**kwargs)


@pytest.mark.parametrize("temperature", [1e-310, 5e-324, 1e-25])
@pytest.mark.parametrize("kwargs", [{}, {"top_k": 3}, {"min_p": 0.1}])
def test_a_vanishing_temperature_is_greedy(temperature, kwargs):
    """Found by the API fuzzer: a denormal temperature made every probability NaN (IndexError)."""
    s = Sampler(temperature, 0.9, 1, **kwargs)
    assert s.greedy and s.sample(LOGITS) == int(np.argmax(LOGITS))
