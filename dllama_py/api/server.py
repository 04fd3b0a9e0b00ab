"""`dllama-api`: the OpenAI-compatible HTTP server and web chat, on one node or a cluster."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dllama_py.commands.options import (
    UserError,
    add_engine_arguments,
    check_port,
    check_sampling,
    check_vocab,
    log_stderr,
    make_engine,
    model_tokenizer,
)
from dllama_py.engine.engine import EngineError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dllama-api",
        description="Serve a distributed-llama model (.m + .t) over an OpenAI-compatible HTTP API "
        "(/v1/chat/completions, /v1/completions, /v1/models, /health) with a chat page at /.",
    )
    add_engine_arguments(parser)
    parser.add_argument(
        "--chat-template",
        default=None,
        choices=("llama2", "llama3", "chatml", "deepseek3", "none"),
        help="template to use when the tokenizer has none (default: the tokenizer's own)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)",
    )
    parser.add_argument("--port", type=int, default=9990, help="TCP port to listen on (default 9990)")
    parser.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1/ routes (default: $DLLAMA_API_KEY, or no key)",
    )
    parser.add_argument(
        "--model-name",
        default=None,
        metavar="NAME",
        help="model id shown by /v1/models (default: the model file's name without .m)",
    )
    parser.add_argument(
        "--alias",
        action="append",
        default=[],
        metavar="NAME",
        help="another name requests may give as 'model' (repeatable; e.g. gpt-4o-mini for a client that "
        "insists on one); any other name gets 404 model_not_found",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        metavar="X",
        help="temperature for requests that give none; 0 is greedy (default 0.8)",
    )
    parser.add_argument(
        "--topp", type=float, default=0.9, metavar="X", help="top_p for requests that give none (default 0.9)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="S",
        help="seed for requests that give none (default: a new one each request)",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=None,
        metavar="N",
        help="requests (choices) that generate at the same time, each in its own KV-cache slot; every step "
        "evaluates one token of each in one pass over the weights (default: as many as half of the RAM left "
        "after the weights holds at the context asked for, from 4 to 8, printed at start; the plan shows the "
        "memory per slot, and the context is shortened if N slots would not fit in half the free RAM)",
    )
    parser.add_argument(
        "--max-queued",
        type=int,
        default=16,
        metavar="N",
        help="requests that may wait while every slot is busy; more get 429 (default 16; 0: none waits)",
    )
    parser.add_argument(
        "--reconnect-interval",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="after a failure, how often to try reloading the model on the workers (default 3, at least 0.1)",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let web pages from ORIGIN call the API (repeatable; '*' for any)",
    )
    parser.add_argument("--access-log", action="store_true", help="log every HTTP request")
    # for tests: slow generation down so a test can act while a request is generating
    parser.add_argument("--debug-token-delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    return parser


def check_server_flags(args: argparse.Namespace) -> None:
    """The server's own flags, before anything loads; raises UserError."""
    from dllama_py.api.service import MIN_RECONNECT_INTERVAL_S
    from dllama_py.engine.engine import MAX_SLOTS

    check_port(args.port)
    check_sampling(args)
    if args.max_queued < 0:
        raise UserError(f"--max-queued must not be negative, got {args.max_queued}")
    if args.parallel is not None and not 1 <= args.parallel <= MAX_SLOTS:
        raise UserError(f"--parallel must lie in 1..{MAX_SLOTS}, got {args.parallel}")
    if not args.reconnect_interval >= MIN_RECONNECT_INTERVAL_S:  # 0 would retry in a busy loop; NaN too
        raise UserError(
            f"--reconnect-interval must be at least {MIN_RECONNECT_INTERVAL_S:g} seconds, "
            f"got {args.reconnect_interval:g}"
        )


def json_errors_h11_protocol() -> type:
    """uvicorn's h11 protocol, answering a request it cannot parse in OpenAI's JSON error shape
    instead of plain text: headers beyond h11's limit (16 KiB) get a 431, anything else a 400.
    Only the one method that writes that answer is replaced; the rest is uvicorn's."""
    from http import HTTPStatus

    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from dllama_py.api.errors import ApiError

    class JsonErrorsH11Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            error = sys.exc_info()[1]  # called from uvicorn's `except h11.RemoteProtocolError`
            status, message = 400, f"invalid HTTP request: {msg}"
            if isinstance(error, h11.RemoteProtocolError):
                status = error.error_status_hint
                message = (
                    "the request's headers are too large (at most 16 KiB)"
                    if status == 431
                    else f"invalid HTTP request: {error}"
                )
            body = json.dumps(ApiError(status, message, code="invalid_http_request").body()).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            reason = HTTPStatus(status).phrase.encode()
            for event in (h11.Response(status_code=status, headers=headers, reason=reason), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return JsonErrorsH11Protocol


def model_engine_factory(args: argparse.Namespace, tokenizer):  # -> Callable[[], Engine]
    """A function that loads the model (on the cluster when workers are given) and checks the vocabulary."""

    def factory():
        engine = make_engine(args, log_stderr)
        try:
            check_vocab(engine, tokenizer)
        except BaseException:
            engine.close()
            raise
        return engine

    return factory


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn

        from dllama_py.api.app import create_app
        from dllama_py.api.service import GenerationService
    except ImportError as error:
        print(
            f"error: {error.name} is missing; reinstall dllama-py (pip install .), which installs it",
            file=sys.stderr,
        )
        return 1
    try:
        check_server_flags(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        tokenizer = model_tokenizer(args)
        service = GenerationService(
            tokenizer,
            model_engine_factory(args, tokenizer),
            model_id=args.model_name or Path(args.model).name.removesuffix(".m").removesuffix(".gguf"),
            chat_template=args.chat_template,
            nbatches=args.nbatches,
            max_queued=args.max_queued,
            temperature=args.temperature,
            top_p=args.topp,
            seed=args.seed,
            workers=args.workers,
            reconnect_interval_s=args.reconnect_interval,
            token_delay_s=args.debug_token_delay_ms / 1e3,
            log=log_stderr,
        )
    except (UserError, EngineError, ValueError, OSError, ConnectionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    info = service.engine.info
    for note in info.notes:
        log_stderr(f"note: {note}")
    log_stderr(
        f"weights {info.weight_type}, buffer {info.buffer_type}, context {info.seq_len}, "
        f"threads {info.threads}"
    )
    if service.chat_format is None:
        log_stderr(
            f"warning: {service.chat_error}; /v1/chat/completions and the chat page will refuse requests"
        )
    api_key = args.api_key if args.api_key is not None else os.environ.get("DLLAMA_API_KEY") or None
    app = create_app(
        service, api_key=api_key, cors_origins=args.cors_origin, model_names=[Path(args.model).stem, *args.alias]
    )
    host_for_url = f"[{args.host}]" if ":" in args.host else args.host

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                log_stderr(
                    f"dllama-api: serving {service.model_id} on {service.nodes} node(s) at "
                    f"http://{host_for_url}:{args.port} (chat page /, API /v1)"
                )

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        access_log=args.access_log,
        timeout_graceful_shutdown=5,
        http=json_errors_h11_protocol(),
    )
    server = Server(config)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C / SIGINT after its graceful shutdown
        pass
    except SystemExit:  # uvicorn exits when it cannot start (it has logged why)
        pass
    finally:
        service.close()
    if not server.started:  # uvicorn has logged why (e.g. the port is in use)
        print(f"error: dllama-api could not listen on {args.host}:{args.port}", file=sys.stderr)
        return 1
    log_stderr("dllama-api: stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
