"""Token sampling as distributed-llama (and llama2.c) does it.

Temperature 0 is greedy (first index of the maximum). Otherwise logits are divided by the
temperature, softmaxed, and a coin from a xorshift64* generator seeded by `seed` picks the
token: multinomial when top-p is outside (0, 1), else nucleus sampling with llama2.c's
pre-cut of candidates below (1 - p) / (n - 1). The same seed gives the same tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

MASK64 = (1 << 64) - 1


@dataclass
class SamplerSettings:
    """What a request asks of the sampler."""

    temperature: float = 0.0
    topp: float = 0.9
    seed: int | None = None


class Sampler:
    """Picks the next token from a logits vector (float32, any length)."""

    def __init__(self, temperature: float = 0.0, topp: float = 0.9, seed: int | None = None) -> None:
        if not temperature >= 0 or temperature == float("inf"):  # NaN fails the first test
            raise ValueError(f"temperature must be a finite number, not negative, got {temperature}")
        if topp != topp:
            raise ValueError("top-p must be a number, got NaN")
        self.temperature = float(temperature)
        self.topp = float(topp)
        self.state = (int(time.time_ns()) if seed is None else int(seed)) & MASK64
        if self.state == 0:
            self.state = 0x9E3779B97F4A7C15  # xorshift must not start at zero

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def random_u32(self) -> int:
        """xorshift64* step; returns the high 32 bits of the scrambled state."""
        s = self.state
        s ^= s >> 12
        s ^= (s << 25) & MASK64
        s ^= s >> 27
        self.state = s
        return ((s * 0x2545F4914F6CDD1D) & MASK64) >> 32

    def random_f32(self) -> float:
        """A float in [0, 1) with 24 random bits."""
        return (self.random_u32() >> 8) / 16777216.0

    @property
    def nucleus(self) -> bool:
        """Whether sampling keeps only the top-p nucleus (else it draws from every token)."""
        return 0.0 < self.topp < 1.0

    def sample(self, logits: np.ndarray) -> int:
        """The next token id for `logits` (1-D float32; not modified)."""
        if self.greedy:
            return int(np.argmax(logits))
        return self.sample_with_coin(logits, self.random_f32())

    def sample_with_coin(self, logits: np.ndarray, coin: float) -> int:
        """Temperature sampling of `logits` with an already drawn coin."""
        scaled = logits.astype(np.float64) / self.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if not self.nucleus:
            return _multinomial(probs, coin)
        choice = self.choose(np.arange(len(probs)), probs, coin, len(probs), complete=True)
        assert choice is not None
        return choice

    def cutoff(self, vocab_size: int) -> float:
        """llama2.c's pre-cut of nucleus candidates: tokens less likely than (1 - p) / (n - 1)
        for a vocabulary of n tokens can never be in the nucleus."""
        return (1.0 - self.topp) / (vocab_size - 1) if vocab_size > 1 else 0.0

    def choose(self, ids: np.ndarray, probs: np.ndarray, coin: float, vocab_size: int, complete: bool,
               unsent_bound: float = 0.0) -> int | None:
        """Nucleus sampling with `coin` among candidate tokens `ids` whose probabilities under the
        full distribution are `probs`. `complete` says the candidates hold every token at or above
        llama2.c's cutoff (1 - p) / (n - 1); otherwise no token outside them is more likely than
        `unsent_bound`. Returns None when the exact choice could involve a token outside them."""
        keep = probs >= self.cutoff(vocab_size)
        if not keep.any():  # a flat distribution with topp < 1/n: the cut left nothing; the top token is the nucleus
            keep = probs == probs.max()
        ids, probs = ids[keep], probs[keep]
        order = np.lexsort((ids, -probs))  # by probability, then id
        ids, probs = ids[order], probs[order]
        cumulative = np.cumsum(probs)
        last = int(np.searchsorted(cumulative, self.topp, side="right"))
        if last >= len(ids):  # the mass never passed topp: every kept token is in the nucleus
            if not complete:
                return None
            last = len(ids) - 1
        elif not complete and not probs[last] > unsent_bound:
            return None  # an unseen token could rank inside the nucleus
        kept = cumulative[: last + 1]
        pick = int(np.searchsorted(kept, coin * kept[-1], side="right"))
        return int(ids[min(pick, last)])


def _multinomial(probs: np.ndarray, coin: float) -> int:
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, coin, side="right"))
    return min(index, len(probs) - 1)
