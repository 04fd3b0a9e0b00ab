"""Unit tests of the sampler against llama2.c's sampling, written from first principles.

Every expected value is computed here, independently of dllama_py.engine.sampler: the xorshift64*
generator in plain Python integers (and a few values printed by llama2.c's own C code), softmax,
multinomial and llama2.c's sample_topp in plain Python / numpy.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dllama_py.engine import sampler as sampler_module
from dllama_py.engine.sampler import Sampler

MASK64 = (1 << 64) - 1
MULTIPLIER = 0x2545F4914F6CDD1D
ZERO_SEED_STATE = 0x9E3779B97F4A7C15  # what seed 0 becomes (xorshift must not start at zero)


# ---- references ------------------------------------------------------------------------------

def ref_u32_stream(seed: int):
    """llama2.c's random_u32 as an endless generator, in plain Python integers."""
    state = seed & MASK64
    while True:
        state ^= state >> 12
        state = (state ^ (state << 25)) & MASK64
        state ^= state >> 27
        yield ((state * MULTIPLIER) & MASK64) >> 32


def ref_f32_stream(seed: int):
    for u in ref_u32_stream(seed):
        yield (u >> 8) / 16777216.0


def ref_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    scaled = logits.astype(np.float64) / temperature
    e = np.exp(scaled - scaled.max())
    return e / e.sum()


def ref_multinomial(probs, coin: float) -> int:
    """llama2.c's sample_mult: the first index whose cumulative probability exceeds the coin."""
    cdf = 0.0
    for i, p in enumerate(probs):
        cdf += float(p)
        if coin < cdf:
            return i
    return len(probs) - 1


def ref_topp(ids, probs, topp: float, coin: float, vocab_size: int) -> int:
    """llama2.c's sample_topp (ties by id): pre-cut below (1 - topp) / (n - 1), sort by descending
    probability, keep up to the first token whose cumulative probability exceeds topp, then draw
    coin * (mass kept) along the kept tokens."""
    cutoff = (1.0 - topp) / (vocab_size - 1) if vocab_size > 1 else 0.0
    kept = [(float(p), int(i)) for i, p in zip(ids, probs) if p >= cutoff]
    kept.sort(key=lambda pi: (-pi[0], pi[1]))
    cumulative = 0.0
    last = len(kept) - 1
    for k, (p, _) in enumerate(kept):
        cumulative += p
        if cumulative > topp:
            last = k
            break
    r = coin * cumulative
    cdf = 0.0
    for p, i in kept[: last + 1]:
        cdf += p
        if r < cdf:
            return i
    return kept[last][1]


def ref_sample(logits: np.ndarray, temperature: float, topp: float, coin: float) -> int:
    if temperature == 0:
        return int(max(range(len(logits)), key=lambda i: (logits[i], -i)))
    probs = ref_probs(logits, temperature)
    if topp <= 0 or topp >= 1:
        return ref_multinomial(probs, coin)
    return ref_topp(range(len(probs)), probs, topp, coin, len(probs))


def below(x: float) -> float:
    return float(np.nextafter(x, -np.inf))


# ---- the random generator ------------------------------------------------------------------------

# printed by llama2.c's random_u32 compiled with gcc (unsigned long long state)
LLAMA2C_U32 = {
    1: [1206177355, 2882512552, 3117485455, 1303648416, 241277360],
    42: [1456360119, 3359763283, 3393612768, 4054632243, 3283045847],
    ZERO_SEED_STATE: [226735074, 1422150777, 2823156546, 2104363911, 2430129893],
    MASK64: [4180462053, 2415166680, 879531507, 3310800028, 1814914367],
}


@pytest.mark.parametrize("seed", sorted(LLAMA2C_U32))
def test_random_u32_matches_llama2c(seed):
    s = Sampler(0.8, 0.9, seed)
    assert [s.random_u32() for _ in range(5)] == LLAMA2C_U32[seed]


@pytest.mark.parametrize("seed", [1, 2, 7, 42, 123456789, 2**32 + 5, 2**63 + 11, MASK64])
def test_random_u32_matches_reference_stream(seed):
    s = Sampler(1.0, 0.9, seed)
    expected = list(itertools.islice(ref_u32_stream(seed), 200))
    got = [s.random_u32() for _ in range(200)]
    assert got == expected
    assert all(0 <= u < 2**32 for u in got)


