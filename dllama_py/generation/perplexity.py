"""Perplexity over a text, computed the way llama.cpp's `llama-perplexity` does.

The text is tokenized once (BOS first when the tokenizer adds one) and cut into consecutive
windows of `ctx` tokens; the tokens after the last whole window are left out. Each window is
evaluated from position 0 with its first token replaced by BOS (when the tokenizer adds BOS),
and only its second half is scored: the logits at positions ctx/2 .. ctx-2 predict the tokens
at ctx/2+1 .. ctx-1, so every scored token has at least ctx/2 tokens of context. After window k
the running estimate is exp(mean negative log-likelihood so far), printed `[k]value`; the final
estimate comes with the standard error exp(mean) * sqrt(var / (count - 1)) of llama.cpp.
Reference: llama.cpp tools/perplexity/perplexity.cpp, `perplexity()`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dllama_py.engine.engine import Engine, EngineError
from dllama_py.engine.exchange import ALL_ROWS, NO_LOGITS
from dllama_py.text.tokenizer import Tokenizer

MIN_CTX = 8  # the smallest even window that scores more than two tokens (a standard error needs two)


@dataclass
class PerplexityResult:
    """What one perplexity run measured.

    ctx: tokens per window; text_tokens: tokens of the whole text (BOS included);
    running: the estimate after each window (llama.cpp's `[1]x,[2]y,...`);
    token_nll: float64 (windows * (ctx/2 - 1),) negative log-likelihood of every scored token,
    window by window; perplexity: exp(mean of token_nll); standard_error: its standard error.
    """

    ctx: int
    text_tokens: int
    running: list[float] = field(default_factory=list)
    token_nll: np.ndarray = field(default_factory=lambda: np.zeros(0))
    perplexity: float = math.nan
    standard_error: float = math.nan

    @property
    def windows(self) -> int:
        return len(self.running)

    @property
    def scored_tokens(self) -> int:
        return int(self.token_nll.size)


def tokenize_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """The text's token ids as llama.cpp's perplexity tokenizes it: BOS first when the tokenizer
    adds one, special-token strings taken as plain text."""
    return tokenizer.encode(text, add_bos=tokenizer.add_bos, parse_special=False)


def window_bos(tokenizer: Tokenizer) -> int | None:
    """The id that replaces every window's first token (the BOS id when the tokenizer adds BOS), or None."""
    return tokenizer.bos_id if tokenizer.add_bos else None


def check_ctx(ctx: int) -> None:
    """Refuse a window size perplexity cannot use: odd, or below MIN_CTX."""
    if ctx < MIN_CTX or ctx % 2:
        raise ValueError(f"the window must be an even number of at least {MIN_CTX} tokens, got {ctx}")


def window_count(n_tokens: int, ctx: int) -> int:
    """Whole windows of `ctx` tokens in `n_tokens` (the rest is not scored)."""
    return n_tokens // ctx


def scored_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] of every row, in float64.

    logits: (rows, vocab) float32; targets: (rows,) int ids. Returns (rows,) float64."""
    rows = logits.astype(np.float64)
    top = rows.max(axis=1)  # (rows,)
    log_norm = top + np.log(np.exp(rows - top[:, None]).sum(axis=1))  # (rows,)
    return log_norm - rows[np.arange(len(targets)), targets]


def estimate(token_nll: np.ndarray) -> tuple[float, float]:
    """(perplexity, standard error) of float64 negative log-likelihoods, as llama.cpp's final
    estimate: ppl = exp(mean), error = ppl * sqrt((mean(nll^2) - mean^2) / (count - 1))."""
    count = token_nll.size
    if count == 0:
        raise ValueError("no token was scored")
    mean = float(token_nll.mean())
    ppl = math.exp(mean)
    if count < 2:
        return ppl, math.nan
    variance = float(np.mean((token_nll - mean) ** 2))  # mean(nll^2) - mean^2, without the cancellation
    return ppl, ppl * math.sqrt(variance / (count - 1))


def window_nll(engine: Engine, window: Sequence[int], nbatches: int) -> np.ndarray:
    """Evaluate one window from position 0 in batches of `nbatches` tokens and return the float64
    negative log-likelihoods of its tokens ctx/2+1 .. ctx-1 (ctx = len(window)), each predicted
    from the logits one position earlier. Batches wholly before ctx/2 keep no logits."""
    ctx = len(window)
    first = ctx // 2
    parts = []
    for pos in range(0, ctx, nbatches):
        chunk = list(window[pos:pos + nbatches])
        end = pos + len(chunk)
        if end <= first:
            engine.step(chunk, pos, NO_LOGITS)
            continue
        engine.step(chunk, pos, ALL_ROWS)
        logits = engine.logits().reshape(len(chunk), -1)  # (rows, vocab) float32
        lo, hi = max(first, pos), min(end, ctx - 1)  # positions whose next token is in the window
        if lo < hi:
            targets = np.asarray(window[lo + 1:hi + 1], dtype=np.int64)
            parts.append(scored_nll(logits[lo - pos:hi - pos], targets))
    return np.concatenate(parts)


def perplexity(engine: Engine, ids: Sequence[int], ctx: int, bos_id: int | None, nbatches: int | None = None,
               on_window: Callable[[int, float], None] | None = None) -> PerplexityResult:
    """Perplexity of `engine`'s model over the token ids `ids` (tokenize_text's), in windows of
    `ctx` tokens whose first token becomes `bos_id` (None: kept), evaluated in batches of
    `nbatches` tokens (default: the engine's largest). `on_window(k, running)` is called after
    window k (1-based) with the running estimate. Raises ValueError when `ctx` is unusable or
    `ids` hold less than one window, EngineError when the engine's context is shorter than `ctx`."""
    check_ctx(ctx)
    windows = window_count(len(ids), ctx)
    if windows == 0:
        raise ValueError(f"the text has {len(ids)} tokens but one window of --ctx {ctx} needs {ctx}")
    if engine.seq_len < ctx:
        raise EngineError(f"the engine's context holds {engine.seq_len} tokens, less than the window of {ctx}")
    batch = min(nbatches or engine.max_batch, engine.max_batch)
    if batch < 1:
        raise EngineError("--nbatches must be at least 1")
    result = PerplexityResult(ctx, len(ids))
    parts: list[np.ndarray] = []
    nll_sum, count = 0.0, 0
    for k in range(windows):
        window = list(ids[k * ctx:(k + 1) * ctx])
        if bos_id is not None:
            window[0] = bos_id
        nll = window_nll(engine, window, batch)
        parts.append(nll)
        nll_sum += float(nll.sum())
        count += nll.size
        result.running.append(math.exp(nll_sum / count))
        if on_window is not None:
            on_window(k + 1, result.running[-1])
    result.token_nll = np.concatenate(parts)
    result.perplexity, result.standard_error = estimate(result.token_nll)
    return result
