"""`dllama-api`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("dllama-api: not built yet", file=sys.stderr)
    return 2
