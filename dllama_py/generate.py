"""Prefill, decode, stop conditions, streaming and statistics, over any Engine.

The generator remembers which tokens are in the KV cache (positions 0..n-1), so a prompt that
continues the previous one (the next turn of a chat) evaluates only its new tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dllama_py.engine import Engine, EngineError, StepStats
from dllama_py.sampler import Sampler
from dllama_py.tokenizer import Tokenizer


class ContextFullError(EngineError):
    """The prompt does not fit in the context (KV cache) of the engine."""


@dataclass
class TokenEvent:
    """One generated token: its id, the text it completes (may be '' mid-character), and the
    statistics of the step that evaluated it (None for a token that was not evaluated)."""

    id: int
    text: str
    stats: StepStats | None


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


class _StopText:
    """Holds back text that may be the start of a stop string; finds complete ones."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; returns (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            at = min(i for i, _ in hits)
            out, self.pending = self.pending[:at], ""
            return out, True
        keep = 0  # longest suffix of pending that is a prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


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
                 need: str = "full") -> list[StepStats]:
        """Bring the KV cache to `ids`, evaluating only what differs from what it holds (at least
        the last token, whose logits the next token needs: `need` is 'argmax' or 'full').
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
            stats = self.engine.step(chunk, pos, need=need if last else "none")
            self.cached.extend(chunk)
            pos += len(chunk)
            steps.append(stats)
            if on_step:
                on_step(stats)
        return steps

    def sampling_need(self, sampler: Sampler) -> str:
        """What the engine must keep of the logits for this sampler (see Engine.step)."""
        if hasattr(self.engine, "configure_sampling"):  # a cluster reduces logits at the nodes
            self.engine.configure_sampling(sampler.temperature or 1.0, self.sample_vocab)
        if sampler.greedy:
            return "argmax"
        if sampler.nucleus and hasattr(self.engine, "sample"):
            return "sample"
        return "full"

    def next_token(self, sampler: Sampler, need: str = "full") -> int:
        """Sample the token that follows the last evaluated one."""
        if sampler.greedy:
            token = self.engine.argmax()
            if token < self.sample_vocab:
                return token
        if need == "sample":
            return self.engine.sample(sampler)
        logits = self.engine.logits()
        return sampler.sample(logits[: self.sample_vocab])

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
        need = self.sampling_need(sampler)
        result.prompt_steps = self.evaluate(prompt_ids, on_prompt_step, need)
        result.prompt_tokens_evaluated = sum(s.tokens for s in result.prompt_steps)
        decoder = self.tokenizer.stream_decoder()
        stop_text = _StopText(stop_strings)
        pieces: list[str] = []
        hit = False
        for i in range(max_tokens):
            if should_stop and should_stop():
                result.finish_reason = "stop"
                break
            token = self.next_token(sampler, need)
            if token in stops:
                result.finish_reason = "stop"
                break
            result.generated_ids.append(token)
            text, hit = stop_text.push(decoder.push(token))
            stats = None
            last = i == max_tokens - 1
            if not hit and not last and len(self.cached) < self.engine.seq_len:
                stats = self.engine.step([token], len(self.cached), need=need)
                self.cached.append(token)
                result.token_steps.append(stats)
            pieces.append(text)
            if on_token:
                on_token(TokenEvent(token, text, stats))
            if hit:
                result.finish_reason = "stop"
                break
            if not last and len(self.cached) >= self.engine.seq_len:
                result.finish_reason = "length"
                break
        else:
            result.finish_reason = "length"
        if not hit:  # text held back for a stop string that never completed, and partial characters
            tail = stop_text.push(decoder.flush())[0] + stop_text.flush()
            if tail:
                pieces.append(tail)
                if on_token:
                    on_token(TokenEvent(-1, tail, None))
        result.text = "".join(pieces)
        return result

