"""The one generation worker behind the HTTP API.

The engine is not thread-safe, so one thread owns it and the generator: requests wait in a
bounded FIFO queue (a full queue is a 429) and are served one at a time. Each request's
tokens travel from that thread to its async handler through an asyncio queue
(`loop.call_soon_threadsafe`). A client that goes away sets its job's `cancelled` event, which
the generator reads before every token, so the generation stops at once.

When a step fails (a worker died, a socket broke) the request ends with an error, the engine is
closed, and a background thread builds a new one with the same factory, retrying until the
workers are back; meanwhile requests get a 503 and /health says why.
"""

from __future__ import annotations

import asyncio
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
from dllama_py.engine.sampler import ConstraintError, Sampler
from dllama_py.generation.chat_session import ChatFormat
from dllama_py.generation.generator import ContextFullError, Generator, TokenEvent
from dllama_py.generation.grammar import CALL_STYLE_TAGGED, Grammar, GrammarError, Grammars
from dllama_py.text.tokenizer import Tokenizer

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
    prompt_tokens_evaluated: int  # prompt tokens not already in the KV cache
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
            "prompt_tokens_cached": self.prompt_tokens - self.prompt_tokens_evaluated,
            "queue_ms": round(self.queue_ms, 3),
            "prompt_ms": round(self.prompt_ms, 3),
            "generation_ms": round(self.generation_ms, 3),
            "tokens_per_second": round(self.completion_tokens / seconds, 3) if seconds > 0 else None,
        }


