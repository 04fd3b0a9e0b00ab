"""What every command that loads a model shares: its flags, the engine and tokenizer they ask
for, and how a user's mistake is reported (UserError: one line, exit status 1)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit status 1."""


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that loads a model (inference, chat, dllama-api)."""
    p.add_argument("--model", required=True, metavar="M",
                   help="model file: distributed-llama .m, or llama.cpp GGUF (F32/F16/BF16/Q8_0/Q4_0 weights used as "
                        "they are, other types requantized while loading)")
    p.add_argument("--tokenizer", default=None, metavar="T",
                   help="tokenizer file (.t); needed for a .m model; a GGUF model carries its own, which this "
                        "replaces")
    p.add_argument("--weight-type", choices=("q40", "q80"), default=None,
                   help="GGUF only: what matrices of other quantized types (K-quants, Q5_0, ...) become while "
                        "loading (default: q40 for 2-5 bit types, q80 for 6-8 bit ones)")
    p.add_argument("--nthreads", type=int, default=None, metavar="K",
                   help="compute threads on this node (default: all cores)")
    p.add_argument("--buffer-float-type", choices=("f32", "q80"), default=None,
                   help="type of the activations exchanged between nodes (default on a cluster: q80 for "
                        "q40/q80 weights, f32 otherwise; one node sums in f32 unless q80 is asked for)")
    p.add_argument("--max-seq-len", type=int, default=None, metavar="L",
                   help="context length (KV cache size); default: the model's, capped to fit in memory")
    p.add_argument("--kv-cache-storage", choices=("ram", "disk"), default="ram",
                   help="keep the KV cache in RAM or in a memory-mapped temporary file, unlinked as soon as "
                        "it is mapped so that nothing stays behind (default ram)")
    p.add_argument("--nbatches", type=int, default=32, metavar="N",
                   help="prompt tokens evaluated together in one batch (default 32)")
    p.add_argument("--mmap-weights", action="store_true",
                   help="keep this node's weights memory-mapped from the model file, in the file's layout, "
                        "instead of loading (and, for q40, regrouping) them into RAM: less memory, slower")
    p.add_argument("--workers", nargs="+", default=[], metavar="HOST:PORT",
                   help="worker nodes to run the model on together with this one (tensor parallel); "
                        "$DLLAMA_NET_SPIN_US sets how long a sync busy-waits before sleeping (default 200 "
                        "microseconds; 0 when this computer's cores are busy with other work)")
    p.add_argument("--secret", default=None,
                   help="shared secret the workers must know (default: $DLLAMA_SECRET); authenticates, "
                        "does not encrypt")
    p.add_argument("--net-timeout", type=float, default=None, metavar="S",
                   help="with --workers: seconds any node waits for a silent peer before the cluster stops "
                        "with an error naming it (default 8); raise it for nodes so slow that one layer of a "
                        "prompt batch takes longer")
    p.add_argument("--on-node-loss", choices=("replan", "stop"), default="replan",
                   help="with --workers: when a worker dies or stops answering, 'replan' (default) names it, "
                        "plans the model onto the nodes left (if their RAM holds it), ships their slices again, "
                        "evaluates every sequence so far again and carries on (dllama-api takes the worker back "
                        "when it answers again, while idle); 'stop' ends with an error naming it")
    p.add_argument("--shares", nargs="+", default=None, metavar="S",
                   help="with --workers: each node's relative share of every layer, root first (default: "
                        "equal), e.g. --shares 2 1 1 gives the root half of the heads, feed-forward rows "
                        "and vocabulary; give a faster computer a bigger share. 'auto' sets them from "
                        "every node's measured matmul speed (each worker logs its own at startup), "
                        "giving no node more than 90%% of its available RAM holds")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.8, metavar="X",
                   help="sampling temperature; 0 is greedy (default 0.8)")
    p.add_argument("--topp", type=float, default=0.9, metavar="X",
                   help="top-p (nucleus) sampling mass; outside (0, 1) samples from all tokens (default 0.9)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="random seed for reproducible sampling (default: from the clock)")


def check_port(port: int) -> None:
    """A TCP port to listen on (0: any free one)."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {port}")


