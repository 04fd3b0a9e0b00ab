"""The `dllama` command: inference, chat, worker and demo modes."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def version_text() -> str:
    """Package version, SIMD paths compiled in, the path this CPU uses and the default threads."""
    from . import kernels

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
    for name, text in (
        ("inference", "generate text from a prompt and print statistics"),
        ("chat", "interactive multi-turn chat in the terminal"),
        ("worker", "serve as a worker node of a cluster"),
        ("demo", "make a small random model and run it on two local nodes"),
    ):
        sub.add_parser(name, help=text, description=text)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(version_text())
        return 0
    if args.mode is None:
        parser.print_help()
        return 2
    print(f"dllama {args.mode}: not built yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
