"""The `dllama` command: inference, chat, worker and demo modes."""

from __future__ import annotations

import argparse
import json
import os
import sys

from dllama_py import __version__
from dllama_py.commands.options import (
    UserError,
    add_engine_arguments,
    add_sampling_arguments,
    check_port,
    check_sampling,
    check_threads,
    check_vocab,
    log_stderr,
    make_engine,
    model_tokenizer,
)

STATS_PROMPT = "🔷️ Eval{compute:5.0f} ms Sync{sync:5.0f} ms | Sent{sent:6d} kB Recv{recv:6d} kB | ({tokens} tokens)"
STATS_TOKEN = "🔶 Pred{compute:5.0f} ms Sync{sync:5.0f} ms | Sent{sent:6d} kB Recv{recv:6d} kB | {piece}"


def version_text() -> str:
    """Package version, SIMD paths compiled in, the path this CPU uses and the default threads."""
    from dllama_py.model import kernels

    return (
        f"dllama-py {__version__}\n"
        f"SIMD paths compiled in: {', '.join(kernels.compiled_isas())}\n"
        f"SIMD paths this CPU runs: {', '.join(kernels.supported_isas())}\n"
        f"SIMD path in use: {kernels.get_isa()} (force one with DLLAMA_ISA)\n"
        f"default threads: {kernels.hardware_threads()}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dllama",
        description="Run a distributed-llama model (.m + .t files) on one computer or a cluster of them.",
    )
    parser.add_argument("--version", action="store_true", help="print version, SIMD paths and default threads")
    sub = parser.add_subparsers(dest="mode", metavar="MODE")

    inf = sub.add_parser("inference", help="generate text from a prompt and print statistics",
                         description="Generate text from a prompt; text goes to stdout, statistics to stderr.")
    add_engine_arguments(inf)
    add_sampling_arguments(inf)
    prompt = inf.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="P", help="the prompt text")
    prompt.add_argument("--prompt-ids", metavar="IDS", help="the prompt as comma-separated token ids, e.g. 1,403,407")
    inf.add_argument("--steps", type=int, required=True, metavar="N", help="number of tokens to generate")
    inf.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens")
    inf.add_argument("--json", action="store_true",
                     help="print JSON lines instead of text: prompt ids, one object per token, statistics")
    inf.add_argument("--verbose", action="store_true",
                     help="also print one line per prompt batch and per generated token (time, sync, traffic) "
                          "to stderr; without it only the summary follows the text")

    chat = sub.add_parser("chat", help="interactive multi-turn chat in the terminal",
                          description="Chat with the model; an empty line or end of input quits.")
    add_engine_arguments(chat)
    add_sampling_arguments(chat)
    chat.add_argument("--chat-template", default=None,
                      choices=("llama2", "llama3", "chatml", "deepseek3", "none"),
                      help="template to use when the tokenizer has none (default: the tokenizer's own)")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--max-tokens", type=int, default=1024, metavar="N", help="longest answer (default 1024)")

    worker = sub.add_parser("worker", help="serve as a worker node of a cluster",
                            description="Wait for a root, receive its plan and weight slices, follow its steps; "
                                        "when the root goes away, free everything and wait for the next. "
                                        "$DLLAMA_NET_SPIN_US sets how long a sync busy-waits for the other "
                                        "nodes before it sleeps (default 200 microseconds; 0 when this "
                                        "computer's cores are busy with other work).")
    worker.add_argument("--port", type=int, default=9998, help="TCP port to listen on (default 9998)")
    worker.add_argument("--host", default="0.0.0.0",
                        help="address to listen on (default 0.0.0.0, every IPv4 address; :: for IPv6)")
    worker.add_argument("--nthreads", type=int, default=None, metavar="K", help="compute threads (default: all cores)")
    worker.add_argument("--secret", default=None,
                        help="shared secret a root must know (default: $DLLAMA_SECRET)")
    worker.add_argument("--once", action="store_true", help="exit after serving one root (for scripts)")
    worker.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="keep the weight slices received in DIR and read them back when a root runs the "
                             "same model on the same plan again, instead of receiving them over the network "
                             "(worth it when the disk reads faster than the network; entries are folders "
                             "you may delete at any time; the oldest go first when the disk would keep "
                             "less than 5%% free)")
    worker.add_argument("--model-dir", default=None, metavar="DIR",
                        help="a folder of model files (.m, .gguf): when a root runs a model that is in DIR "
                             "(the same fingerprint: config, file size and samples of every tensor), this "
                             "worker reads its slices from its own copy and the root ships it nothing; "
                             "otherwise they are shipped as usual (and --cache-dir applies). Files are "
                             "fingerprinted at start and again only when they change; unreadable ones are "
                             "skipped with a logged line")

    demo = sub.add_parser("demo", help="make a small random model and run it on two local nodes",
                          description="Make a small random Llama model, start one worker on 127.0.0.1 and run "
                                      "inference across the two nodes; cleans up afterwards.")
    demo.add_argument("--nodes", type=int, default=2, help="nodes to run on, root included (default 2)")
    demo.add_argument("--steps", type=int, default=32, help="tokens to generate (default 32)")
    demo.add_argument("--nthreads", type=int, default=1, help="threads per node (default 1)")

    add_perplexity_parser(sub)
    return parser


