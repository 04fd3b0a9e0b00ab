"""The model on this computer: load a `.m` file, size the KV cache, run steps.

`Engine` is what the generator drives; `LocalEngine` runs the whole model on one node, and
`cluster.root.ClusterEngine` runs it on 1 + N workers with the same interface.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from dllama_py import kernels
from dllama_py.config import FloatType, ModelConfig
from dllama_py.formats.model_file import ModelFile, read_model
from dllama_py.forward import LocalSync, NodeForward, will_regroup
from dllama_py.plan import Plan, cut_tensor

BUFFER_TYPES = ("f32", "q80")


class EngineError(RuntimeError):
    """The engine cannot run as asked; the message says what to change."""


@dataclass
class StepStats:
    """Timing and traffic of one step (one batch of tokens through the model)."""

    tokens: int
    compute_ms: float
    sync_ms: float = 0.0
    bytes_sent: int = 0  # by this node (the root)
    bytes_received: int = 0
    # (bytes sent, bytes received) by every node of a cluster since the last step that reported
    # them (prompt batches whose logits nobody reads report nothing; their bytes count later)
    node_bytes: list[tuple[int, int]] | None = None
    # milliseconds every node spent waiting for the others in syncs, over the same steps: the
    # slowest node waits least (give it a smaller --shares)
    node_wait_ms: list[float] | None = None


@dataclass
class EngineInfo:
    """What a user-facing command shows about a loaded engine."""

    nodes: int
    plan_text: str
    weight_type: str
    buffer_type: str
    seq_len: int
    threads: int
    notes: list[str] = field(default_factory=list)


class Engine(Protocol):
    """A loaded model that evaluates tokens at positions and keeps their keys and values."""

    config: ModelConfig
    seq_len: int
    max_batch: int
    info: EngineInfo

    def step(self, tokens: list[int], start_pos: int, all_logits: bool = False, need: str = "full") -> StepStats:
        """Evaluate `tokens` at positions start_pos.. (at most max_batch of them). `need` says what
        will be read next: 'argmax', 'full' (logits) or 'none' (a cluster sends only that)."""
        ...

    def logits(self) -> np.ndarray:
        """Logits of the last step: (vocab,) for its last token, or (B, vocab) with all_logits."""
        ...

    def argmax(self) -> int:
        """The most likely next token after the last step (first index on ties)."""
        ...

    def close(self) -> None: ...


def known_available_memory() -> int | None:
    """Bytes of RAM the kernel says are available (MemAvailable), or None where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory() -> int:
    """Bytes of RAM the kernel says are available (MemAvailable), or 8 GiB if unknown."""
    known = known_available_memory()
    return 8 << 30 if known is None else known


def memory_shortfall(plan: Plan, node: int, seq_len: int, kv_storage: str) -> str | None:
    """Why worker node `node` (>= 1) of `plan` cannot fit in this computer's available RAM, or
    None (also when the available RAM is unknown)."""
    available = known_available_memory()
    weights = plan.node_weight_bytes(node)
    kv = plan.node_kv_cache_bytes(node, seq_len) if kv_storage == "ram" else 0
    if available is None or weights + kv <= available:
        return None
    return (f"node {node} needs {(weights + kv) / 2**30:.2f} GiB ({weights / 2**30:.2f} GiB of weights, "
            f"{kv / 2**30:.2f} GiB of KV cache for {seq_len} positions) but this computer has "
            f"{available / 2**30:.2f} GiB available; use more nodes, a shorter --max-seq-len or "
            "--kv-cache-storage disk")


