"""Prefill, decode, stop conditions, streaming and statistics, over the Engine.

The generator remembers which tokens are in the KV cache (positions 0..n-1), so a prompt that
continues the previous one (the next turn of a chat) evaluates only its new tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dllama_py.engine.engine import Engine, EngineError, StepStats, TokenLogprobs
from dllama_py.engine.exchange import ALL_ROWS, FULL, NO_LOGITS, Readout
from dllama_py.engine.sampler import Sampler
from dllama_py.generation.stops import StopText
from dllama_py.text.tokenizer import Tokenizer


class ContextFullError(EngineError):
    """The prompt does not fit in the context (KV cache) of the engine."""


@dataclass
class TokenEvent:
    """One generated token: its id, the text it completes (may be '' mid-character), the
    statistics of the step that evaluated it (None for a token that was not evaluated), and its
    log-probabilities when the sampler asks for them."""

    id: int
    text: str
    stats: StepStats | None
    logprobs: TokenLogprobs | None = None


@dataclass
class GenerationResult:
    """Everything a command reports about one generation."""

    prompt_ids: list[int]
    generated_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # 'stop' (end of sequence or stop string) or 'length'
    prompt_steps: list[StepStats] = field(default_factory=list)
    token_steps: list[StepStats] = field(default_factory=list)
    prompt_tokens_evaluated: int = 0  # prompt tokens that were not already in the KV cache

    def prompt_tokens_per_second(self) -> float:
        ms = sum(s.compute_ms + s.sync_ms for s in self.prompt_steps)
        return self.prompt_tokens_evaluated / ms * 1e3 if ms > 0 else 0.0

    def generation_tokens_per_second(self) -> float:
        ms = sum(s.compute_ms + s.sync_ms for s in self.token_steps)
        return len(self.token_steps) / ms * 1e3 if ms > 0 else 0.0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Generator:
    """Drives an engine: evaluates prompts in batches and generates tokens one by one."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, nbatches: int | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.nbatches = min(nbatches or engine.max_batch, engine.max_batch)
        if self.nbatches < 1:
            raise EngineError("--nbatches must be at least 1")
        self.cached: list[int] = []  # tokens whose keys and values sit at positions 0..len-1
        self.sample_vocab = min(tokenizer.vocab_size, engine.config.vocab_size)

    def reset(self) -> None:
        """Forget the KV cache contents (the next prompt is evaluated from position 0)."""
        self.cached = []

    def evaluate(self, ids: Sequence[int], on_step: Callable[[StepStats], None] | None = None,
                 readout: Readout = FULL) -> list[StepStats]:
        """Bring the KV cache to `ids`, evaluating only what differs from what it holds (at least
        the last token, whose logits the next token needs: `readout` says what of them to keep).
        Returns the steps run."""
        if not ids:
            raise EngineError("the prompt is empty")
        if len(ids) > self.engine.seq_len:
            raise ContextFullError(f"the prompt has {len(ids)} tokens but the context holds "
                                   f"{self.engine.seq_len} (raise --max-seq-len if the model allows)")
        keep = min(common_prefix(self.cached, ids), len(ids) - 1)
        del self.cached[keep:]
        steps = []
        pos = keep
        while pos < len(ids):
            chunk = list(ids[pos:pos + self.nbatches])
            last = pos + len(chunk) >= len(ids)
            stats = self.engine.step(chunk, pos, readout if last else NO_LOGITS)
            self.cached.extend(chunk)
            pos += len(chunk)
            steps.append(stats)
            if on_step:
                on_step(stats)
        return steps

    def prompt_logprobs(self, ids: Sequence[int], top: int) -> list[TokenLogprobs | None]:
        """The log-probability of every prompt token given those before it (None for the first),
        with the `top` most likely tokens at each position: what evaluation harnesses score.
        Evaluates the whole prompt keeping every row's logits (nothing is reused from the cache)."""
        if not ids:
            raise EngineError("the prompt is empty")
        if len(ids) > self.engine.seq_len:
            raise ContextFullError(f"the prompt has {len(ids)} tokens but the context holds "
                                   f"{self.engine.seq_len} (raise --max-seq-len if the model allows)")
        self.cached = []
        out: list[TokenLogprobs | None] = [None]
        for pos in range(0, len(ids), self.nbatches):
            chunk = list(ids[pos:pos + self.nbatches])
            self.engine.step(chunk, pos, ALL_ROWS)
            self.cached.extend(chunk)
            rows = self.engine.logits().reshape(len(chunk), -1)[:, :self.sample_vocab].astype(np.float64)
            top_values = rows.max(axis=1, keepdims=True)
            log_probs = rows - (top_values + np.log(np.exp(rows - top_values).sum(axis=1, keepdims=True)))
            for i in range(len(chunk)):
                if pos + i + 1 < len(ids):
                    row = log_probs[i]
                    best = np.argsort(-row, kind="stable")[:top]
                    token = ids[pos + i + 1]
                    out.append(TokenLogprobs(token, float(row[token]), [(int(j), float(row[j])) for j in best]))
        return out

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        sampler: Sampler,
        stop_ids: Sequence[int] | None = None,
        stop_strings: Sequence[str] = (),
        on_token: Callable[[TokenEvent], None] | None = None,
        on_prompt_step: Callable[[StepStats], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Generate up to `max_tokens` tokens after `prompt_ids`.

        Stops at any id in `stop_ids` (default: the tokenizer's EOS ids; pass [] to ignore them),
        at any of `stop_strings` in the text (which is cut before it), when the context is full
        (finish_reason 'length'), or when `should_stop()` turns true (a client went away).
        """
        stops = set(self.tokenizer.eos_ids if stop_ids is None else stop_ids)
        result = GenerationResult(list(prompt_ids))
        readout = self.engine.readout_for(sampler, self.sample_vocab)
        sampler.start(prompt_ids)
        result.prompt_steps = self.evaluate(prompt_ids, on_prompt_step, readout)
        result.prompt_tokens_evaluated = sum(s.tokens for s in result.prompt_steps)
        decoder = self.tokenizer.stream_decoder()
        stop_text = StopText(stop_strings)
        pieces: list[str] = []
        hit = False
        for i in range(max_tokens):
            if should_stop and should_stop():
                result.finish_reason = "stop"
                break
            token = self.engine.next_token(sampler)
            if token in stops:
                result.finish_reason = "stop"
                break
            logprobs = None if sampler.logprobs is None else self.engine.logprobs(token, sampler.logprobs)
            sampler.accept(token)
            result.generated_ids.append(token)
            text, hit = stop_text.push(decoder.push(token))
            complete = bool(getattr(sampler.constraint, "finished", False))  # a grammar that is done ends it
            stats = None
            last = i == max_tokens - 1
            if not hit and not complete and not last and len(self.cached) < self.engine.seq_len:
                stats = self.engine.step([token], len(self.cached), readout)
                self.cached.append(token)
                result.token_steps.append(stats)
            pieces.append(text)
            if on_token:
                on_token(TokenEvent(token, text, stats, logprobs))
            if hit or complete:
                result.finish_reason = "stop"
                break
            if not last and len(self.cached) >= self.engine.seq_len:
                result.finish_reason = "length"
                break
        else:
            result.finish_reason = "length"
        if not hit:  # text held back for a stop string that never completed, and partial characters
            tail, hit = stop_text.push(decoder.flush())
            tail += stop_text.flush()
            if hit:
                result.finish_reason = "stop"
            if tail:
                pieces.append(tail)
                if on_token:
                    on_token(TokenEvent(-1, tail, None))
        result.text = "".join(pieces)
        return result

