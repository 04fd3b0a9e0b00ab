"""Token sampling as distributed-llama (and llama2.c) does it, plus what OpenAI's API and
llama.cpp's server add.

Temperature 0 (or below GREEDY_BELOW) is greedy (first index of the maximum). Otherwise logits are divided by the
temperature, softmaxed, and a coin from a xorshift64* generator seeded by `seed` picks the
token: multinomial when top-p is outside (0, 1), else nucleus sampling with llama2.c's
pre-cut of candidates below (1 - p) / (n - 1). The same seed gives the same tokens.

A sampler may also shape the logits before choosing, in this order (`shape`):
1. `logit_bias`: a number added to the logit of each listed token (OpenAI; -100 bans it);
2. OpenAI's penalties over the tokens generated so far: logit[j] -= frequency * count[j] +
   presence * (count[j] > 0);
3. llama.cpp's `repeat_penalty` over the last `repeat_last_n` tokens of prompt and answer:
   a positive logit is divided by it, a negative one multiplied;
4. a `constraint` (a grammar): tokens it does not allow get -inf.
After the temperature, `top_k` keeps the k most likely tokens and `min_p` those at least
min_p times as likely as the most likely one (llama.cpp's order), then top-p as above among them.
A sampler that shapes or filters needs every logit (`needs_all_logits`); one that does not can
choose from the nodes' top tokens (engine.py). The sampler is the state of one sequence: the
generator tells it each token it accepts (`accept`), which the penalties and the grammar follow.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

MASK64 = (1 << 64) - 1
# Below this temperature sampling is greedy: logits divided by it overflow the float32 values the
# nodes send (TOPK) and then float64 (a denormal 1e-310 turned every probability into NaN), while
# any gap between two logits already makes the second one vanish (e^-1e18 for a gap of 0.01).
GREEDY_BELOW = 1e-20
# A repeat penalty divides or multiplies logits: far from 1 it overflows them (5e-324 did, found
# by the API fuzzer) and means nothing more than "never repeat" / "always repeat".
MIN_REPEAT_PENALTY, MAX_REPEAT_PENALTY = 0.01, 100.0


@dataclass
class SamplerSettings:
    """What a request asks of the sampler."""

    temperature: float = 0.0
    topp: float = 0.9
    seed: int | None = None


class ConstraintError(ValueError):
    """A grammar cannot go on: it allows no token of the vocabulary here."""


class Constraint(Protocol):
    """What a grammar offers the sampler (generation/grammar.py implements it)."""

    def allowed(self, vocab_size: int) -> np.ndarray:
        """A bool array of `vocab_size`: the tokens that may come next."""
        ...

    def accept(self, token: int) -> None:
        """Advance past `token` (one the mask allowed)."""
        ...


@dataclass(frozen=True)
class Penalties:
    """OpenAI's presence and frequency penalties (-2..2) and llama.cpp's repeat penalty (1: none)
    over the last `repeat_last_n` tokens."""

    presence: float = 0.0
    frequency: float = 0.0
    repeat: float = 1.0
    repeat_last_n: int = 64

    def __post_init__(self) -> None:
        for name in ("presence", "frequency", "repeat"):
            value = getattr(self, name)
            if not np.isfinite(value):
                raise ValueError(f"the {name} penalty must be a finite number, got {value}")
        if not MIN_REPEAT_PENALTY <= self.repeat <= MAX_REPEAT_PENALTY:
            raise ValueError(f"the repeat penalty must lie in [{MIN_REPEAT_PENALTY}, {MAX_REPEAT_PENALTY}], "
                             f"got {self.repeat}")
        if self.repeat_last_n < 0:
            raise ValueError(f"repeat_last_n must not be negative, got {self.repeat_last_n}")

    @property
    def active(self) -> bool:
        return bool(self.presence or self.frequency or (self.repeat != 1.0 and self.repeat_last_n))


class Sampler:
    """Picks the next token from a logits vector (float32, any length); see the module's text."""

    def __init__(self, temperature: float = 0.0, topp: float = 0.9, seed: int | None = None, *,
                 top_k: int = 0, min_p: float = 0.0, penalties: Penalties | None = None,
                 logit_bias: Mapping[int, float] | None = None, constraint: Constraint | None = None,
                 logprobs: int | None = None) -> None:
        if not temperature >= 0 or temperature == float("inf"):  # NaN fails the first test
            raise ValueError(f"temperature must be a finite number, not negative, got {temperature}")
        if topp != topp:
            raise ValueError("top-p must be a number, got NaN")
        if top_k < 0:
            raise ValueError(f"top_k must not be negative, got {top_k}")
        if not 0.0 <= min_p <= 1.0:  # also refuses NaN
            raise ValueError(f"min_p must lie in [0, 1], got {min_p}")
        if logprobs is not None and logprobs < 0:
            raise ValueError(f"the number of top log-probabilities must not be negative, got {logprobs}")
        self.temperature = float(temperature) if temperature >= GREEDY_BELOW else 0.0
        self.topp = float(topp)
        self.top_k, self.min_p = int(top_k), float(min_p)
        self.penalties = penalties if penalties is not None and penalties.active else None
        self.logit_bias = {int(k): float(v) for k, v in (logit_bias or {}).items() if v}
        if not all(np.isfinite(v) for v in self.logit_bias.values()):
            raise ValueError("a logit bias must be a finite number")
        self.constraint = constraint
        self.logprobs = logprobs  # None: not asked; n: the chosen token's and the n most likely
        self.history: list[int] = []  # prompt and accepted tokens, for the repeat penalty
        self.generated: Counter[int] = Counter()  # accepted tokens, for presence and frequency
        self.state = (int(time.time_ns()) if seed is None else int(seed)) & MASK64
        if self.state == 0:
            self.state = 0x9E3779B97F4A7C15  # xorshift must not start at zero

    # ---- the sequence -----------------------------------------------------------------------
    def start(self, prompt_ids: Sequence[int]) -> None:
        """A new sequence after `prompt_ids` (the repeat penalty looks back into the prompt)."""
        self.history = list(prompt_ids)
        self.generated = Counter()

    def accept(self, token: int) -> None:
        """`token` was chosen and joins the sequence."""
        self.history.append(token)
        self.generated[token] += 1
        if self.constraint is not None:
            self.constraint.accept(token)

    @property
    def needs_all_logits(self) -> bool:
        """Whether choosing needs every logit (it shapes them or filters by rank or ratio)."""
        return bool(self.logit_bias or self.penalties or self.constraint is not None or self.top_k or self.min_p)

    def shape(self, logits: np.ndarray) -> np.ndarray:
        """The logits (float64 copy) after bias, penalties and constraint (the module's steps 1-4)."""
        x = logits.astype(np.float64)
        n = len(x)
        for token, bias in self.logit_bias.items():
            if 0 <= token < n:
                x[token] += bias
        p = self.penalties
        if p is not None:
            if p.presence or p.frequency:
                ids = np.fromiter((t for t in self.generated if 0 <= t < n), dtype=np.int64)
                counts = np.fromiter((self.generated[t] for t in ids), dtype=np.float64, count=len(ids))
                x[ids] -= p.frequency * counts + p.presence * (counts > 0)
            if p.repeat != 1.0 and p.repeat_last_n:
                recent = np.unique(np.asarray([t for t in self.history[-p.repeat_last_n:] if 0 <= t < n],
                                              dtype=np.int64))
                values = x[recent]
                x[recent] = np.where(values > 0, values / p.repeat, values * p.repeat)
        if self.constraint is not None:
            allowed = self.constraint.allowed(n)
            if not allowed.any():
                raise ConstraintError("the grammar allows no token of this vocabulary here")
            x[~allowed] = -np.inf
        return x

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
            return int(np.argmax(self.shape(logits) if self.needs_all_logits else logits))
        return self.sample_with_coin(logits, self.random_f32())

    def sample_with_coin(self, logits: np.ndarray, coin: float) -> int:
        """Temperature sampling of `logits` (shaped and filtered as the sampler says) with an
        already drawn coin."""
        x = self.shape(logits) if self.needs_all_logits else logits.astype(np.float64)
        scaled = x / self.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if self.top_k or self.min_p:
            return self._sample_filtered(probs, coin)
        if not self.nucleus:
            return _multinomial(probs, coin)
        choice = self.choose(np.arange(len(probs)), probs, coin, len(probs), complete=True)
        assert choice is not None
        return choice

    def _sample_filtered(self, probs: np.ndarray, coin: float) -> int:
        """top_k, then min_p, then top-p (without llama2.c's pre-cut) among what is left, renormalised."""
        ids = np.flatnonzero(probs > 0)
        kept = probs[ids]
        order = np.lexsort((ids, -kept))  # by probability, then id
        ids, kept = ids[order], kept[order]
        if self.top_k:
            ids, kept = ids[:self.top_k], kept[:self.top_k]
        if self.min_p:
            keep = kept >= self.min_p * kept[0]
            ids, kept = ids[keep], kept[keep]
        kept = kept / kept.sum()
        cumulative = np.cumsum(kept)
        if self.nucleus:
            last = min(int(np.searchsorted(cumulative, self.topp, side="right")), len(ids) - 1)
            ids, cumulative = ids[:last + 1], cumulative[:last + 1]
        pick = int(np.searchsorted(cumulative, coin * cumulative[-1], side="right"))
        return int(ids[min(pick, len(ids) - 1)])

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
