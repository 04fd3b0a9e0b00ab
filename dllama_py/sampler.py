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
        if temperature < 0:
            raise ValueError(f"temperature must not be negative, got {temperature}")
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

    def sample(self, logits: np.ndarray) -> int:
        """The next token id for `logits` (1-D float32; not modified)."""
        if self.greedy:
            return int(np.argmax(logits))
        probs = logits.astype(np.float64) / self.temperature
        probs = np.exp(probs - probs.max())
        probs /= probs.sum()
        coin = self.random_f32()
        if self.topp <= 0 or self.topp >= 1:
            return _multinomial(probs, coin)
        return _top_p(probs, self.topp, coin)


def _multinomial(probs: np.ndarray, coin: float) -> int:
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, coin, side="right"))
    return min(index, len(probs) - 1)


def _top_p(probs: np.ndarray, topp: float, coin: float) -> int:
    """Nucleus sampling: the smallest set of most likely tokens whose mass exceeds topp."""
    n = len(probs)
    cutoff = (1.0 - topp) / (n - 1) if n > 1 else 0.0
    candidates = np.nonzero(probs >= cutoff)[0]
    order = candidates[np.lexsort((candidates, -probs[candidates]))]  # by probability, then id
    cumulative = np.cumsum(probs[order])
    last = int(np.searchsorted(cumulative, topp, side="right"))
    last = min(last, len(order) - 1)
    kept = cumulative[: last + 1]
    r = coin * kept[-1]
    pick = int(np.searchsorted(kept, r, side="right"))
    return int(order[min(pick, last)])