def format_step(stats, template: str, piece: str = "") -> str:
    return template.format(compute=stats.compute_ms, sync=stats.sync_ms, sent=stats.bytes_sent // 1024,
                           recv=stats.bytes_received // 1024, tokens=stats.tokens, piece=piece)


# ---- modes ----------------------------------------------------------------------------------

def cmd_inference(args: argparse.Namespace) -> int:
    from dllama_py.engine.sampler import Sampler
    from dllama_py.generation.generator import Generator

    if args.steps < 0:
        raise UserError(f"--steps must not be negative, got {args.steps}")
    check_sampling(args)
    tokenizer = model_tokenizer(args)
    if args.prompt_ids is not None:
        try:
            prompt_ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise UserError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    else:
        prompt_ids = tokenizer.encode(args.prompt, add_bos=tokenizer.add_bos)
    if not prompt_ids:
        raise UserError("the prompt is empty")
    engine = make_engine(args, log_stderr)
    try:
        check_vocab(engine, tokenizer)
        bad = [t for t in prompt_ids if not 0 <= t < min(engine.config.vocab_size, tokenizer.vocab_size)]
        if bad:
            raise UserError(f"--prompt-ids has ids outside the vocabulary: {bad[:5]}")
        for note in engine.info.notes:
            log_stderr(f"note: {note}")
        log_stderr(f"weights {engine.info.weight_type}, buffer {engine.info.buffer_type}, "
                   f"context {engine.info.seq_len}, threads {engine.info.threads}")
        if len(prompt_ids) > engine.seq_len:
            raise UserError(f"the prompt has {len(prompt_ids)} tokens but the context holds {engine.seq_len} "
                            "(raise --max-seq-len if the model allows)")
        generator = Generator(engine, tokenizer, args.nbatches)
        sampler = Sampler(args.temperature, args.topp, args.seed)
        out = sys.stdout
        if args.json:
            out.write(json.dumps({"prompt_ids": prompt_ids}) + "\n")
        else:
            out.write(args.prompt if args.prompt is not None else tokenizer.decode(prompt_ids))
        out.flush()

        def on_prompt_step(stats) -> None:
            if args.verbose:
                log_stderr(format_step(stats, STATS_PROMPT))

        def on_token(event) -> None:
            if args.verbose and event.stats is not None:
                log_stderr(format_step(event.stats, STATS_TOKEN, event.text.replace("\n", "\\n")))
            if args.json:
                if event.id >= 0:
                    out.write(json.dumps({"id": event.id, "text": event.text}) + "\n")
            else:
                out.write(event.text)
            out.flush()

        result = generator.generate(prompt_ids, args.steps, sampler, stop_ids=[] if args.ignore_eos else None,
                                    on_token=on_token, on_prompt_step=on_prompt_step)
        if not args.json:
            out.write("\n")
        prompt_ms = sum(s.compute_ms + s.sync_ms for s in result.prompt_steps)
        gen_ms = sum(s.compute_ms + s.sync_ms for s in result.token_steps)
        n_gen = len(result.token_steps)
        summary = {
            "prompt_tokens": result.prompt_tokens_evaluated,
            "prompt_batches": len(result.prompt_steps),
            "prompt_tokens_per_s": result.prompt_tokens_per_second(),
            "prompt_ms_per_token": prompt_ms / max(1, result.prompt_tokens_evaluated),
            "generated_tokens": len(result.generated_ids),
            "gen_tokens_per_s": result.generation_tokens_per_second(),
            "gen_ms_per_token": gen_ms / max(1, n_gen),
            "sync_ms_per_token": sum(s.sync_ms for s in result.token_steps) / max(1, n_gen),
            "bytes_sent_per_token": sum(s.bytes_sent for s in result.token_steps) / max(1, n_gen),
            "bytes_received_per_token": sum(s.bytes_received for s in result.token_steps) / max(1, n_gen),
            "finish_reason": result.finish_reason,
        }
        reported = [s.node_bytes for s in result.token_steps if s.node_bytes]
        if reported:
            nodes = len(reported[0])
            summary["node_bytes_per_token"] = [
                [sum(r[i][0] for r in reported) / len(reported), sum(r[i][1] for r in reported) / len(reported)]
                for i in range(nodes)]
            waits = [s.node_wait_ms for s in result.token_steps if s.node_wait_ms]
            summary["node_wait_ms_per_token"] = [sum(w[i] for w in waits) / len(waits) for i in range(nodes)]
        log_stderr("Evaluation")
        log_stderr(f"   nBatches: {args.nbatches}")
        log_stderr(f"    nTokens: {summary['prompt_tokens']}")
        log_stderr(f"   tokens/s: {summary['prompt_tokens_per_s']:.2f} ({summary['prompt_ms_per_token']:.2f} ms/tok)")
        log_stderr("Prediction")
        log_stderr(f"    nTokens: {n_gen}")
        log_stderr(f"   tokens/s: {summary['gen_tokens_per_s']:.2f} ({summary['gen_ms_per_token']:.2f} ms/tok)")
        waits = summary.get("node_wait_ms_per_token", [])
        for i, (sent, received) in enumerate(summary.get("node_bytes_per_token", [])):
            log_stderr(f"    node {i}: sent {sent / 1024:.1f} kB, received {received / 1024:.1f} kB, "
                       f"waited {waits[i]:.2f} ms for the others per token")
        if len(waits) > 1 and max(waits) - min(waits) > 0.1 * summary["gen_ms_per_token"]:
            slowest = min(range(len(waits)), key=lambda i: waits[i])
            log_stderr(f"    node {slowest} keeps the others waiting: a smaller --shares for it "
                       "(or --shares auto) may be faster")
        if args.json:
            out.write(json.dumps({"stats": summary}) + "\n")
            out.flush()
    finally:
        engine.close()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from dllama_py.generation.chat_session import ChatSession

    check_sampling(args)
    tokenizer = model_tokenizer(args)
    engine = make_engine(args, log_stderr)
    try:
        check_vocab(engine, tokenizer)
        for note in engine.info.notes:
            log_stderr(f"note: {note}")
        session = ChatSession(engine, tokenizer, args.chat_template, args.nbatches)
        from dllama_py.engine.sampler import Sampler

        sampler = Sampler(args.temperature, args.topp, args.seed)
        if args.system:
            session.add_system(args.system)
        print("Type a message and press Enter; an empty line or Ctrl-D quits.", file=sys.stderr)
        while True:
            try:
                line = input("\n💻 User: ")
            except EOFError:
                break
            if not line.strip():
                break
            sys.stdout.write("🤖 Assistant: ")
            sys.stdout.flush()

            def on_token(event) -> None:
                sys.stdout.write(event.text)
                sys.stdout.flush()

            result = session.reply(line, sampler, args.max_tokens, on_token)
            sys.stdout.write("\n")
            log_stderr(f"({result.prompt_tokens_evaluated} prompt tokens evaluated, "
                       f"{len(result.generated_ids)} generated, {result.generation_tokens_per_second():.1f} tokens/s)")
    finally:
        engine.close()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from dllama_py.cluster.worker import serve

    check_threads(args.nthreads)
    check_port(args.port)
    secret = args.secret if args.secret is not None else os.environ.get("DLLAMA_SECRET")
    return serve(args.host, args.port, args.nthreads, secret, once=args.once, cache_dir=args.cache_dir,
                 model_dir=args.model_dir)


def cmd_demo(args: argparse.Namespace) -> int:
    from dllama_py.commands.demo import run_demo

    return run_demo(main, nodes=args.nodes, steps=args.steps, threads=args.nthreads)


# ---- perplexity ----------------------------------------------------------------------------

def add_perplexity_parser(sub) -> None:
    """The `dllama perplexity` subcommand and its flags."""
    p = sub.add_parser(
        "perplexity", help="measure the model's perplexity over a text file (what a quantization costs)",
        description="Perplexity over a text file, computed as llama.cpp's llama-perplexity does: the text "
                    "(less one trailing newline) is tokenized with BOS first when the tokenizer adds one, cut "
                    "into consecutive windows of --ctx tokens (the tokens after the last whole window are "
                    "left out), each window is evaluated from position 0 with its first token replaced by "
                    "BOS, and only its second half is scored: the logits at positions ctx/2 .. ctx-2 predict "
                    "the tokens at ctx/2+1 .. ctx-1. stdout gets the running estimate after each window "
                    "([1]x,[2]y,...) and 'Final estimate: PPL = x +/- standard error'; stderr the plan, a "
                    "progress bar and the speed. --max-seq-len defaults to --ctx here.")
    add_engine_arguments(p)
    p.add_argument("--file", required=True, metavar="PATH", help="the text to score (UTF-8)")
    p.add_argument("--ctx", type=int, default=512, metavar="N",
                   help="tokens per window, even, at least 8 and at most the model's context (default 512, "
                        "llama.cpp's); compare perplexities only at the same --ctx")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the figures to PATH as JSON: the running estimates, the final "
                        "perplexity and its standard error, token and window counts")