def test_random_f32_is_top_24_bits_of_u32():
    s = Sampler(1.0, 0.9, 42)
    got = [s.random_f32() for _ in range(500)]
    assert got == list(itertools.islice(ref_f32_stream(42), 500))
    assert all(0.0 <= c < 1.0 for c in got)
    # llama2.c prints 0.339085221 0.782255828 0.790136993 for seed 42
    assert got[:3] == pytest.approx([0.339085221, 0.782255828, 0.790136993], abs=1e-9)
    assert all((c * 16777216.0).is_integer() for c in got)  # 24 bits, no more


def test_u32_and_f32_share_one_stream():
    s = Sampler(1.0, 0.9, 9)
    ref = ref_u32_stream(9)
    for _ in range(50):
        assert s.random_u32() == next(ref)
        assert s.random_f32() == (next(ref) >> 8) / 16777216.0


def test_seed_zero_is_replaced_by_the_nonzero_constant():
    a, b = Sampler(1.0, 0.9, 0), Sampler(1.0, 0.9, 0)
    got = [a.random_u32() for _ in range(20)]
    assert got == [b.random_u32() for _ in range(20)]  # still deterministic, not time-based
    assert any(got)  # a zero xorshift state would stay zero forever
    assert got == list(itertools.islice(ref_u32_stream(ZERO_SEED_STATE), 20))
    # 2**64 is 0 modulo 2**64, so it is the same seed
    c = Sampler(1.0, 0.9, 2**64)
    assert [c.random_u32() for _ in range(20)] == got


def test_same_seed_same_tokens_and_different_seeds_differ():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=64).astype(np.float32) * 2
    runs = {}
    for seed in (5, 5, 6):
        s = Sampler(1.0, 0.9, seed)
        runs.setdefault(seed, []).append([s.sample(logits) for _ in range(40)])
    assert runs[5][0] == runs[5][1]
    assert runs[5][0] != runs[6][0]


def test_sample_draws_exactly_one_coin_per_token():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=50).astype(np.float32)
    for topp in (0.9, 1.0):
        s = Sampler(0.7, topp, 77)
        coins = ref_f32_stream(77)
        for _ in range(30):
            coin = next(coins)
            checker = Sampler(0.7, topp, 1)
            assert s.sample(logits) == checker.sample_with_coin(logits, coin) == ref_sample(logits, 0.7, topp, coin)
        # the generator stands exactly 30 draws further on
        assert s.random_f32() == next(coins)


# ---- settings ----------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [-1e-9, -0.5, -1.0, float("-inf")])
def test_negative_temperature_is_refused(temperature):
    with pytest.raises(ValueError):
        Sampler(temperature, 0.9, 1)


@pytest.mark.parametrize("topp,nucleus", [
    (0.0, False), (1.0, False), (1.5, False), (-0.3, False), (0.5, True), (1e-6, True), (below(1.0), True),
])
def test_nucleus_only_strictly_inside_zero_one(topp, nucleus):
    assert Sampler(1.0, topp, 1).nucleus is nucleus


def test_greedy_property():
    assert Sampler(0.0, 0.9, 1).greedy
    assert not Sampler(1e-6, 0.9, 1).greedy
    assert not Sampler(1.0, 0.9, 1).greedy


# ---- greedy ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("logits,expected", [
    ([1.0, 5.0, 5.0, 2.0], 1),
    ([5.0, 1.0, 5.0, 5.0], 0),
    ([0.0, 0.0, 0.0], 0),
    ([-3.0, -1.0, -2.0, -1.0], 1),
    ([-np.inf, -np.inf, 7.5, 7.5, -np.inf], 2),
])
def test_greedy_takes_first_index_of_maximum(logits, expected):
    arr = np.asarray(logits, dtype=np.float32)
    for topp in (0.0, 0.5, 0.9, 1.0):
        assert Sampler(0.0, topp, 1).sample(arr) == expected


def test_greedy_draws_no_coin():
    s = Sampler(0.0, 0.9, 42)
    logits = np.array([0.1, 0.9, 0.3], dtype=np.float32)
    assert [s.sample(logits) for _ in range(10)] == [1] * 10
    assert s.random_u32() == LLAMA2C_U32[42][0]  # llama2.c draws a coin only when temperature > 0


def test_sample_does_not_modify_logits():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=100).astype(np.float32)
    keep = logits.copy()
    for temperature, topp in ((0.0, 0.9), (0.8, 0.9), (1.3, 1.0)):
        Sampler(temperature, topp, 3).sample(logits)
        assert np.array_equal(logits, keep)


