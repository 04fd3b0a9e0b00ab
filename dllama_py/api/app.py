"""The FastAPI application: OpenAI-compatible routes, /health, and the chat page.

`create_app(service)` takes a GenerationService (which owns the engine and its thread), so the
server and tests build the same app. Every error leaves as OpenAI's error JSON.

When a chat request offers tools, its output goes through a ToolCallStream
(text/tool_calls.py): calls become `tool_calls` (streamed as `delta.tool_calls` chunks, one
per call) with finish_reason 'tool_calls'; the rest stays content.
"""

from __future__ import annotations

import asyncio
import hmac
import sys
import traceback
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from dllama_py.api import responses as r
from dllama_py.api.errors import ApiError
from dllama_py.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingRequest,
    TokenizeRequest,
    parse_body,
)
from dllama_py.api.service import GenerationService, Job, Outcome, Piece
from dllama_py.engine.engine import TokenLogprobs
from dllama_py.engine.sampler import Sampler
from dllama_py.generation.grammar import Grammar
from dllama_py.text.tokenizer import Tokenizer
from dllama_py.text.tokenizer_kind import KIND_SENTENCEPIECE
from dllama_py.text.tool_calls import ToolCall, ToolCallStream, parse_tool_calls

STATIC_DIR = Path(__file__).resolve().parent / "static"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_response(error: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status in (429, 503) else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class _FirstSpace:
    """Drops the one space a sentencepiece answer starts with (its decoder drops it too)."""

    def __init__(self, active: bool) -> None:
        self.active = active

    def __call__(self, text: str) -> str:
        if self.active and text:
            self.active = False
            return text.removeprefix(" ")
        return text


def create_app(
    service: GenerationService,
    api_key: str | None = None,
    cors_origins: list[str] | None = None,
    model_names: Collection[str] = (),
) -> FastAPI:
    """The application over `service`; with `api_key`, /v1/ routes need `Authorization: Bearer KEY`.
    A request may name the model by service.model_id or any of `model_names` (e.g. the file's stem)."""
    known_models = {service.model_id, *model_names}
    app = FastAPI(title="dllama-api", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"]
        )

    # ---- errors -----------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = {
            404: f"no route {request.method} {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}",
        }.get(error.status_code, str(error.detail))
        return error_response(ApiError(error.status_code, message))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(ApiError(400, str(error)))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception) -> JSONResponse:
        print(
            f"dllama-api: {request.method} {request.url.path} failed:\n{traceback.format_exc().rstrip()}",
            file=sys.stderr,
            flush=True,
        )
        return error_response(ApiError(500, f"internal error: {type(error).__name__}: {error}"))

    def authorize(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise ApiError(
                401, "missing API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key"
            )
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    # ---- pages and status -------------------------------------------------------------------
    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        """llama-server's /tokenize: {"content", "add_special", "with_pieces"} -> {"tokens"}."""
        authorize(request)
        body = parse_body(TokenizeRequest, await request.body())
        ids = await run_in_threadpool(service.tokenizer.encode, body.content, bool(body.add_special))
        if not body.with_pieces:
            return {"tokens": ids}
        pieces = [service.tokenizer.id_to_piece(i) for i in ids]
        return {"tokens": [{"id": i, "piece": p.decode("utf-8") if _utf8(p) else list(p)}
                           for i, p in zip(ids, pieces)]}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        """llama-server's /detokenize: {"tokens": [ids]} -> {"content"}."""
        authorize(request)
        body = parse_body(DetokenizeRequest, await request.body())
        bad = [t for t in body.tokens if not 0 <= t < service.tokenizer.vocab_size]
        if bad:
            raise ApiError(400, f"tokens: ids outside the vocabulary of {service.tokenizer.vocab_size}: {bad[:5]}",
                           "tokens")
        return {"content": service.tokenizer.decode(body.tokens)}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> dict[str, Any]:
        """This server's OpenAPI document: the request bodies exactly as they are validated."""
        return openapi_document()

    @app.get("/health")
    async def health() -> JSONResponse:
        status = service.health()
        return JSONResponse(status, status_code=200 if status["model_loaded"] else 503)

    def model_object() -> dict[str, Any]:
        return {
            "id": service.model_id,
            "object": "model",
            "created": service.created,
            "owned_by": "dllama-py",
            "context_length": service.seq_len,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [model_object()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        authorize(request)
        if model_id not in known_models:
            raise ApiError(
                404,
                f"model {model_id!r} not found; this server has {service.model_id!r}",
                "model",
                "model_not_found",
            )
        return model_object()

    # ---- generation -------------------------------------------------------------------------
    def check_model(body: Any) -> Any:
        """The request, unless it names a model this server does not have (OpenAI's 404)."""
        if body.model is not None and body.model not in known_models:
            raise ApiError(
                404,
                f"model {body.model!r} not found; this server has {service.model_id!r}",
                "model",
                "model_not_found",
            )
        return body

    def check_max_tokens(body: SamplingRequest, prompt_tokens: int) -> None:
        """A 400 for an answer longer than the whole context (a shorter one that does not fit
        after the prompt ends with finish_reason 'length' where the context does)."""
        for param in ("max_completion_tokens", "max_tokens"):
            value = getattr(body, param, None)
            if value is not None and value > service.seq_len:
                raise ApiError(
                    400,
                    f"{param}: {value} is more than the context of {service.seq_len} tokens (prompt and "
                    f"answer together); this prompt leaves room for {service.seq_len - prompt_tokens}",
                    param,
                )

    def make_job(
        body: SamplingRequest, prompt_ids: list[int], max_tokens: int, stop_ids: list[int] | None,
        grammar: Grammar | None = None, prompt_logprobs: int | None = None,
    ) -> Job:
        check_max_tokens(body, len(prompt_ids))
        temperature, top_p, seed = service.sampling(body.temperature, body.top_p, body.seed)
        options = body.sampler_options(service.tokenizer.vocab_size)
        logprobs = body.logprobs_count()

        def new_sampler(index: int) -> Sampler:  # choice i of n: its own seed and grammar state
            return Sampler(temperature, top_p, None if seed is None else seed + index, logprobs=logprobs,
                           constraint=grammar.matcher() if grammar is not None else None, **options)

        return Job(
            prompt_ids,
            max_tokens,
            new_sampler,
            [] if body.ignore_eos else stop_ids,
            body.stop_strings(),
            asyncio.get_running_loop(),
            choices=body.choices(),
            prompt_logprobs=prompt_logprobs,
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        body: ChatCompletionRequest = check_model(parse_body(ChatCompletionRequest, await request.body()))
        tools = body.offered_tools()
        prompt_ids = await run_in_threadpool(service.encode_chat, body.template_messages(), tools)
        service.check_fits(prompt_ids, "messages")
        stop_ids = service.chat_format.stop_ids if service.chat_format else None
        grammar = await run_in_threadpool(service.chat_grammar, body, list(stop_ids or service.tokenizer.eos_ids))
        if body.token_limit() == 0:
            raise ApiError(400, "max_tokens: a chat answer needs at least 1 token", "max_tokens")
        job = make_job(body, prompt_ids, body.token_limit() or service.seq_len, stop_ids, grammar)
        service.submit(job)
        ids = r.ResponseIds("chatcmpl", service.model_id)
        sentencepiece = service.tokenizer.kind == KIND_SENTENCEPIECE
        max_calls = 1 if body.parallel_tool_calls is False else None
        names = body.tool_names() if tools else None
        if body.stream:
            return StreamingResponse(
                _stream(job, _ChatChunks(ids, body.include_usage(), service.tokenizer, sentencepiece, names,
                                         max_calls)),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        answer = await _collect(job, request, sentencepiece)
        choices = []
        for index, text in enumerate(answer.texts):
            entries = r.chat_logprobs(service.tokenizer, answer.logprobs[index]) if body.logprobs else None
            reason = answer.outcome.finish_reasons[index]
            if names is None:
                choices.append(r.Choice(text, reason, logprobs=entries))
                continue
            parsed = parse_tool_calls(text, names)
            choices.append(r.Choice(parsed.content, reason, parsed.calls[:max_calls], entries))
        return JSONResponse(r.chat_completion(ids, choices, answer.outcome))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        body: CompletionRequest = check_model(parse_body(CompletionRequest, await request.body()))
        prompt = body.prompt_value()
        prompt_ids = await run_in_threadpool(service.encode_prompt, prompt)
        service.check_fits(prompt_ids, "prompt")
        scored = body.logprobs if body.echo and body.logprobs is not None else None
        job = make_job(body, prompt_ids, body.token_limit(), None, prompt_logprobs=scored)
        service.submit(job)
        ids = r.ResponseIds("cmpl", service.model_id)
        echo = ""
        if body.echo:
            echo = prompt if isinstance(prompt, str) else service.tokenizer.decode(prompt_ids)
        if body.stream:
            return StreamingResponse(
                _stream(job, _TextChunks(ids, body.include_usage(), echo, service.tokenizer,
                                         body.logprobs is not None, prompt_ids)),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        answer = await _collect(job, request, False)
        choices = []
        for index, text in enumerate(answer.texts):
            entries = None
            if body.logprobs is not None:
                generated = answer.logprobs[index]
                if body.echo:
                    tokens = prompt_ids + [e.token for e in generated]
                    entries = r.completion_logprobs(service.tokenizer, answer.prompt_scores + generated, tokens=tokens)
                else:
                    entries = r.completion_logprobs(service.tokenizer, generated)
            choices.append(r.Choice(echo + text, answer.outcome.finish_reasons[index], logprobs=entries))
        return JSONResponse(r.text_completion(ids, choices, answer.outcome))

    return app


ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
    "required": ["error"],
}


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 for the routes a client calls, the bodies from the pydantic models that parse
    them (schemas.py), every error in OpenAI's shape. Fuzzed by tests/test_fuzz_api.py."""
    components: dict[str, Any] = {"Error": ERROR_SCHEMA}

    def body(model: type) -> dict[str, Any]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        return {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}

    errors = {str(code): {"description": "an error", "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}} for code in (400, 401, 404, 429, 503)}
    ok = {"200": {"description": "the answer (JSON, or Server-Sent Events when streamed)"}}

    def post(summary: str, model: type) -> dict[str, Any]:
        return {"post": {"summary": summary, "requestBody": body(model), "responses": {**ok, **errors}}}

    def get(summary: str) -> dict[str, Any]:
        return {"get": {"summary": summary, "responses": {**ok, **errors}}}

    paths = {
        "/v1/chat/completions": post("chat", ChatCompletionRequest),
        "/v1/completions": post("completion", CompletionRequest),
        "/tokenize": post("text to token ids", TokenizeRequest),
        "/detokenize": post("token ids to text", DetokenizeRequest),
        "/v1/models": get("the model served"),
        "/v1/models/{model_id}": {"get": {
            "summary": "one model", "responses": {**ok, **errors},
            "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}]}},
        "/health": get("status"),
    }
    return {"openapi": "3.1.0", "info": {"title": "dllama-api", "version": "1"}, "paths": paths,
            "components": {"schemas": components}}


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ---- running a job --------------------------------------------------------------------------


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel `job` when the client of a non-streaming request goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


@dataclass
class _Answer:
    """A whole answer: every choice's text and token log-probabilities, the prompt's scores (echo)."""

    texts: list[str]
    logprobs: list[list[TokenLogprobs]]
    prompt_scores: list[TokenLogprobs | None]
    outcome: Outcome


async def _collect(job: Job, request: Request, sentencepiece: bool) -> _Answer:
    """Wait for a job's whole answer; raises its ApiError."""
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    texts: list[list[str]] = [[] for _ in range(job.choices)]
    logprobs: list[list[TokenLogprobs]] = [[] for _ in range(job.choices)]
    shapes = [_FirstSpace(sentencepiece) for _ in range(job.choices)]
    scores: list[TokenLogprobs | None] = []
    try:
        while True:
            kind, payload = await job.events.get()
            if kind == "token":
                texts[payload.index].append(shapes[payload.index](payload.text))
                logprobs[payload.index].extend(payload.logprobs)
            elif kind == "prompt_logprobs":
                scores = payload
            elif kind == "done":
                return _Answer(["".join(t) for t in texts], logprobs, scores, payload)
            elif kind == "error":
                raise payload
            else:
                raise ApiError(499, "the client closed the request", code="cancelled")
    finally:
        watcher.cancel()
        job.cancel()  # a no-op once done; stops the generation if this handler is torn down early


class _Chunks(Protocol):
    """How one endpoint frames its stream: opening events, the events of a piece of one choice,
    the prompt's scores (echo), the closing events."""

    def opening(self) -> list[dict[str, Any]]: ...

    def piece(self, piece: Piece) -> list[dict[str, Any]]: ...

    def prompt_scores(self, scores: list[TokenLogprobs | None]) -> list[dict[str, Any]]: ...

    def closing(self, outcome: Outcome) -> list[dict[str, Any]]: ...


class _ChatChoice:
    """The stream state of one chat choice: its leading space, tool calls, and log-probabilities
    not yet sent (of tokens whose text is held back)."""

    def __init__(self, sentencepiece: bool, names: list[str] | None) -> None:
        self.shape = _FirstSpace(sentencepiece)
        self.calls = ToolCallStream(names) if names is not None else None
        self.sent_calls = 0
        self.pending: list[TokenLogprobs] = []
        self.opened = False


class _ChatChunks:
    """Chat chunks of every choice; when the request offered tools, text that may be a tool call
    is held back and each complete call is sent as one `delta.tool_calls` chunk (at most `max_calls`)."""

    def __init__(
        self,
        ids: r.ResponseIds,
        include_usage: bool,
        tokenizer: Tokenizer,
        sentencepiece: bool,
        names: list[str] | None = None,
        max_calls: int | None = None,
    ) -> None:
        self.ids, self.include_usage, self.tokenizer = ids, include_usage, tokenizer
        self.sentencepiece, self.names, self.max_calls = sentencepiece, names, max_calls
        self.choices: dict[int, _ChatChoice] = {}

    def _choice(self, index: int) -> tuple[_ChatChoice, list[dict[str, Any]]]:
        choice = self.choices.get(index)
        if choice is None:
            choice = self.choices[index] = _ChatChoice(self.sentencepiece, self.names)
        if choice.opened:
            return choice, []
        choice.opened = True
        return choice, [self._chunk(index, {"role": "assistant", "content": ""})]

    def _chunk(self, index: int, delta: dict[str, Any], finish_reason: str | None = None,
               logprobs: list[TokenLogprobs] | None = None, **extra: Any) -> dict[str, Any]:
        entries = r.chat_logprobs(self.tokenizer, logprobs) if logprobs else None
        return r.chat_chunk(self.ids, delta, finish_reason, self.include_usage, index, entries, **extra)

    def opening(self) -> list[dict[str, Any]]:
        return self._choice(0)[1]

    def prompt_scores(self, scores: list[TokenLogprobs | None]) -> list[dict[str, Any]]:
        return []

    def piece(self, piece: Piece) -> list[dict[str, Any]]:
        choice, chunks = self._choice(piece.index)
        choice.pending.extend(piece.logprobs)
        text = choice.shape(piece.text)
        if choice.calls is None:
            if text or choice.pending:
                chunks.append(self._chunk(piece.index, {"content": text}, logprobs=choice.pending))
                choice.pending = []
            return chunks
        return chunks + self._events(piece.index, choice, choice.calls.push(text) if text else [])

    def _events(self, index: int, choice: _ChatChoice, events: list[str | ToolCall]) -> list[dict[str, Any]]:
        chunks = []
        for event in events:
            if isinstance(event, str):
                delta = {"content": event}
            elif self.max_calls is not None and choice.sent_calls >= self.max_calls:
                continue  # parallel_tool_calls: false keeps the first call
            else:
                delta = r.tool_call_delta(choice.sent_calls, event)
                choice.sent_calls += 1
            chunks.append(self._chunk(index, delta, logprobs=choice.pending))
            choice.pending = []
        return chunks

    def closing(self, outcome: Outcome) -> list[dict[str, Any]]:
        chunks = []
        for index, reason in enumerate(outcome.finish_reasons):
            choice, opening = self._choice(index)
            chunks += opening
            if choice.calls is not None:
                chunks += self._events(index, choice, choice.calls.finish())
            finish_reason = "tool_calls" if choice.sent_calls else reason
            last = index == len(outcome.finish_reasons) - 1
            extra = {"x_dllama": outcome.timing()} if last else {}
            chunks.append(self._chunk(index, {}, finish_reason, logprobs=choice.pending, **extra))
        return chunks + [r.chat_usage_chunk(self.ids, outcome)] if self.include_usage else chunks


class _TextChunks:
    def __init__(self, ids: r.ResponseIds, include_usage: bool, echo: str, tokenizer: Tokenizer,
                 logprobs: bool, prompt_ids: list[int]) -> None:
        self.ids, self.include_usage, self.echo = ids, include_usage, echo
        self.tokenizer, self.logprobs, self.prompt_ids = tokenizer, logprobs, prompt_ids
        self.echoed: set[int] = set()
        self.scores: list[TokenLogprobs | None] | None = None

    def opening(self) -> list[dict[str, Any]]:
        return []

    def prompt_scores(self, scores: list[TokenLogprobs | None]) -> list[dict[str, Any]]:
        self.scores = scores
        return []

    def _echo(self, index: int) -> list[dict[str, Any]]:
        """The prompt, first in each choice when echo is asked (with its scores)."""
        if not self.echo or index in self.echoed:
            return []
        self.echoed.add(index)
        entries = None
        if self.logprobs and self.scores is not None:
            entries = r.completion_logprobs(self.tokenizer, self.scores, tokens=self.prompt_ids)
        return [r.text_chunk(self.ids, self.echo, None, self.include_usage, index, entries)]

    def piece(self, piece: Piece) -> list[dict[str, Any]]:
        entries = r.completion_logprobs(self.tokenizer, piece.logprobs) if self.logprobs else None
        return self._echo(piece.index) + [
            r.text_chunk(self.ids, piece.text, None, self.include_usage, piece.index, entries)]

    def closing(self, outcome: Outcome) -> list[dict[str, Any]]:
        chunks = []
        for index, reason in enumerate(outcome.finish_reasons):
            chunks += self._echo(index)
            last = index == len(outcome.finish_reasons) - 1
            extra = {"x_dllama": outcome.timing()} if last else {}
            chunks.append(r.text_chunk(self.ids, "", reason, self.include_usage, index, **extra))
        return chunks + [r.text_usage_chunk(self.ids, outcome)] if self.include_usage else chunks


async def _stream(job: Job, chunks: _Chunks) -> AsyncIterator[str]:
    """Server-Sent Events for one job, ending with `data: [DONE]`. When the client goes away the
    server cancels this generator, and `finally` stops the generation."""
    try:
        for chunk in chunks.opening():
            yield r.sse(chunk)
        while True:
            kind, payload = await job.events.get()
            if kind == "token":
                for chunk in chunks.piece(payload):
                    yield r.sse(chunk)
            elif kind == "prompt_logprobs":
                for chunk in chunks.prompt_scores(payload):
                    yield r.sse(chunk)
            elif kind == "done":
                for chunk in chunks.closing(payload):
                    yield r.sse(chunk)
                break
            elif kind == "error":
                yield r.sse(payload.body())
                break
            else:
                return
        yield r.DONE_EVENT
    finally:
        job.cancel()