def check_sampling(args: argparse.Namespace) -> None:
    """--temperature and --topp: finite numbers (NaN would sample nonsense), a temperature not negative."""
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature must be a finite number, 0 or more, got {args.temperature:g}")
    if not math.isfinite(args.topp):
        raise UserError(f"--topp must be a finite number, got {args.topp:g}")


def check_threads(threads: int | None) -> None:
    from dllama_py.model import kernels

    if threads is None:
        return
    if threads < 1:
        raise UserError(f"--nthreads must be at least 1, got {threads}")
    if threads > kernels.hardware_threads():
        print(f"warning: --nthreads {threads} is more than the {kernels.hardware_threads()} cores of this "
              "computer; it will be slower, not faster", file=sys.stderr)


def load_tokenizer(path: str):  # -> Tokenizer
    from dllama_py.text.tokenizer import Tokenizer

    if Path(path).is_dir():
        raise UserError(f"--tokenizer {path} is a directory; give the .t file itself")
    if not Path(path).is_file():
        raise UserError(f"tokenizer file not found: {path}")
    return Tokenizer.load(path)


def model_tokenizer(args: argparse.Namespace):  # -> Tokenizer
    """--tokenizer, or the tokenizer a GGUF --model carries."""
    if args.tokenizer is not None:
        return load_tokenizer(args.tokenizer)
    from dllama_py.converter.gguf_tokenizer import read_tokenizer
    from dllama_py.converter.tokenizer_sources import SourceError
    from dllama_py.formats.gguf_file import is_gguf

    model = Path(args.model)
    if not model.is_file():
        raise UserError(f"model file not found: {model}")
    if not is_gguf(model):
        raise UserError(f"--tokenizer is needed: {model.name} is a .m model, which holds no tokenizer")
    try:
        tokenizer, warnings = read_tokenizer(model)
    except SourceError as error:
        raise UserError(f"{error} (give a --tokenizer file instead)") from None
    for warning in warnings:
        log_stderr(f"note: {warning}")
    return tokenizer


def make_engine(args: argparse.Namespace, log: Callable[[str], None]):  # -> Engine
    """The engine the flags ask for: this computer alone, or the root of --workers."""
    check_threads(args.nthreads)
    if Path(args.model).is_dir():
        raise UserError(f"--model {args.model} is a directory; give the .m or .gguf file itself")
    if args.shares is not None and not args.workers:
        raise UserError("--shares splits the model between the nodes of a cluster: give --workers too")
    if args.net_timeout is not None and not 0.1 <= args.net_timeout <= 3600:
        raise UserError(f"--net-timeout must be between 0.1 and 3600 seconds, got {args.net_timeout:g}")
    extra = {} if args.net_timeout is None else {"timeout_ms": int(args.net_timeout * 1000)}
    shares = args.shares
    if shares is not None and shares != ["auto"]:
        try:
            shares = [float(x) for x in shares]
        except ValueError:
            raise UserError(f"--shares takes one number per node (root first) or 'auto', got {' '.join(shares)}") \
                from None
    elif shares == ["auto"]:
        shares = "auto"
    from dllama_py.cluster.root import cluster_engine

    secret = args.secret if args.secret is not None else os.environ.get("DLLAMA_SECRET")
    return cluster_engine(args.model, args.workers, secret=secret, log=log, threads=args.nthreads,
                          buffer_type=args.buffer_float_type, max_seq_len=args.max_seq_len,
                          kv_storage=args.kv_cache_storage, max_batch=args.nbatches,
                          mmap_weights=args.mmap_weights, shares=shares, slots=getattr(args, "parallel", 1) or "auto",
                          weight_type=args.weight_type, on_node_loss=args.on_node_loss, **extra)


def check_vocab(engine, tokenizer) -> None:
    if tokenizer.vocab_size > engine.config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{engine.config.vocab_size}: "
                        "they do not belong together")


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