# ---- multinomial ---------------------------------------------------------------------------------

MULT_CASES = [  # (coin, index) for four equal logits: the cumulative sums are exactly 0.25, 0.5, 0.75, 1
    (0.0, 0), (below(0.25), 0), (0.25, 1), (0.3, 1), (below(0.5), 1), (0.5, 2),
    (below(0.75), 2), (0.75, 3), (below(1.0), 3),
]


@pytest.mark.parametrize("topp", [0.0, 1.0, 1.5, -0.3])
@pytest.mark.parametrize("coin,expected", MULT_CASES)
def test_multinomial_boundaries(topp, coin, expected):
    s = Sampler(1.0, topp, 1)
    assert s.sample_with_coin(np.zeros(4, dtype=np.float32), coin) == expected


def test_multinomial_helper_boundaries():
    multinomial = getattr(sampler_module, "_multinomial", None)
    if multinomial is None:
        pytest.skip("_multinomial was renamed or moved; the public path is tested elsewhere")
    probs = np.array([0.25, 0.25, 0.5])
    assert multinomial(probs, 0.0) == 0
    assert multinomial(probs, below(0.25)) == 0
    assert multinomial(probs, 0.25) == 1  # the coin must be strictly below the cumulative sum
    assert multinomial(probs, 0.5) == 2
    assert multinomial(probs, below(1.0)) == 2
    assert multinomial(probs, 1.0) == 2  # past the end: the last index, as llama2.c returns n - 1
    # probabilities that sum to less than 1 (rounding): a coin past the sum takes the last index
    assert multinomial(np.array([0.2, 0.3, 0.4]), 0.95) == 2
    assert multinomial(np.array([0.0, 1.0, 0.0]), 0.5) == 1  # zero-probability tokens are never picked
    assert multinomial(np.array([0.0, 1.0, 0.0]), 0.0) == 1


@pytest.mark.parametrize("topp", [0.0, 1.0, 2.0, -1.0])
def test_topp_outside_zero_one_is_plain_multinomial(topp):
    # logits whose index order is not the probability order: token 0 is the least likely,
    # and would never be in a 0.5 nucleus; multinomial picks it for a small coin
    logits = np.array([0.0, 3.0, 1.0, 2.0], dtype=np.float32)
    s = Sampler(1.0, topp, 1)
    assert s.sample_with_coin(logits, 0.01) == 0
    probs = ref_probs(logits, 1.0)
    for coin in np.linspace(0.0, 1.0, 401, endpoint=False):
        assert s.sample_with_coin(logits, float(coin)) == ref_multinomial(probs, float(coin))
    assert Sampler(1.0, 0.5, 1).sample_with_coin(logits, 0.01) == 1  # while the nucleus does not


@pytest.mark.parametrize("temperature", [0.25, 0.7, 1.0, 1.8, 5.0])
def test_temperature_scales_logits_before_softmax(temperature):
    rng = np.random.default_rng(int(temperature * 100))
    logits = rng.normal(size=16).astype(np.float32) * 3
    probs = ref_probs(logits, temperature)
    s = Sampler(temperature, 1.0, 1)
    for coin in np.linspace(0.0, 1.0, 257, endpoint=False):
        assert s.sample_with_coin(logits, float(coin)) == ref_multinomial(probs, float(coin))


# ---- nucleus (top-p) ---------------------------------------------------------------------------------

def choose_full(topp, probs, coin, ids=None):
    probs = np.asarray(probs, dtype=np.float64)
    ids = np.arange(len(probs)) if ids is None else np.asarray(ids)
    return Sampler(1.0, topp, 1).choose(ids, probs, coin, len(probs), complete=True)