def choose_seq_len(config: ModelConfig, plan: Plan, requested: int | None, node: int = 0) -> tuple[int, str | None]:
    """The KV cache length: the model's, or `requested` (which may only lower it), capped so the
    cache takes at most half of the available RAM. Returns (length, message or None)."""
    if requested is not None and requested <= 0:
        raise EngineError(f"--max-seq-len must be positive, got {requested}")
    if requested is not None and requested > config.max_seq_len:
        return config.max_seq_len, (f"--max-seq-len {requested} is above the model's context of "
                                    f"{config.max_seq_len}; using {config.max_seq_len}")
    seq_len = requested or config.max_seq_len
    per_position = plan.node_kv_cache_bytes(node, 1)
    budget = available_memory() // 2
    if requested is None and seq_len * per_position > budget:
        capped = max(256, budget // per_position // 256 * 256)
        if capped < seq_len:
            return capped, (f"the model's context of {seq_len} tokens needs "
                            f"{seq_len * per_position / 2**30:.1f} GiB of KV cache; using {capped} tokens "
                            f"({capped * per_position / 2**30:.1f} GiB) to fit in memory "
                            "(set --max-seq-len to choose)")
    return seq_len, None


def default_buffer_type(config: ModelConfig) -> str:
    """A cluster's buffer type: q80 for quantized weights (as distributed-llama requires), f32 otherwise."""
    return "q80" if config.weight_float_type in (FloatType.Q40, FloatType.Q80) else "f32"


def load_node_weights(model: ModelFile, plan: Plan, node: int, mmap_weights: bool = False,
                      progress: bool = True) -> dict[str, np.ndarray]:
    """Node `node`'s slice of every tensor it holds (the embedding stays in the mapped file, with
    the root). By default every slice is copied into anonymous memory, which numpy backs with
    huge pages: the kernels then stream weights about 14% faster than from the file's page
    cache (fewer TLB misses). With mmap_weights, row slices stay views of the mapped file (less
    RAM when the page cache cannot also hold the model; slower)."""
    from tqdm import tqdm

    tensors = [t for t in model if plan.cut(t.name, node).kind != "root"]
    total = plan.node_weight_bytes(node) - (model["embedding"].nbytes if node == 0 else 0)
    out = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", leave=False,
              disable=not progress or mmap_weights or total < (256 << 20)) as bar:
        for tensor in tensors:
            part = cut_tensor(tensor.data, tensor.float_type, plan.cut(tensor.name, node))
            out[tensor.name] = part if mmap_weights else np.array(part)
            bar.update(part.nbytes)
    return out


def open_model(path: str | os.PathLike[str]) -> ModelFile:
    """Open a `.m` file; a missing or unreadable file becomes an EngineError with the path."""
    p = Path(path)
    if not p.is_file():
        raise EngineError(f"model file not found: {p}")
    return read_model(p)


class LocalEngine:
    """The whole model on this computer: one node. Partial sums are added in f32 unless
    buffer_type='q80' asks for a cluster's rounding."""

    def __init__(self, model_path: str | os.PathLike[str], threads: int | None = None,
                 buffer_type: str | None = None, max_seq_len: int | None = None,
                 kv_storage: str = "ram", max_batch: int = 32, mmap_weights: bool = False) -> None:
        self.model = open_model(model_path)
        self.config = self.model.config
        # One node has no wire: partial sums need no rounding unless asked for (to match a cluster).
        self.buffer_type = buffer_type or "f32"
        if self.buffer_type not in BUFFER_TYPES:
            raise EngineError(f"--buffer-float-type must be one of {', '.join(BUFFER_TYPES)}")
        if threads is not None:
            kernels.set_num_threads(threads)
        self.plan = Plan.make(self.config, 1)
        self.seq_len, note = choose_seq_len(self.config, self.plan, max_seq_len)
        self.max_batch = max_batch
        self.embedding = self.model["embedding"]
        # Regrouped weights are copied by the regrouping; otherwise copy unless asked to map.
        regroup = not mmap_weights
        weights = load_node_weights(self.model, self.plan, 0, mmap_weights or will_regroup(self.config))
        sync = LocalSync(self.buffer_type, max_batch, self.config.dim)
        self.forward = NodeForward(self.plan, 0, weights, sync, self.seq_len, max_batch, kv_storage, regroup,
                                   release=self.model.release)
        if not mmap_weights:
            self.model.release()  # the weights were copied (or regrouped) out of the mapping
        self.x = np.zeros((max_batch, self.config.dim), dtype=np.float32)
        self._last: np.ndarray | None = None
        self.info = EngineInfo(1, self.plan.describe(self.seq_len), self.config.weight_float_type.label,
                               self.buffer_type, self.seq_len, kernels.get_num_threads(),
                               [note] if note else [])

    def step(self, tokens: list[int], start_pos: int, all_logits: bool = False, need: str = "full") -> StepStats:
        start = time.perf_counter()
        B = len(tokens)
        if not 0 < B <= self.max_batch:
            raise EngineError(f"a step takes 1 to {self.max_batch} tokens, got {B}")
        x = self.x[:B]
        kernels.embedding(self.embedding, np.asarray(tokens, dtype=np.int32), x)
        positions = np.arange(start_pos, start_pos + B, dtype=np.int32)
        self._last = self.forward.forward(x, positions, all_logits, logits=need != "none")
        return StepStats(B, (time.perf_counter() - start) * 1e3)

    def logits(self) -> np.ndarray:
        if self._last is None:
            raise EngineError("no step has run yet")
        return self._last[0] if self._last.shape[0] == 1 else self._last

    def argmax(self) -> int:
        return int(np.argmax(self.logits() if self._last.shape[0] == 1 else self._last[-1]))

    def close(self) -> None:
        self.forward.close()
        self._last = None

