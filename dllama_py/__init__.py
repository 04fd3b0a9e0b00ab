"""dllama-py: tensor-parallel CPU inference of LLMs over plain Ethernet.

Reads and runs distributed-llama's model (.m) and tokenizer (.t) files. The C++ core is the
private extension `dllama_py._core`; `dllama_py.model.kernels` is its typed Python face.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Tokenizer": "dllama_py.text.tokenizer",
    "ModelConfig": "dllama_py.model.config",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `import dllama_py` stays cheap and does not need every optional piece.
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dllama_py' has no attribute {name!r}")
