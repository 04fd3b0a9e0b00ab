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
from collections.abc import AsyncIterator, Callable, Collection
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
from dllama_py.api.schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest, parse_body
from dllama_py.api.service import GenerationService, Job, Outcome
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
        body: SamplingRequest, prompt_ids: list[int], max_tokens: int, stop_ids: list[int] | None
    ) -> Job:
        check_max_tokens(body, len(prompt_ids))
        temperature, top_p, seed = service.sampling(body.temperature, body.top_p, body.seed)
        return Job(
            prompt_ids,
            max_tokens,
            temperature,
            top_p,
            seed,
            [] if body.ignore_eos else stop_ids,
            body.stop_strings(),
            asyncio.get_running_loop(),
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        body: ChatCompletionRequest = check_model(parse_body(ChatCompletionRequest, await request.body()))
        tools = body.offered_tools()
        prompt_ids = await run_in_threadpool(service.encode_chat, body.template_messages(), tools)
        service.check_fits(prompt_ids, "messages")
        stop_ids = service.chat_format.stop_ids if service.chat_format else None
        job = make_job(body, prompt_ids, body.token_limit() or service.seq_len, stop_ids)
        service.submit(job)
        ids = r.ResponseIds("chatcmpl", service.model_id)
        shape = _FirstSpace(service.tokenizer.kind == KIND_SENTENCEPIECE)
        max_calls = 1 if body.parallel_tool_calls is False else None
        if body.stream:
            calls = ToolCallStream(body.tool_names()) if tools else None
            return StreamingResponse(
                _stream(job, _ChatChunks(ids, body.include_usage(), calls, max_calls), shape),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        text, outcome = await _collect(job, request, shape)
        if not tools:
            return JSONResponse(r.chat_completion(ids, text, outcome))
        parsed = parse_tool_calls(text, body.tool_names())
        return JSONResponse(r.chat_completion(ids, parsed.content, outcome, parsed.calls[:max_calls]))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        body: CompletionRequest = check_model(parse_body(CompletionRequest, await request.body()))
        prompt = body.prompt_value()
        prompt_ids = await run_in_threadpool(service.encode_prompt, prompt)
        service.check_fits(prompt_ids, "prompt")
        job = make_job(body, prompt_ids, body.token_limit(), None)
        service.submit(job)
        ids = r.ResponseIds("cmpl", service.model_id)
        echo = ""
        if body.echo:
            echo = prompt if isinstance(prompt, str) else service.tokenizer.decode(prompt_ids)
        if body.stream:
            return StreamingResponse(
                _stream(job, _TextChunks(ids, body.include_usage(), echo), lambda t: t),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        text, outcome = await _collect(job, request, lambda t: t)
        return JSONResponse(r.text_completion(ids, echo + text, outcome))

    return app


# ---- running a job --------------------------------------------------------------------------


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel `job` when the client of a non-streaming request goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


async def _collect(job: Job, request: Request, shape: Callable[[str], str]) -> tuple[str, Outcome]:
    """Wait for a job's whole text and outcome; raises its ApiError."""
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    pieces = []
    try:
        while True:
            kind, payload = await job.events.get()
            if kind == "token":
                pieces.append(shape(payload))
            elif kind == "done":
                return "".join(pieces), payload
            elif kind == "error":
                raise payload
            else:
                raise ApiError(499, "the client closed the request", code="cancelled")
    finally:
        watcher.cancel()
        job.cancel()  # a no-op once done; stops the generation if this handler is torn down early


class _Chunks(Protocol):
    """How one endpoint frames its stream: opening events, a text event, the closing events."""

    def opening(self) -> list[dict[str, Any]]: ...

    def text(self, text: str) -> list[dict[str, Any]]: ...

    def closing(self, outcome: Outcome) -> list[dict[str, Any]]: ...


class _ChatChunks:
    """Chat chunks; with `calls` (the request offered tools), text that may be a tool call is held
    back and each complete call is sent as one `delta.tool_calls` chunk (at most `max_calls`)."""

    def __init__(
        self,
        ids: r.ResponseIds,
        include_usage: bool,
        calls: ToolCallStream | None = None,
        max_calls: int | None = None,
    ) -> None:
        self.ids, self.include_usage = ids, include_usage
        self.calls, self.max_calls = calls, max_calls
        self.sent_calls = 0

    def opening(self) -> list[dict[str, Any]]:
        return [
            r.chat_chunk(self.ids, {"role": "assistant", "content": ""}, include_usage=self.include_usage)
        ]

    def text(self, text: str) -> list[dict[str, Any]]:
        if self.calls is None:
            return [r.chat_chunk(self.ids, {"content": text}, include_usage=self.include_usage)]
        return self._events(self.calls.push(text))

    def _events(self, events: list[str | ToolCall]) -> list[dict[str, Any]]:
        chunks = []
        for event in events:
            if isinstance(event, str):
                delta = {"content": event}
            elif self.max_calls is not None and self.sent_calls >= self.max_calls:
                continue  # parallel_tool_calls: false keeps the first call
            else:
                delta = r.tool_call_delta(self.sent_calls, event)
                self.sent_calls += 1
            chunks.append(r.chat_chunk(self.ids, delta, include_usage=self.include_usage))
        return chunks

    def closing(self, outcome: Outcome) -> list[dict[str, Any]]:
        chunks = self._events(self.calls.finish()) if self.calls is not None else []
        finish_reason = "tool_calls" if self.sent_calls else outcome.finish_reason
        last = r.chat_chunk(self.ids, {}, finish_reason, self.include_usage, x_dllama=outcome.timing())
        chunks.append(last)
        return chunks + [r.chat_usage_chunk(self.ids, outcome)] if self.include_usage else chunks


class _TextChunks:
    def __init__(self, ids: r.ResponseIds, include_usage: bool, echo: str) -> None:
        self.ids, self.include_usage, self.echo = ids, include_usage, echo

    def opening(self) -> list[dict[str, Any]]:
        return self.text(self.echo) if self.echo else []

    def text(self, text: str) -> list[dict[str, Any]]:
        return [r.text_chunk(self.ids, text, include_usage=self.include_usage)]

    def closing(self, outcome: Outcome) -> list[dict[str, Any]]:
        last = r.text_chunk(
            self.ids, "", outcome.finish_reason, self.include_usage, x_dllama=outcome.timing()
        )
        return [last, r.text_usage_chunk(self.ids, outcome)] if self.include_usage else [last]


async def _stream(job: Job, chunks: _Chunks, shape: Callable[[str], str]) -> AsyncIterator[str]:
    """Server-Sent Events for one job, ending with `data: [DONE]`. When the client goes away the
    server cancels this generator, and `finally` stops the generation."""
    try:
        for chunk in chunks.opening():
            yield r.sse(chunk)
        while True:
            kind, payload = await job.events.get()
            if kind == "token":
                text = shape(payload)
                if text:
                    for chunk in chunks.text(text):
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
