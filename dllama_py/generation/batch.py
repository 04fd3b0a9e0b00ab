"""Continuous batching: many sequences generate at once, one engine step for all of them.

Each sequence has a KV-cache slot of the engine (Engine(slots=N)). Every `Batcher.step()` is one
`Engine.step_batch`: one row for every sequence that is decoding (its last token), then chunks
of the prompts still being evaluated (chunked prefill: a long prompt takes several steps, so
running streams never wait for a whole prompt), up to the engine's batch size. A sequence joins
at the next step (`start`), and leaves when it ends or its request stops it (`should_stop`),
freeing its slot at once.

Prefix cache: a slot keeps the tokens whose keys and values it holds after its sequence ends. A
new sequence goes to the free slot whose tokens share the longest prefix with its prompt (the
next turn of a chat, a shared system prompt) and evaluates only the rest. A sequence that starts
while another is evaluating the same prompt (the n choices of one request) waits for it and then
copies that slot's keys and values (`Engine.copy_slot`): a prompt is evaluated once for all.

What a sequence does with its tokens follows the same rules as `Generator.generate` (stop
tokens, stop strings, max_tokens, a full context, a finished grammar, log-probabilities), which
drives one sequence for `dllama inference` and `dllama chat` with per-step statistics; the two
loops are kept alike by tests (tests/test_batching.py's batched runs equal lone Generator runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dllama_py.engine.engine import Engine, StepStats, TokenLogprobs
from dllama_py.engine.exchange import ALL_ROWS, NO_LOGITS, NonFiniteLogits, Readout
from dllama_py.engine.sampler import ConstraintError, Sampler
from dllama_py.generation.generator import ContextFullError, GenerationResult, TokenEvent, common_prefix
from dllama_py.generation.stops import StopText
from dllama_py.text.tokenizer import Tokenizer


@dataclass
class Request:
    """One sequence to generate: its prompt, limits, sampler (its own state: seed, penalties,
    grammar) and callbacks. With `score_prompt` (a top-n count), the prompt's own
    log-probabilities go to `on_prompt_scores` first (nothing is reused from a slot then)."""

    prompt_ids: list[int]
    max_tokens: int
    sampler: Sampler
    stop_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    on_token: Callable[[TokenEvent], None] | None = None
    should_stop: Callable[[], bool] | None = None
    score_prompt: int | None = None
    on_prompt_scores: Callable[[list[TokenLogprobs | None]], None] | None = None
    on_done: Callable[[GenerationResult], None] | None = None
    on_error: Callable[[Exception], None] | None = None  # the model's output failed this sequence


@dataclass
class Running:
    """A request in its slot."""

    request: Request
    slot: int
    pending: list[int]  # prompt tokens not evaluated yet
    position: int  # where the next evaluated token goes
    result: GenerationResult
    readout: Readout
    decoder: object
    stop_text: StopText
    scores: list[TokenLogprobs | None] = field(default_factory=list)
    next_token: int | None = None  # the sampled token to evaluate next (decoding)
    leader: Running | None = None  # a sequence evaluating this one's prompt: wait, then copy its slot
    shared: int = 0  # how many of the leader's positions to copy
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None

    @property
    def decoding(self) -> bool:
        return not self.pending


class Batcher:
    """Runs the sequences of many requests in one engine's slots, a step at a time."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, nbatches: int | None = None) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self.chunk = min(nbatches or engine.max_batch, engine.max_batch)  # prompt rows per sequence per step
        self.sample_vocab = min(tokenizer.vocab_size, engine.config.vocab_size)
        self.cached: list[list[int]] = [[] for _ in range(engine.slots)]  # the tokens each slot holds
        self.running: dict[int, Running] = {}  # by slot

    @property
    def free_slots(self) -> int:
        return self.engine.slots - len(self.running)

    @property
    def active(self) -> bool:
        return bool(self.running)

    def reset(self) -> None:
        """Forget what every slot holds (after a failed step, nothing in them is trusted)."""
        self.cached = [[] for _ in range(self.engine.slots)]

    def start(self, request: Request) -> Running:
        """Give `request` a free slot (the one holding the longest prefix of its prompt); it joins
        at the next step. Raises ContextFullError for a prompt longer than the context."""
        ids = request.prompt_ids
        if not ids:
            raise ContextFullError("the prompt is empty")
        if len(ids) > self.engine.seq_len:
            raise ContextFullError(f"the prompt has {len(ids)} tokens but the context holds "
                                   f"{self.engine.seq_len} (raise --max-seq-len if the model allows)")
        free = [slot for slot in range(self.engine.slots) if slot not in self.running]
        if not free:
            raise RuntimeError("no free slot")  # the caller checks free_slots first
        if request.score_prompt is not None:
            slot, keep = free[0], 0
        else:
            slot = max(free, key=lambda s: (common_prefix(self.cached[s], ids), -len(self.cached[s])))
            keep = min(common_prefix(self.cached[slot], ids), len(ids) - 1)
        del self.cached[slot][keep:]
        leader, shared = None, 0
        if request.score_prompt is None:  # a sequence evaluating the same prompt now (the n choices of a request)
            for other in self.running.values():
                same = min(common_prefix(other.request.prompt_ids, ids), len(ids) - 1)
                if other.leader is None and other.pending and other.request.score_prompt is None and same > max(
                        keep, shared):
                    leader, shared = other, same
        sampler = request.sampler
        sampler.start(ids)
        result = GenerationResult(list(ids))
        result.prompt_tokens_evaluated = len(ids) - keep
        run = Running(request, slot, list(ids[keep:]), keep, result,
                      self.engine.readout_for(sampler, self.sample_vocab),
                      self.tokenizer.stream_decoder(), StopText(request.stop_strings),
                      scores=[None] if request.score_prompt is not None else [])
        run.leader, run.shared = leader, shared
        self.running[slot] = run
        return run

    def _follow(self) -> None:
        """Sequences waiting for a leader's prompt: copy its slot's keys and values once it holds
        the shared positions; evaluate their own prompt if the leader went before that."""
        for run in self.running.values():
            leader = run.leader
            if leader is None:
                continue
            ids, n = run.request.prompt_ids, run.shared
            held = self.cached[leader.slot]
            if len(held) >= n and held[:n] == ids[:n]:
                self.engine.copy_slot(leader.slot, run.slot, n)
                self.cached[run.slot] = list(ids[:n])
                run.position, run.pending = n, list(ids[n:])
                run.result.prompt_tokens_evaluated = len(ids) - n
                run.leader = None
            elif self.running.get(leader.slot) is not leader:  # it ended or failed first
                run.leader = None

    def step(self) -> StepStats | None:
        """One engine step for every running sequence; ends the ones that are done. None when
        nothing runs."""
        self._drop_stopped()
        if not self.running:
            return None
        self._follow()
        budget = self.engine.max_batch
        plan: list[tuple[Running, list[int], Readout, bool]] = []
        for run in self.running.values():  # decoding sequences first: one row each
            if not run.pending and run.next_token is not None and budget > 0:
                plan.append((run, [run.next_token], run.readout, False))
                budget -= 1
        for run in self.running.values():  # then prompt chunks, oldest first, while rows are left
            if run.pending and budget > 0 and run.leader is None:
                chunk = run.pending[:min(self.chunk, budget)]
                if run.request.score_prompt is not None:
                    readout = ALL_ROWS
                else:
                    readout = run.readout if len(chunk) == len(run.pending) else NO_LOGITS
                plan.append((run, chunk, readout, True))
                budget -= len(chunk)
        if not plan:
            return None
        try:
            stats = self.engine.step_batch([(run.slot, run.position, tokens, readout)
                                            for run, tokens, readout, _ in plan])
        except NonFiniteLogits as error:  # the step ran everywhere, but its logits are NaN: its sequences fail
            for run, _, _, _ in plan:
                self.cached[run.slot] = []
                self._fail(run, error)
            return None
        for index, (run, tokens, readout, prompt) in enumerate(plan):
            self.cached[run.slot].extend(tokens)
            run.position += len(tokens)
            if prompt:
                del run.pending[:len(tokens)]
                run.result.prompt_steps.append(stats)
                if run.request.score_prompt is not None:
                    self._score(run, tokens, index)
                    if run.pending:
                        continue
                    if run.request.on_prompt_scores:
                        run.request.on_prompt_scores(run.scores)
                    # later steps keep what the sampler needs; this one kept every logit of its rows
                    run.readout = self.engine.readout_for(run.request.sampler, self.sample_vocab)
                elif run.pending:
                    continue
            else:
                run.result.token_steps.append(stats)
            try:
                self._choose(run, index)
            except (NonFiniteLogits, ConstraintError) as error:  # this sequence's output: it fails, no other
                self.cached[run.slot] = []
                self._fail(run, error)
        return stats

    def _fail(self, run: Running, error: Exception) -> None:
        self.running.pop(run.slot, None)
        if run.request.on_error:
            run.request.on_error(error)

    # ---- per sequence -----------------------------------------------------------------------
    def _score(self, run: Running, tokens: list[int], index: int) -> None:
        """The log-probabilities of the prompt tokens after those of this chunk."""
        ids, n = run.request.prompt_ids, run.request.score_prompt or 0
        rows = self.engine.logits(index).reshape(len(tokens), -1)[:, :self.sample_vocab].astype(np.float64)
        top = rows.max(axis=1, keepdims=True)
        log_probs = rows - (top + np.log(np.exp(rows - top).sum(axis=1, keepdims=True)))
        start = run.position - len(tokens)
        for i in range(len(tokens)):
            if start + i + 1 < len(ids):
                row, token = log_probs[i], ids[start + i + 1]
                best = np.argsort(-row, kind="stable")[:n]
                run.scores.append(TokenLogprobs(token, float(row[token]), [(int(j), float(row[j])) for j in best]))

    def _choose(self, run: Running, index: int) -> None:
        request, sampler = run.request, run.request.sampler
        if request.should_stop and request.should_stop():
            self._finish(run, "stop")
            return
        if request.max_tokens <= len(run.result.generated_ids):
            self._finish(run, "length")
            return
        token = self.engine.next_token(sampler, index)
        if run.first_token_s is None:
            run.first_token_s = time.perf_counter() - run.started
        if token in request.stop_ids:
            self._finish(run, "stop")
            return
        logprobs = None if sampler.logprobs is None else self.engine.logprobs(token, sampler.logprobs, index)
        sampler.accept(token)
        run.result.generated_ids.append(token)
        text, hit = run.stop_text.push(run.decoder.push(token))
        complete = bool(getattr(sampler.constraint, "finished", False))
        run.result.text += text
        if request.on_token:
            request.on_token(TokenEvent(token, text, None, logprobs))
        if hit or complete:
            self._finish(run, "stop", flushed=hit)
        elif len(run.result.generated_ids) >= request.max_tokens or run.position >= self.engine.seq_len:
            self._finish(run, "length")
        else:
            run.next_token = token

    def _finish(self, run: Running, reason: str, flushed: bool = False) -> None:
        """End a sequence: the text held back for a stop string that never completed and partial
        characters go out, its slot is free (and keeps what it holds for the prefix cache)."""
        result = run.result
        result.finish_reason = reason
        if not flushed:
            tail, hit = run.stop_text.push(run.decoder.flush())
            tail += run.stop_text.flush()
            if hit:
                result.finish_reason = "stop"
            if tail:
                result.text += tail
                if run.request.on_token:
                    run.request.on_token(TokenEvent(-1, tail, None))
        self.running.pop(run.slot, None)
        if run.request.on_done:
            run.request.on_done(result)

    def _drop_stopped(self) -> None:
        for run in list(self.running.values()):
            if run.request.should_stop and run.request.should_stop():
                self._finish(run, "stop")