def test_nucleus_exact_boundaries():
    probs = [0.25, 0.5, 0.25]  # sorted: id 1 (0.5), id 0 (0.25), id 2 (0.25); cumulative 0.5, 0.75, 1
    # topp 0.9: the mass passes 0.9 only at the third token, so all three are kept, r = coin
    assert choose_full(0.9, probs, 0.0) == 1
    assert choose_full(0.9, probs, below(0.5)) == 1
    assert choose_full(0.9, probs, 0.5) == 0
    assert choose_full(0.9, probs, below(0.75)) == 0
    assert choose_full(0.9, probs, 0.75) == 2
    assert choose_full(0.9, probs, below(1.0)) == 2
    # topp exactly 0.75: the cumulative 0.75 does not exceed it, so the third token is still kept
    assert choose_full(0.75, probs, below(1.0)) == 2
    # topp just below 0.75: the second token passes it and ends the nucleus (mass 0.75)
    topp = below(0.75)
    assert choose_full(topp, probs, below(1.0)) == 0
    assert choose_full(topp, probs, 2 / 3 - 1e-9) == 1  # r = coin * 0.75 just below 0.5
    assert choose_full(topp, probs, 2 / 3 + 1e-9) == 0
    # topp 0.5: cumulative 0.5 does not exceed 0.5, the nucleus is {1, 0}
    assert {choose_full(0.5, probs, float(c)) for c in np.linspace(0, 1, 101, endpoint=False)} == {0, 1}
    # topp below 0.5: only the top token
    assert {choose_full(0.4, probs, float(c)) for c in np.linspace(0, 1, 101, endpoint=False)} == {1}


def test_nucleus_never_picks_outside_top_p_mass():
    probs = np.array([0.05, 0.3, 0.15, 0.5])
    logits = np.log(probs).astype(np.float32)
    s = Sampler(1.0, 0.7, 1)
    coins = [float(c) for c in np.linspace(0.0, 1.0, 801, endpoint=False)] + [below(1.0)]
    picks = [s.sample_with_coin(logits, c) for c in coins]
    assert set(picks) == {3, 1}  # 0.5 + 0.3 passes 0.7: tokens 2 and 0 are outside
    # token 3 takes r = coin * 0.8 below 0.5, i.e. coins below 0.625
    p = ref_probs(logits, 1.0)
    split = p[3] / (p[3] + p[1])
    for c, pick in zip(coins, picks):
        if abs(c - split) > 1e-6:
            assert pick == (3 if c < split else 1)
    # over the generator's coins too
    s = Sampler(1.0, 0.7, 2024)
    assert set(s.sample(logits) for _ in range(1000)) == {1, 3}


def test_nucleus_ties_sort_by_probability_then_id():
    # ids in arbitrary order, two tokens tied for the top: the lower id comes first
    ids = np.array([7, 3, 1, 9])
    probs = np.array([0.375, 0.375, 0.125, 0.125])
    s = Sampler(1.0, 0.3, 1)
    for c in np.linspace(0, 1, 50, endpoint=False):
        assert s.choose(ids, probs, float(c), 10, complete=True) == 3
    s = Sampler(1.0, 0.8, 1)  # 0.375 + 0.375 = 0.75, then 0.875 > 0.8: {3, 7, 1}
    assert s.choose(ids, probs, 0.0, 10, complete=True) == 3
    assert s.choose(ids, probs, 0.5, 10, complete=True) == 7  # r = 0.4375: past 0.375
    assert s.choose(ids, probs, below(1.0), 10, complete=True) == 1  # tie 1 vs 9: id 1 first
    assert {s.choose(ids, probs, float(c), 10, complete=True) for c in np.linspace(0, 1, 400, endpoint=False)} == {3, 7, 1}
    # the same through the full path with equal logits: 1/6 then 2/6 > 0.3, so the nucleus is {0, 1}
    logits = np.zeros(6, dtype=np.float32)
    s = Sampler(1.0, 0.3, 1)
    assert s.sample_with_coin(logits, 0.0) == 0
    assert s.sample_with_coin(logits, below(1.0)) == 1
    assert {s.sample_with_coin(logits, float(c)) for c in np.linspace(0, 1, 300, endpoint=False)} == {0, 1}


def test_precut_removes_tiny_probabilities():
    # a candidate set that never passes topp (as the root may hold): the kept mass is what is
    # above the cutoff (1 - topp) / (n - 1), so a token below it is never picked, even at coin -> 1
    vocab, topp = 1000, 0.9
    cutoff = (1.0 - topp) / (vocab - 1)
    ids = np.array([0, 1, 2, 3])
    s = Sampler(1.0, topp, 1)
    probs = np.array([0.5, 0.3, cutoff, below(cutoff)])
    coins = [float(c) for c in np.linspace(0, 1, 500, endpoint=False)] + [below(1.0)]
    picks = {s.choose(ids, probs, c, vocab, complete=True) for c in coins}
    assert picks == {0, 1, 2}  # the token exactly at the cutoff stays, the one just below goes
    # r = coin * (0.5 + 0.3 + cutoff): coin -> 1 lands on the token at the cutoff
    assert s.choose(ids, probs, below(1.0), vocab, complete=True) == 2
    # without it, the largest coin falls on token 1: the tail below the cutoff adds nothing
    probs2 = np.array([0.5, 0.3, cutoff * 0.5, cutoff * 0.9])
    assert s.choose(ids, probs2, below(1.0), vocab, complete=True) == 1
    assert {s.choose(ids, probs2, c, vocab, complete=True) for c in coins} == {0, 1}


