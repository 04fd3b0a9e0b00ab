"""How the engine reaches the other nodes: a `Transport`.

The engine (engine.py) is the root of a cluster. What differs between one node alone and a
cluster of N is only the transport: `Loopback` is the cluster of size 1 (no peers, a sync that
only adds this node's partial, a gather that returns this node's part), and
cluster/root.py's `ClusterTransport` reaches the workers over TCP. Every step runs the same
code on top of either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from dllama_py.engine.exchange import Segment
from dllama_py.formats.model_file import ModelFile
from dllama_py.model import kernels
from dllama_py.model.config import ModelConfig
from dllama_py.model.forward import Sync
from dllama_py.model.plan import Plan

BUFFER_TYPES = ("f32", "q80")


@dataclass(frozen=True)
class Session:
    """What every node must know before it loads anything."""

    config: ModelConfig
    shares: list[float] | None  # every node's share of the work, root first (None: equal)
    buffer_type: str  # how partial sums travel: f32 or q80
    seq_len: int
    max_batch: int
    kv_storage: str  # ram or disk
    slots: int = 1  # KV-cache slots: sequences that may be in flight at once


@dataclass(frozen=True)
class NodeReport:
    """What a worker says about itself when it connects (--shares auto plans with it)."""

    speed_gbps: float  # its decoding matmul speed (kernels.measure_matmul_speed)
    memory: int | None  # bytes of RAM it has available (None: unknown)


class Transport(Protocol):
    """The root's side of the links to every other node; node 0 is this one."""

    names: list[str]  # every node's name: "root", then the workers' addresses

    def default_buffer_type(self, config: ModelConfig) -> str:
        """The buffer type when the user sets none."""
        ...

    def connect(self) -> list[NodeReport]:
        """Reach and authenticate every worker; one report per worker."""
        ...

    def start(self, session: Session, plan: Plan, model: ModelFile, progress: bool) -> None:
        """Give every worker the session and its weight slices (cut from `model` by `plan`)."""
        ...

    def sync(self, buffer_type: str, max_batch: int, dim: int) -> Sync:
        """The per-layer sync of this node's forward pass."""
        ...

    def wait_loaded(self) -> None:
        """Return once every worker holds its weights (traffic counters start from here)."""
        ...

    def send_step(self, segments: list[Segment], x: np.ndarray) -> None:
        """Start a step on every worker: rows x (B, dim), the rows of `segments` in order."""
        ...

    def send_copy(self, source: int, target: int, length: int) -> None:
        """Tell every other node to copy a KV slot's first positions to another slot."""
        ...

    def send_logits_request(self) -> None:
        """Ask every worker for the whole logits slice of the last step."""
        ...

    def gather(self, part: bytes, offsets: list[int], sizes: list[int], label: str) -> np.ndarray:
        """Every node's part of a reply, this node's included, at `offsets` of one buffer."""
        ...

    def counters(self) -> tuple[int, int, float]:
        """This node's bytes sent, bytes received and seconds waited in syncs, so far."""
        ...

    def check_alive(self) -> None:
        """Between steps: raise ConnectionError naming a worker that went away."""
        ...

    def close(self) -> None:
        """End the session on every worker."""
        ...


class LocalSync:
    """The sync of a one-node cluster: the partial goes through the buffer type like on a wire
    (q80 rounding or none), so one node computes what N nodes compute."""

    def __init__(self, buffer_type: str, max_batch: int, dim: int) -> None:
        self.q80 = buffer_type == "q80"
        self.buffer = np.zeros((max_batch, kernels.q80_row_bytes(dim)), dtype=np.uint8) if self.q80 else None
        self.seconds = 0.0  # no network to wait for

    def reduce_add(self, partial: np.ndarray, x: np.ndarray, label: str) -> None:
        if self.buffer is not None:
            q = self.buffer[: partial.shape[0]]
            kernels.quantize_q80_into(partial, q)
            kernels.add_q80(x, q)
        else:
            kernels.add(x, partial)


class Loopback:
    """The transport of one node alone: a cluster of size 1."""

    def __init__(self) -> None:
        self.names = ["root"]
        self._sync: LocalSync | None = None

    def default_buffer_type(self, config: ModelConfig) -> str:
        return "f32"  # no wire: partial sums need no rounding unless asked for (to match a cluster)

    def connect(self) -> list[NodeReport]:
        return []

    def start(self, session: Session, plan: Plan, model: ModelFile, progress: bool) -> None:
        pass

    def sync(self, buffer_type: str, max_batch: int, dim: int) -> Sync:
        self._sync = LocalSync(buffer_type, max_batch, dim)
        return self._sync

    def wait_loaded(self) -> None:
        pass

    def send_step(self, segments: list[Segment], x: np.ndarray) -> None:
        pass

    def send_copy(self, source: int, target: int, length: int) -> None:
        pass

    def send_logits_request(self) -> None:
        pass

    def gather(self, part: bytes, offsets: list[int], sizes: list[int], label: str) -> np.ndarray:
        return np.frombuffer(part, dtype=np.uint8)

    def counters(self) -> tuple[int, int, float]:
        return 0, 0, 0.0

    def check_alive(self) -> None:
        pass

    def close(self) -> None:
        pass
