"""The per-layer sync of a cluster: every node's partial (B, D) summed into x on every node.

Two ways, both in the buffer type (q80 or f32):
* all-gather (2 nodes): every node sends its whole partial to every other node and adds all of
  them to x in node order. A node sends (N-1) partials per sync.
* reduce-scatter, then all-gather (3 nodes and more): the columns of D are cut into N chunks
  (whole q80 blocks); node p receives chunk p of every partial and sums it (its own in f32),
  then sends that sum to every node, and every node adds the N sums to x. A node sends
  2(N-1)/N partials per sync: half of all-gather's at 4 nodes, a quarter at 8, however many
  nodes, in two network steps instead of one. With q80 a chunk's sum is quantized a second
  time (tests/test_sync.py measures that rounding against f32 buffers); every node, the owner
  of a chunk included, adds the sum as sent, so x stays identical on every node.
The root chooses (`sync_algorithm`; $DLLAMA_SYNC=allgather|reducescatter on the root forces one,
for benchmarks) and SETUP tells the workers.
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


SYNC_ENV = "DLLAMA_SYNC"
SYNCS = ("allgather", "reducescatter")


def sync_algorithm(n_nodes: int) -> str:
    """allgather for 2 nodes (the same bytes as reduce-scatter, in one step), reducescatter from
    3 on; $DLLAMA_SYNC overrides."""
    forced = os.environ.get(SYNC_ENV, "").strip()
    if forced:
        if forced not in SYNCS:
            raise ValueError(f"{SYNC_ENV} must be one of {', '.join(SYNCS)}, got {forced!r}")
        return forced
    return "allgather" if n_nodes <= 2 else "reducescatter"


def chunk_bounds(dim: int, n_nodes: int, unit: int) -> list[int]:
    """Column offsets of the N chunks of a row (whole units of `unit` values), N + 1 of them."""
    units = dim // unit
    return [units * p // n_nodes * unit for p in range(n_nodes)] + [dim]


class MeshSync:
    """Sync over a C++ Mesh; one message per sync (per step of it) carries every row of the batch."""

    def __init__(self, mesh: _core.Mesh, node: int, n_nodes: int, buffer_type: str, max_batch: int, dim: int,
                 algorithm: str = "allgather") -> None:
        self.mesh, self.node, self.n_nodes = mesh, node, n_nodes
        self.q80 = buffer_type == "q80"
        self.row_bytes = kernels.q80_row_bytes(dim) if self.q80 else dim * 4
        self.flat = np.zeros(n_nodes * max_batch * self.row_bytes, dtype=np.uint8)
        self.seconds = 0.0  # time spent waiting on the network
        if algorithm not in SYNCS:
            raise ValueError(f"unknown sync algorithm {algorithm!r}")
        self.algorithm = algorithm
        self.bounds = chunk_bounds(dim, n_nodes, 32 if self.q80 else 1)
        self.send = np.zeros(max_batch * self.row_bytes, dtype=np.uint8)
        self.recv = np.zeros(n_nodes * max_batch * self.row_bytes, dtype=np.uint8)

    def _bytes(self, values: int) -> int:
        return values // 32 * 34 if self.q80 else values * 4

    def _encode(self, values: np.ndarray, out: np.ndarray) -> None:
        """values (B, n) float32, contiguous, into out (B * row bytes) in the buffer type."""
        if self.q80:
            kernels.quantize_q80_into(values, out.reshape(values.shape[0], -1))
        else:
            out.view(np.float32)[:] = values.reshape(-1)

    def _add(self, target: np.ndarray, data: np.ndarray) -> None:
        """target (B, n) float32, contiguous, += the decoded data."""
        if self.q80:
            kernels.add_q80(target, data)
        else:
            kernels.add(target, data.view(np.float32).reshape(target.shape))

    def reduce_add(self, partial: np.ndarray, x: np.ndarray, label: str) -> None:
        """x (B, D) += sum over nodes of every node's partial (B, D)."""
        if self.algorithm == "reducescatter":
            self._reduce_scatter_add(partial, x, label)
            return
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

    def _reduce_scatter_add(self, partial: np.ndarray, x: np.ndarray, label: str) -> None:
        B, me, n = partial.shape[0], self.node, self.n_nodes
        bounds = self.bounds
        sizes = [B * self._bytes(bounds[p + 1] - bounds[p]) for p in range(n)]
        offsets = [sum(sizes[:p]) for p in range(n)]
        # 1. chunk p of this node's partial goes to node p; chunk `me` of every partial comes here
        for p in range(n):
            if p != me and sizes[p]:
                chunk = np.ascontiguousarray(partial[:, bounds[p]:bounds[p + 1]])
                self._encode(chunk, self.send[offsets[p]:offsets[p] + sizes[p]])
        mine = sizes[me]
        start = time.perf_counter()
        self.mesh.all_to_all(self.send, offsets, sizes, self.recv, [p * mine for p in range(n)], [mine] * n,
                             label + " (reduce-scatter)")
        self.seconds += time.perf_counter() - start
        # 2. this node's chunk summed over every node, in node order (its own partial in f32)
        total = np.zeros((B, bounds[me + 1] - bounds[me]), dtype=np.float32)
        for p in range(n):
            if p == me:
                total += partial[:, bounds[me]:bounds[me + 1]]
            elif mine:
                self._add(total, self.recv[p * mine:(p + 1) * mine])
        # 3. every node's sum to every node; each adds all of them, its own as sent
        region = self.flat[:offsets[-1] + sizes[-1]]
        if mine:
            self._encode(total, region[offsets[me]:offsets[me] + mine])
        start = time.perf_counter()
        self.mesh.all_gather_v(region, offsets, sizes, label + " (all-gather)")
        self.seconds += time.perf_counter() - start
        for p in range(n):
            if sizes[p]:
                part = np.zeros((B, bounds[p + 1] - bounds[p]), dtype=np.float32)
                self._add(part, region[offsets[p]:offsets[p] + sizes[p]])
                x[:, bounds[p]:bounds[p + 1]] += part