@pytest.mark.parametrize("seed", range(40))
def test_sample_matches_llama2c_reference(seed):
    rng = np.random.default_rng(1000 + seed)
    vocab = int(rng.integers(10, 600))  # below 10 tokens, topp 0.1 may pre-cut every token (see below)
    temperature = float(rng.choice([0.0, 0.3, 0.8, 1.0, 1.5]))
    topp = float(rng.choice([0.0, 0.1, 0.5, 0.9, 0.95, 0.999, 1.0, 1.2]))
    scale = float(rng.choice([0.5, 2.0, 6.0]))
    logits = (rng.normal(size=vocab) * scale).astype(np.float32)
    s = Sampler(temperature, topp, seed + 1)
    coins = ref_f32_stream(seed + 1)
    for _ in range(25):
        coin = next(coins) if temperature > 0 else None
        assert s.sample(logits) == ref_sample(logits, temperature, topp, coin)


def test_sample_matches_llama2c_reference_peaked():
    # peaked distributions over a large vocabulary: the nucleus is a handful of tokens
    total = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        logits = (rng.standard_cauchy(size=4096) * 2).astype(np.float32)
        for topp in (0.5, 0.9):
            s = Sampler(0.9, topp, seed + 10)
            coins = ref_f32_stream(seed + 10)
            for _ in range(15):
                assert s.sample(logits) == ref_sample(logits, 0.9, topp, next(coins))
                total += 1
    assert total == 6 * 2 * 15


# ---- choose over candidate subsets --------------------------------------------------------------

def subset_of(probs: np.ndarray, n_slices: int, k: int):
    """What the root holds after a TOPK gather: each slice's k most likely tokens (ties by id),
    and a bound on every token not sent (the largest k-th candidate of a slice that had more)."""
    ids, bounds = [], []
    for part in np.array_split(np.arange(len(probs)), n_slices):
        order = sorted(part.tolist(), key=lambda i: (-probs[i], i))
        ids += order[:k]
        if len(order) > k:
            bounds.append(float(probs[order[k - 1]]))
    ids = np.array(ids)
    return ids, probs[ids], max(bounds, default=0.0), not bounds


def ref_subset_is_enough(ids, sub_probs, topp, vocab, unsent_bound) -> bool:
    """Whether the candidates decide the nucleus: after the pre-cut the sorted mass passes topp at a
    token strictly more likely than every token not sent."""
    cutoff = (1.0 - topp) / (vocab - 1)
    kept = [(float(p), int(i)) for i, p in zip(ids, sub_probs) if p >= cutoff]
    kept.sort(key=lambda pi: (-pi[0], pi[1]))
    cumulative = 0.0
    for p, _ in kept:
        cumulative += p
        if cumulative > topp:
            return p > unsent_bound
    return False


def test_choose_on_subset_equals_full_or_returns_none():
    found = {"none": 0, "answer": 0, "complete": 0}
    for seed in range(300):
        rng = np.random.default_rng(seed)
        vocab = int(rng.integers(20, 400))
        scale = float(rng.choice([0.3, 1.0, 3.0, 8.0]))
        logits = rng.normal(size=vocab) * scale
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        topp = float(rng.choice([0.3, 0.6, 0.9, 0.95]))
        n_slices, k = int(rng.integers(1, 5)), int(rng.integers(1, 12))
        ids, sub, bound, every_sent = subset_of(probs, n_slices, k)
        perm = rng.permutation(len(ids))  # the order in which candidates arrive does not matter
        ids, sub = ids[perm], sub[perm]
        s = Sampler(1.0, topp, 1)
        for coin in (0.0, float(rng.random()), float(rng.random()), below(1.0)):
            full = s.choose(np.arange(vocab), probs, coin, vocab, complete=True)
            assert full == ref_topp(range(vocab), probs, topp, coin, vocab)
            got = s.choose(ids, sub, coin, vocab, complete=False, unsent_bound=bound)
            if ref_subset_is_enough(ids, sub, topp, vocab, bound):
                assert got == full
                found["answer"] += 1
            else:
                assert got is None
                found["none"] += 1
            if every_sent or bound < (1.0 - topp) / (vocab - 1):
                # every token not sent is pre-cut anyway (the root's `complete`): the same answer
                assert s.choose(ids, sub, coin, vocab, complete=True) == full
                found["complete"] += 1
    assert found["none"] > 50 and found["answer"] > 50 and found["complete"] > 20  # every branches were exercised


