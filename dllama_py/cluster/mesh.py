"""The per-layer sync of a cluster: all-gather every node's partial in the buffer type, sum.

Every node quantizes its own partial (q80) or sends it as is (f32), receives every other
node's, and adds all of them to x in node order, so x stays identical on every node.
"""

from __future__ import annotations

import os
import time

import numpy as np

from dllama_py import _core
from dllama_py.model import kernels

SPIN_ENV = "DLLAMA_NET_SPIN_US"


def net_spin_us() -> int:
    """How long a network operation retries before it sleeps (DLLAMA_NET_SPIN_US, microseconds;
    default 200). Spinning saves a thread wake-up on every sync; 0 turns it off, for nodes whose
    cores are busy with other work."""
    text = os.environ.get(SPIN_ENV, "").strip()
    if not text:
        return _core.Mesh.DEFAULT_SPIN_US
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 1_000_000:
        raise ValueError(f"{SPIN_ENV} must be a whole number of microseconds from 0 to 1000000, got {text!r}")
    return value


def open_mesh(node: int, n_nodes: int, fds: list[int], names: list[str], timeout_ms: int, spin_us: int) -> _core.Mesh:
    """The C++ Mesh over connected sockets (it owns the fds from here on)."""
    mesh = _core.Mesh(node, n_nodes, fds, names, timeout_ms)
    mesh.spin_us = spin_us
    return mesh


class MeshSync:
    """Sync over a C++ Mesh; one message per sync carries every row of the batch."""

    def __init__(self, mesh: _core.Mesh, node: int, n_nodes: int, buffer_type: str, max_batch: int, dim: int) -> None:
        self.mesh, self.node, self.n_nodes = mesh, node, n_nodes
        self.q80 = buffer_type == "q80"
        self.row_bytes = kernels.q80_row_bytes(dim) if self.q80 else dim * 4
        self.flat = np.zeros(n_nodes * max_batch * self.row_bytes, dtype=np.uint8)
        self.seconds = 0.0  # time spent waiting on the network

    def reduce_add(self, partial: np.ndarray, x: np.ndarray, label: str) -> None:
        """x (B, D) += sum over nodes of every node's partial (B, D)."""
        slice_bytes = partial.shape[0] * self.row_bytes
        region = self.flat[: self.n_nodes * slice_bytes].reshape(self.n_nodes, slice_bytes)
        mine = region[self.node]
        if self.q80:
            kernels.quantize_q80_into(partial, mine)
        else:
            mine.view(np.float32)[:] = partial.reshape(-1)
        start = time.perf_counter()
        self.mesh.all_gather(region, slice_bytes, label)
        self.seconds += time.perf_counter() - start
        for i in range(self.n_nodes):
            if self.q80:
                kernels.add_q80(x, region[i])
            else:
                kernels.add(x, region[i].view(np.float32))