def read_text_file(path: str) -> str:
    """The text of --file as llama.cpp's -f reads it (one trailing newline dropped); UserError when
    it is missing, a directory, not UTF-8 or empty."""
    from pathlib import Path

    file = Path(path)
    if file.is_dir():
        raise UserError(f"--file {path} is a directory; give a text file")
    if not file.is_file():
        raise UserError(f"text file not found: {path}")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (byte {error.start} cannot be decoded)") from None
    text = text.removesuffix("\n")
    if not text.strip():
        raise UserError(f"{path} is empty: give a text to score")
    return text


def cmd_perplexity(args: argparse.Namespace) -> int:
    """`dllama perplexity`: check the flags and the text before loading anything, then score it."""
    import time
    from pathlib import Path

    from tqdm import tqdm

    from dllama_py.engine.engine import open_model
    from dllama_py.generation import perplexity as ppl

    ctx = args.ctx
    if ctx < ppl.MIN_CTX or ctx % 2:
        raise UserError(f"--ctx must be an even number of at least {ppl.MIN_CTX} tokens, got {ctx}")
    if args.nbatches < 1:
        raise UserError(f"--nbatches must be at least 1, got {args.nbatches}")
    if args.max_seq_len is not None and args.max_seq_len < ctx:
        raise UserError(f"--max-seq-len {args.max_seq_len} is shorter than --ctx {ctx}: the KV cache must hold "
                        "a whole window (leave --max-seq-len out and it follows --ctx)")
    if args.json is not None and not Path(args.json).resolve().parent.is_dir():
        raise UserError(f"--json {args.json}: folder {Path(args.json).resolve().parent} does not exist")
    text = read_text_file(args.file)
    tokenizer = model_tokenizer(args)
    ids = ppl.tokenize_text(tokenizer, text)
    if len(ids) < ctx:
        raise UserError(f"{args.file} has {len(ids)} tokens but one window of --ctx {ctx} needs {ctx}: "
                        "give a longer text or a smaller --ctx")
    if Path(args.model).is_file():  # refuse a too-large window before any weight is loaded or shipped
        with open_model(args.model) as model:
            context = model.config.max_seq_len
        if ctx > context:
            raise UserError(f"--ctx {ctx} is larger than the model's context of {context} tokens")
    if args.max_seq_len is None:
        args.max_seq_len = ctx
    windows = ppl.window_count(len(ids), ctx)
    engine = make_engine(args, log_stderr)
    try:
        check_vocab(engine, tokenizer)
        for note in engine.info.notes:
            log_stderr(f"note: {note}")
        log_stderr(f"weights {engine.info.weight_type}, buffer {engine.info.buffer_type}, "
                   f"context {engine.info.seq_len}, threads {engine.info.threads}")
        left_out = len(ids) - windows * ctx
        log_stderr(f"{args.file}: {len(ids)} tokens, {windows} windows of {ctx} "
                   f"({windows * (ctx - ctx // 2 - 1)} tokens scored)"
                   + (f", the last {left_out} tokens left out" if left_out else ""))
        # A growing stdout line and a progress bar on one terminal would overwrite each other: there
        # the bar shows the running value and the line comes at the end.
        live = not (sys.stdout.isatty() and sys.stderr.isatty())
        start = time.perf_counter()
        with tqdm(total=windows, unit="window", desc="perplexity", file=sys.stderr, leave=False) as bar:
            def on_window(k: int, running: float) -> None:
                if live:
                    sys.stdout.write(f"[{k}]{running:.4f},")
                    sys.stdout.flush()
                bar.set_postfix_str(f"PPL {running:.4f}", refresh=False)
                bar.update()

            result = ppl.perplexity(engine, ids, ctx, ppl.window_bos(tokenizer), args.nbatches, on_window)
        seconds = time.perf_counter() - start
        if not live:
            sys.stdout.write("".join(f"[{k}]{value:.4f}," for k, value in enumerate(result.running, 1)))
        sys.stdout.write("\n")
        print(f"Final estimate: PPL = {result.perplexity:.4f} +/- {result.standard_error:.5f}", flush=True)
        log_stderr(f"{windows * ctx} tokens evaluated in {seconds:.2f} s ({windows * ctx / seconds:.1f} tokens/s)")
        if args.json is not None:
            figures = {"model": args.model, "tokenizer": args.tokenizer, "file": args.file, "ctx": ctx,
                       "nodes": engine.info.nodes, "text_tokens": result.text_tokens, "windows": result.windows,
                       "scored_tokens": result.scored_tokens, "running": result.running,
                       "perplexity": result.perplexity, "standard_error": result.standard_error,
                       "seconds": seconds}
            Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    finally:
        engine.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(version_text())
        return 0
    if args.mode is None:
        parser.print_help()
        return 2
    handlers = {"inference": cmd_inference, "chat": cmd_chat, "worker": cmd_worker, "demo": cmd_demo,
                "perplexity": cmd_perplexity}
    try:
        return handlers[args.mode](args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (ValueError, OSError, RuntimeError, ConnectionError) as error:
        # Bad files, impossible plans, unreachable or failing workers: the message says what and where.
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