def test_choose_incomplete_hand_built_cases():
    vocab = 100
    s = Sampler(1.0, 0.5, 1)
    ids = np.array([10, 20, 30])
    # full distribution: three candidates, the other 97 tokens share the rest evenly
    head = np.array([0.4, 0.2, 0.1])
    rest = (1.0 - head.sum()) / (vocab - 3)
    full = np.full(vocab, rest)
    full[ids] = head
    for coin in (0.0, 0.3, 0.66, 0.7, below(1.0)):
        expected = ref_topp(range(vocab), full, 0.5, coin, vocab)
        assert s.choose(np.arange(vocab), full, coin, vocab, complete=True) == expected
        # 0.4 + 0.2 passes 0.5 at 0.2 > rest: the candidates decide it
        assert s.choose(ids, head, coin, vocab, complete=False, unsent_bound=rest) == expected
        # an unsent token may be as likely as the last kept one (0.2): it could rank in the nucleus
        assert s.choose(ids, head, coin, vocab, complete=False, unsent_bound=0.2) is None
        # just below it: decided again
        assert s.choose(ids, head, coin, vocab, complete=False, unsent_bound=below(0.2)) == expected
    # the candidates' mass never passes topp: unknown tokens belong to the nucleus
    s9 = Sampler(1.0, 0.9, 1)
    assert s9.choose(ids, head, 0.5, vocab, complete=False, unsent_bound=1e-9) is None
    assert s9.choose(ids, head, 0.5, vocab, complete=False, unsent_bound=0.0) is None
    # ... unless they are all known to be below the cutoff (complete): then the kept ones are all
    assert s9.choose(ids, head, 0.0, vocab, complete=True) == 10
    assert s9.choose(ids, head, below(1.0), vocab, complete=True) == 30
    # a candidate below the cutoff does not count towards the mass
    cut = (1.0 - 0.5) / (vocab - 1)
    s5 = Sampler(1.0, 0.5, 1)
    ids4 = np.array([1, 2, 3])
    sub4 = np.array([0.3, 0.2, cut * 0.5])
    # 0.3 + 0.2 = 0.5 does not pass 0.5, and the third is pre-cut: the mass never passes topp
    assert s5.choose(ids4, sub4, 0.5, vocab, complete=False, unsent_bound=0.0) is None


def test_choose_on_full_distribution_matches_sample_with_coin():
    rng = np.random.default_rng(11)
    for _ in range(30):
        logits = (rng.normal(size=200) * 3).astype(np.float32)
        s = Sampler(0.9, 0.8, 1)
        probs = ref_probs(logits, 0.9)
        for coin in rng.random(5):
            assert s.sample_with_coin(logits, float(coin)) == s.choose(
                np.arange(200), probs, float(coin), 200, complete=True)


def test_reference_topp_sanity():
    # the reference itself, on a case worked out by hand
    probs = [0.1, 0.6, 0.3]
    assert ref_topp(range(3), probs, 0.5, 0.0, 3) == 1  # 0.6 > 0.5: nucleus {1}
    assert ref_topp(range(3), probs, 0.7, below(1.0), 3) == 2  # 0.9 > 0.7: {1, 2}
    assert ref_multinomial(probs, 0.65) == 1
    assert math.isclose(sum(ref_probs(np.array([1.0, 2.0, 3.0]), 1.0)), 1.0)


def test_nucleus_when_the_precut_removes_every_token():
    # four tokens, topp 0.1: cutoff 0.3, while the most likely token has about 0.27
    logits = np.array([0.1, 0.0, 0.0, 0.0], dtype=np.float32)
    assert ref_probs(logits, 1.0).max() < (1.0 - 0.1) / 3
    s = Sampler(1.0, 0.1, 1)
    assert [s.sample_with_coin(logits, c) for c in (0.0, 0.5, below(1.0))] == [0, 0, 0]