@dataclass
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
    """Owns the engine, the generator and the thread that runs them.

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
        self.generator: Generator | None = None
        self._install(engine_factory())
        self.last_error: str | None = None
        self.reconnect_attempts = 0
        self.counters = {"served": 0, "cancelled": 0, "failed": 0, "tokens_generated": 0}
        # Unbounded itself: _admitted counts the jobs queued or running, at most 1 + max_queued
        # (max_queued 0: none waits; Queue(maxsize=0) would have meant no limit at all).
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self.max_queued = max_queued
        self._admitted = 0
        self._admission = threading.Lock()
        self._running: Job | None = None
        self._closing = threading.Event()
        self._reconnecting: threading.Thread | None = None
        self._thread = threading.Thread(target=self._serve_forever, name="dllama-generation", daemon=True)
        self._thread.start()

    # ---- engine lifecycle -------------------------------------------------------------------
    def _install(self, engine: Engine) -> None:
        generator = Generator(engine, self.tokenizer, self._nbatches)
        with self._lock:
            self.engine, self.generator = engine, generator
            self.seq_len = engine.seq_len
            self.nodes = engine.info.nodes

    @property
    def available(self) -> bool:
        return self.generator is not None

    def _engine_failed(self, error: BaseException) -> None:
        """Drop the broken engine and start rebuilding it in the background."""
        with self._lock:
            engine, self.engine, self.generator = self.engine, None, None
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
            if self._admitted > self.max_queued:  # one running, max_queued waiting
                waiting = (
                    "another request is running and this server lets none wait (--max-queued 0)"
                    if self.max_queued == 0
                    else f"{self.max_queued} requests are already waiting"
                )
                raise ApiError(429, f"{waiting}; retry later", code="queue_full")
            self._admitted += 1
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
        while True:
            try:
                job = self._queue.get(timeout=IDLE_CHECK_S)
            except queue.Empty:
                self._check_idle_engine()
                continue
            if job is None:
                return
            self._running = job
            try:
                self._serve(job)
            finally:
                self._running = None
                with self._admission:
                    self._admitted -= 1

    def _serve(self, job: Job) -> None:
        if job.cancelled.is_set():
            self.counters["cancelled"] += 1
            job.emit("cancelled")
            return
        generator = self.generator
        if generator is None:
            job.emit("error", self.unavailable_error())
            self.counters["failed"] += 1
            return
        started = time.perf_counter()
        delay = self._token_delay_s
        index = 0

        def on_token(event: TokenEvent) -> None:
            if event.id >= 0:
                self.counters["tokens_generated"] += 1
            if event.text or event.logprobs:
                job.emit("token", Piece(index, event.text, [event.logprobs] if event.logprobs else []))
            if delay:
                job.cancelled.wait(delay)

        finish_reasons, completion_tokens, prompt_ms, evaluated = [], 0, 0.0, 0
        try:
            if job.prompt_logprobs is not None:
                scoring = time.perf_counter()
                job.emit("prompt_logprobs", generator.prompt_logprobs(job.prompt_ids, job.prompt_logprobs))
                prompt_ms += (time.perf_counter() - scoring) * 1e3
                evaluated = len(job.prompt_ids)
            for index in range(job.choices):
                if job.max_tokens == 0:
                    finish_reasons.append("length")
                    continue
                result = generator.generate(
                    job.prompt_ids,
                    job.max_tokens,
                    job.new_sampler(index),
                    stop_ids=job.stop_ids,
                    stop_strings=job.stop_strings,
                    on_token=on_token,
                    should_stop=job.cancelled.is_set,
                )
                finish_reasons.append(result.finish_reason)
                completion_tokens += len(result.generated_ids)
                prompt_ms += sum(s.compute_ms + s.sync_ms for s in result.prompt_steps)
                if index == 0 and job.prompt_logprobs is None:
                    evaluated = result.prompt_tokens_evaluated
                if job.cancelled.is_set():
                    break
        except ContextFullError as error:
            job.emit("error", ApiError(400, str(error), None, "context_length_exceeded"))
            self.counters["failed"] += 1
            return
        except NonFiniteLogits as error:
            # The model's output, not the engine, is broken: this request fails, the engine stays.
            # What the failed steps left in the KV cache is not reused.
            generator.reset()
            self.log(f"dllama-api: a request failed: {error}")
            self.counters["failed"] += 1
            job.emit("error", ApiError(500, str(error), code="non_finite_logits"))
            return
        except ConstraintError as error:  # a grammar that cannot go on (it allows no token here)
            generator.reset()
            self.counters["failed"] += 1
            job.emit("error", ApiError(400, f"response_format: {error}", "response_format"))
            return
        except Exception as error:  # noqa: BLE001
            # A broken engine (a worker died, a socket failed) or a bug: either way its state is
            # unknown, so it is rebuilt; the client gets the reason, the log the traceback.
            if not isinstance(error, EngineError):  # an engine's message says all; anything else is a bug
                self.log(f"dllama-api: generation failed:\n{traceback.format_exc().rstrip()}")
            self.counters["failed"] += 1
            job.emit(
                "error",
                ApiError(
                    503, f"generation failed: {error}; the model is being reloaded", code="generation_failed"
                ),
            )
            self._engine_failed(error)
            return
        if job.cancelled.is_set():
            self.counters["cancelled"] += 1
            job.emit("cancelled")
            return
        self.counters["served"] += 1
        job.emit(
            "done",
            Outcome(
                finish_reasons,
                len(job.prompt_ids),
                completion_tokens,
                evaluated,
                (started - job.submitted) * 1e3,
                prompt_ms,
                (time.perf_counter() - started) * 1e3 - prompt_ms,
            ),
        )

    # ---- status -----------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """What /health reports: whether the model is loaded and on how many nodes, the queue, counters."""
        available = self.available
        return {
            "status": "ok" if available else "unavailable",
            "model": self.model_id,
            "model_loaded": available,
            "nodes": self.nodes if available else None,
            "workers": [{"address": a, "connected": available} for a in self.workers],
            "context": self.seq_len,
            "error": None if available else self.last_error,
            "reconnect_attempts": self.reconnect_attempts,
            "queue": {
                "running": self._running is not None,
                "waiting": self._queue.qsize(),
                "max_waiting": self.max_queued,
            },
            "requests": dict(self.counters),
        }

    def close(self) -> None:
        """Cancel what runs and waits, stop the thread, close the engine."""
        self._closing.set()
        running = self._running
        if running is not None:
            running.cancel()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
        self._queue.put(None)
        self._thread.join(timeout=30)
        with self._lock:
            engine, self.engine, self.generator = self.engine, None, None
        if engine is not None:
            engine.close()
