"""The one generation thread behind the HTTP API.

The engine is not thread-safe, so one thread owns it and its batcher (generation/batch.py):
every choice of every request is a sequence in a KV-cache slot of the engine (`--parallel N`
slots), and each engine step evaluates one token of every decoding sequence and chunks of new
prompts together (continuous batching). Requests beyond the free slots wait in a bounded FIFO
queue (a full queue is a 429) and join as slots free up. Each request's tokens travel from that
thread to its async handler through an asyncio queue (`loop.call_soon_threadsafe`). A client
that goes away sets its job's `cancelled` event, which the batcher reads before every step, so
its sequences stop and free their slots at once.

When a step fails (a worker died, a socket broke) the request ends with an error, the engine is
closed, and a background thread builds a new one with the same factory, retrying until the
workers are back; meanwhile requests get a 503 and /health says why.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError

from dllama_py.api.errors import ApiError
from dllama_py.engine.engine import Engine, EngineError, TokenLogprobs
from dllama_py.engine.exchange import NonFiniteLogits
from dllama_py.engine.sampler import Sampler
from dllama_py.generation.batch import Batcher, Request
from dllama_py.generation.chat_session import ChatFormat
from dllama_py.generation.generator import ContextFullError, GenerationResult, TokenEvent
from dllama_py.generation.grammar import CALL_STYLE_TAGGED, Grammar, GrammarError, Grammars
from dllama_py.text.tokenizer import Tokenizer

CLOSE = object()  # put on the queue to end the generation thread
IDLE_CHECK_S = 2.0  # how often an idle server checks that its workers are still there
MIN_RECONNECT_INTERVAL_S = 0.1  # a shorter interval would spin, logging every attempt


@dataclass
class Piece:
    """Text of choice `index` (may be '' mid-character), with the log-probabilities of the tokens
    that made it when the request asked for them."""

    index: int
    text: str
    logprobs: list[TokenLogprobs] = field(default_factory=list)


@dataclass
class Outcome:
    """How a request's generations ended (one finish reason per choice: 'stop' or 'length'), with
    the counts `usage` reports and timings."""

    finish_reasons: list[str]
    prompt_tokens: int
    completion_tokens: int  # of every choice together
    prompt_tokens_evaluated: int  # prompt tokens not already in the KV cache, of every choice together
    queue_ms: float
    prompt_ms: float
    generation_ms: float

    @property
    def finish_reason(self) -> str:
        return self.finish_reasons[0]

    def timing(self) -> dict[str, Any]:
        """The non-standard `x_dllama` object of a response."""
        seconds = self.generation_ms / 1e3
        return {
            "prompt_tokens_evaluated": self.prompt_tokens_evaluated,
            "prompt_tokens_cached": self.prompt_tokens * len(self.finish_reasons) - self.prompt_tokens_evaluated,
            "queue_ms": round(self.queue_ms, 3),
            "prompt_ms": round(self.prompt_ms, 3),
            "generation_ms": round(self.generation_ms, 3),
            "tokens_per_second": round(self.completion_tokens / seconds, 3) if seconds > 0 else None,
        }


@dataclass(eq=False)  # a job is itself, hashable by identity
class Job:
    """One request for the generation thread, and the channel its events come back on.
    `new_sampler(i)` makes the sampler of choice i (its seed, penalties, grammar: the state of
    one sequence); the `choices` generations run one after the other after one prompt evaluation.
    With `prompt_logprobs` (echo), the prompt's own log-probabilities come first."""

    prompt_ids: list[int]
    max_tokens: int
    new_sampler: Callable[[int], Sampler]
    stop_ids: list[int] | None  # None: the tokenizer's end-of-sequence ids
    stop_strings: list[str]
    loop: asyncio.AbstractEventLoop
    choices: int = 1
    prompt_logprobs: int | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    # kept by the generation thread
    started: float | None = None
    first_token: float | None = None
    next_choice: int = 0  # choices not started yet: next_choice..choices-1
    live: int = 0  # its sequences in the batcher now
    results: dict[int, GenerationResult] = field(default_factory=dict)
    failed: bool = False  # an error went out; the job ends when none of its sequences runs
    ended: bool = False

    def cancel(self) -> None:
        """Stop this job's generation (or skip it if it has not started)."""
        self.cancelled.set()

    def emit(self, kind: str, payload: Any = None) -> None:
        """From the generation thread: hand an event to the request's handler. Kinds:
        'prompt_logprobs' (a list, first), 'token' (a Piece), then one of 'done' (Outcome),
        'error' (ApiError), 'cancelled'."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.cancelled.set()


class GenerationService:
    """Owns the engine, its batcher and the thread that runs them.

    engine_factory builds an Engine (on one node or a cluster); it is called once here
    (errors propagate) and again after a failure, in the background, until it succeeds.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        engine_factory: Callable[[], Engine],
        *,
        model_id: str,
        chat_template: str | None = None,
        nbatches: int | None = None,
        max_queued: int = 16,
        temperature: float = 0.8,
        top_p: float = 0.9,
        seed: int | None = None,
        workers: Sequence[str] = (),
        reconnect_interval_s: float = 3.0,
        token_delay_s: float = 0.0,
        log: Callable[[str], None] = print,
    ) -> None:
        if max_queued < 0:
            raise ValueError(f"max_queued must not be negative, got {max_queued}")
        if not reconnect_interval_s >= MIN_RECONNECT_INTERVAL_S:  # also refuses NaN
            raise ValueError(
                f"the reconnect interval must be at least {MIN_RECONNECT_INTERVAL_S:g} s, got {reconnect_interval_s:g}"
            )
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.created = int(time.time())
        self.workers = list(workers)
        self.defaults = {"temperature": temperature, "top_p": top_p, "seed": seed}
        self.log = log
        self._engine_factory = engine_factory
        self._nbatches = nbatches
        self._reconnect_interval_s = reconnect_interval_s
        self._token_delay_s = token_delay_s
        try:
            self.chat_format: ChatFormat | None = ChatFormat(tokenizer, chat_template)
            self.chat_error = ""
        except ValueError as error:
            self.chat_format, self.chat_error = None, str(error)
        self.grammars = Grammars(tokenizer)
        self._lock = threading.Lock()
        self.engine: Engine | None = None
        self.batcher: Batcher | None = None
        self._install(engine_factory())
        self.last_error: str | None = None
        self.reconnect_attempts = 0
        self.counters = {"served": 0, "cancelled": 0, "failed": 0, "tokens_generated": 0}
        # Unbounded itself: _admitted counts the jobs queued or running, at most slots + max_queued
        # (max_queued 0: none waits; Queue(maxsize=0) would have meant no limit at all).
        self._queue: queue.Queue[Job | object] = queue.Queue()
        self.max_queued = max_queued
        self._admitted = 0
        self._admission = threading.Lock()
        self._jobs: set[Job] = set()  # admitted and not ended (for close)
        self._waiting_count = 0  # jobs with choices not started yet (for /health)
        self._closing = threading.Event()
        self._reconnecting: threading.Thread | None = None
        self._last_rejoin = 0.0  # when the idle loop last asked lost workers to come back
        self._thread = threading.Thread(target=self._serve_forever, name="dllama-generation", daemon=True)
        self._thread.start()

    # ---- engine lifecycle -------------------------------------------------------------------
    def _install(self, engine: Engine) -> None:
        batcher = Batcher(engine, self.tokenizer, self._nbatches)
        with self._lock:
            self.engine, self.batcher = engine, batcher
            self.seq_len = engine.seq_len
            self.nodes = engine.info.nodes
            self.slots = engine.slots

    @property
    def available(self) -> bool:
        return self.batcher is not None

    def _engine_failed(self, error: BaseException) -> None:
        """Drop the broken engine and start rebuilding it in the background."""
        with self._lock:
            engine, self.engine, self.batcher = self.engine, None, None
            self.last_error = str(error)
        self.log(
            f"dllama-api: the model failed: {error}; reconnecting every {self._reconnect_interval_s:g} s"
        )
        if engine is not None:
            try:
                engine.close()
            except Exception as close_error:  # noqa: BLE001 - a broken cluster may fail to close cleanly too
                self.log(f"dllama-api: closing the failed engine: {close_error}")
        self._reconnecting = threading.Thread(target=self._reconnect, name="dllama-reconnect", daemon=True)
        self._reconnecting.start()

    def _reconnect(self) -> None:
        while not self._closing.is_set():
            self.reconnect_attempts += 1
            try:
                engine = self._engine_factory()
            except Exception as error:  # noqa: BLE001 - whatever stops the load, try again later
                self.last_error = f"reconnecting (attempt {self.reconnect_attempts}): {error}"
                self.log(f"dllama-api: {self.last_error}; retrying in {self._reconnect_interval_s:g} s")
                self._closing.wait(self._reconnect_interval_s)
                continue
            if self._closing.is_set():
                engine.close()
                return
            self._install(engine)
            self.last_error = None
            self.log(f"dllama-api: the model is back after {self.reconnect_attempts} attempt(s)")
            return

    def _check_idle_engine(self) -> None:
        """While idle, notice workers that went away, so /health tells before a request fails."""
        engine = self.engine
        if engine is None:
            return
        try:
            engine.check_alive()
            now = time.monotonic()
            if engine.lost and now - self._last_rejoin >= self._reconnect_interval_s:
                self._last_rejoin = now
                engine.rejoin()  # lost workers that answer again come back now, while nothing runs
        except EngineError as error:
            self._engine_failed(error)

    # ---- requests ---------------------------------------------------------------------------
    def unavailable_error(self) -> ApiError:
        return ApiError(
            503,
            f"the model is unavailable: {self.last_error or 'starting'}; retry shortly",
            code="model_unavailable",
        )

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Prompt ids of a conversation, ending with the assistant's turn, `tools` offered to the
        model (by its template, or by a system prompt when the template has no place for them)."""
        if self.chat_format is None:
            raise ApiError(
                400,
                f"chat is not available: {self.chat_error}; use /v1/completions or restart "
                "dllama-api with --chat-template",
                "messages",
                "no_chat_template",
            )
        try:
            return self.chat_format.encode(messages, tools=tools)
        except (
            TemplateError,
            ValueError,
        ) as error:  # the template may refuse a conversation (raise_exception)
            raise ApiError(
                400, f"messages: the chat template refused this conversation: {error}", "messages"
            ) from None

    def chat_grammar(self, body: Any, stop_ids: list[int]) -> Grammar | None:
        """The grammar a chat request's answer must follow: its response_format's JSON schema, or
        a call of the tools it forces (tool_choice 'required' or a named function); None when free.
        A 400 naming the field when the schema cannot be compiled."""
        schema = body.output_format()
        forced = body.forced_tools()
        try:
            if schema is not None:
                return self.grammars.json_schema(schema, stop_ids)
            if forced is not None:
                style = self.chat_format.call_style if self.chat_format else CALL_STYLE_TAGGED
                return self.grammars.tool_calls(forced, style, stop_ids, parallel=body.parallel_tool_calls is not False)
        except GrammarError as error:
            raise ApiError(400, f"{'response_format' if schema is not None else 'tools'}: {error}",
                           "response_format" if schema is not None else "tools") from None
        return None

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Prompt ids of a completion prompt: text (with BOS if the tokenizer asks) or token ids."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_bos=self.tokenizer.add_bos)
        limit = self.tokenizer.vocab_size
        bad = [t for t in prompt if not 0 <= t < limit]
        if bad:
            raise ApiError(400, f"prompt: token ids outside the vocabulary of {limit}: {bad[:5]}", "prompt")
        return list(prompt)

    def check_fits(self, ids: list[int], param: str) -> None:
        """A 400 unless the prompt leaves room for at least one generated token."""
        if not ids:
            raise ApiError(400, f"{param}: the prompt is empty", param)
        if len(ids) >= self.seq_len:
            raise ApiError(
                400,
                f"{param}: the prompt has {len(ids)} tokens but the context holds {self.seq_len}; "
                "shorten it, or restart dllama-api with a larger --max-seq-len if the model allows",
                param,
                "context_length_exceeded",
            )

    def submit(self, job: Job) -> None:
        """Queue a job; raises a 503 ApiError while the model is unavailable, a 429 when the queue is full."""
        if self._closing.is_set():
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        if not self.available:
            raise self.unavailable_error()
        with self._admission:
            if self._admitted >= self.slots + self.max_queued:  # every slot busy, max_queued waiting
                waiting = (
                    f"all {self.slots} slots are busy and this server lets none wait (--max-queued 0)"
                    if self.max_queued == 0
                    else f"{self.max_queued} requests are already waiting"
                )
                raise ApiError(429, f"{waiting}; retry later", code="queue_full")
            self._admitted += 1
            self._jobs.add(job)
        self._queue.put_nowait(job)

    def sampling(
        self, temperature: float | None, top_p: float | None, seed: int | None
    ) -> tuple[float, float, int | None]:
        """A request's sampling settings, the server's defaults where it gives none."""
        temperature = self.defaults["temperature"] if temperature is None else temperature
        top_p = self.defaults["top_p"] if top_p is None else top_p
        if top_p == 0:  # keeps only the most likely token
            temperature = 0.0
        return temperature, top_p, self.defaults["seed"] if seed is None else seed

    # ---- the generation thread --------------------------------------------------------------
    def _serve_forever(self) -> None:
        waiting: collections.deque[Job] = collections.deque()  # admitted, not every choice started yet
        while True:
            batcher = self.batcher
            busy = batcher is not None and batcher.active
            try:
                job = self._queue.get(timeout=IDLE_CHECK_S) if not busy and not waiting else self._queue.get_nowait()
            except queue.Empty:
                if not busy and not waiting:
                    self._check_idle_engine()
                    continue
                job = None
            if job is CLOSE:
                return
            if job is not None:
                waiting.append(job)
                continue  # take every queued job before the next step
            self._start_waiting(waiting)
            self._waiting_count = len(waiting)
            if batcher is not None and batcher.active:
                self._step(batcher)

    def _start_waiting(self, waiting: collections.deque[Job]) -> None:
        """Start the choices of the oldest jobs while slots are free (a job's choices start
        before the next job's)."""
        while waiting:
            job, batcher = waiting[0], self.batcher
            if job.cancelled.is_set() or job.failed or job.next_choice >= job.choices:
                waiting.popleft()
                self._check(job)
                continue
            if batcher is None:
                self._fail(job, self.unavailable_error())
                continue
            if not batcher.free_slots:
                return
            index = job.next_choice
            job.next_choice += 1
            if job.started is None:
                job.started = time.perf_counter()
            if job.max_tokens == 0 and not (index == 0 and job.prompt_logprobs is not None):
                job.results[index] = GenerationResult(list(job.prompt_ids), finish_reason="length")
                continue
            try:
                batcher.start(self._request(job, index))
            except ContextFullError as error:
                self._fail(job, ApiError(400, str(error), None, "context_length_exceeded"))
                continue
            job.live += 1

    def _request(self, job: Job, index: int) -> Request:
        """Choice `index` of `job` as the batcher's request, its events going to the job."""
        delay = self._token_delay_s

        def on_token(event: TokenEvent) -> None:
            if event.id >= 0:
                self.counters["tokens_generated"] += 1
                if job.first_token is None:
                    job.first_token = time.perf_counter()
            if event.text or event.logprobs:
                job.emit("token", Piece(index, event.text, [event.logprobs] if event.logprobs else []))
            if delay:
                job.cancelled.wait(delay)

        def on_done(result: GenerationResult) -> None:
            job.live -= 1
            job.results[index] = result
            self._check(job)

        def on_error(error: Exception) -> None:
            job.live -= 1
            if isinstance(error, NonFiniteLogits):
                # The model's output, not the engine, is broken: this request fails, the engine stays.
                self.log(f"dllama-api: a request failed: {error}")
                self._fail(job, ApiError(500, str(error), code="non_finite_logits"))
            elif isinstance(error, ApiError):
                self._fail(job, error)
            else:  # a grammar that cannot go on
                self._fail(job, ApiError(400, f"response_format: {error}", "response_format"))

        return Request(
            job.prompt_ids, job.max_tokens, job.new_sampler(index),
            stop_ids=list(self.tokenizer.eos_ids if job.stop_ids is None else job.stop_ids),
            stop_strings=job.stop_strings, on_token=on_token, should_stop=job.cancelled.is_set,
            score_prompt=job.prompt_logprobs if index == 0 else None,
            on_prompt_scores=lambda scores: job.emit("prompt_logprobs", scores),
            on_done=on_done, on_error=on_error)

    def _fail(self, job: Job, error: ApiError) -> None:
        """The job's answer is this error (the first one only); its other sequences stop."""
        if not job.failed:
            job.failed = True
            self.counters["failed"] += 1
            job.emit("error", error)
        job.cancel()
        self._check(job)

    def _check(self, job: Job) -> None:
        """End the job once none of its sequences runs and none is left to start (or it failed or
        was cancelled): its outcome goes out once and it leaves admission."""
        if job.ended or job.live > 0:
            return
        finished = job.next_choice >= job.choices and len(job.results) == job.choices
        if not (finished or job.failed or job.cancelled.is_set()):
            return
        job.ended = True
        with self._admission:
            self._admitted -= 1
            self._jobs.discard(job)
        if job.failed:
            return
        if job.cancelled.is_set():
            self.counters["cancelled"] += 1
            job.emit("cancelled")
            return
        self.counters["served"] += 1
        results = [job.results[i] for i in range(job.choices)]
        now = time.perf_counter()
        started = job.started or now
        prompt_ms = ((job.first_token or now) - started) * 1e3
        job.emit("done", Outcome(
            [r.finish_reason for r in results],
            len(job.prompt_ids),
            sum(len(r.generated_ids) for r in results),
            sum(r.prompt_tokens_evaluated for r in results),  # n choices share the prompt's evaluation
            (started - job.submitted) * 1e3,
            prompt_ms,
            (now - started) * 1e3 - prompt_ms,
        ))

    def _step(self, batcher: Batcher) -> None:
        """One batched step; a broken engine fails every running request and is rebuilt."""
        try:
            batcher.step()
        except Exception as error:  # noqa: BLE001
            # A broken engine (a worker died, a socket failed) or a bug: either way its state is
            # unknown, so it is rebuilt; the clients get the reason, the log the traceback.
            if not isinstance(error, EngineError):  # an engine's message says all; anything else is a bug
                self.log(f"dllama-api: generation failed:\n{traceback.format_exc().rstrip()}")
            failure = ApiError(503, f"generation failed: {error}; the model is being reloaded",
                               code="generation_failed")
            runs = list(batcher.running.values())
            batcher.running.clear()
            for run in runs:
                if run.request.on_error is not None:
                    run.request.on_error(failure)
            self._engine_failed(error)

    # ---- status -----------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """What /health reports: whether the model is loaded and on how many nodes, the slots, the
        queue, counters."""
        available = self.available
        batcher = self.batcher
        engine = self.engine
        in_use = len(batcher.running) if batcher is not None else 0
        lost = list(engine.lost) if engine is not None else []
        return {
            "status": "ok" if available else "unavailable",
            "model": self.model_id,
            "model_loaded": available,
            "nodes": engine.plan.n_nodes if available and engine is not None else None,
            "workers": [{"address": a, "connected": available and a not in lost} for a in self.workers],
            "lost_workers": lost,
            "context": self.seq_len,
            "error": None if available else self.last_error,
            "reconnect_attempts": self.reconnect_attempts,
            "slots": {"total": self.slots, "in_use": in_use, "free": self.slots - in_use},
            "queue": {
                "running": in_use > 0,
                "waiting": self._queue.qsize() + self._waiting_count,
                "max_waiting": self.max_queued,
            },
            "requests": dict(self.counters),
        }

    def close(self) -> None:
        """Cancel what runs and waits, stop the thread, close the engine."""
        self._closing.set()
        with self._admission:
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel()
        self._queue.put(CLOSE)
        self._thread.join(timeout=30)
        with self._lock:
            engine, self.engine, self.batcher = self.engine, None, None
        if engine is not None:
            engine.close()
