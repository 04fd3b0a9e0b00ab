"""The slicing plan: which part of every tensor each node of a cluster holds.

Pure Python, no I/O. The root uses it to cut slices, the workers to allocate buffers, the
tests to check coverage; nothing else computes slice boundaries (ARCHITECTURE.md).

Megatron-style tensor parallelism over N nodes:
- attention: whole KV heads per node (with the query heads that share them): rows of wq, wk,
  wv; the matching columns of wo;
- feed-forward (every expert alike): rows of w1/w3 and columns of w2 over the hidden
  dimension, in whole quantization blocks;
- classifier: rows (vocabulary) split over nodes;
- embedding: root only; norms, q/k norms and the MoE router: every node holds them whole.
Slices may be unequal: any N from 1 to n_kv_heads works when the block sizes allow it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from dllama_py.config import FloatType, ModelConfig

BLOCK = 32


class PlanError(ValueError):
    """A cluster size that cannot run this model; the message says why and what would work."""


def split_evenly(total: int, parts: int, unit: int = 1) -> list[tuple[int, int]]:
    """Split range(total) into `parts` contiguous [start, stop) ranges in multiples of `unit`;
    the first ranges get one unit more when it does not divide evenly."""
    units = total // unit
    base, extra = divmod(units, parts)
    out, start = [], 0
    for i in range(parts):
        size = (base + (1 if i < extra else 0)) * unit
        out.append((start, start + size))
        start += size
    return out


def split_weighted(total: int, shares: Sequence[float], unit: int = 1) -> list[tuple[int, int]]:
    """Split range(total) like split_evenly, but with range i sized in proportion to shares[i]
    (largest remainders get the leftover units); every range gets at least one unit."""
    units, parts = total // unit, len(shares)
    weight = sum(shares)
    ideal = [units * share / weight for share in shares]
    counts = [max(1, int(x)) for x in ideal]
    # too many units (the minimum of one pushed some up): take from the largest counts
    while sum(counts) > units:
        i = max((i for i in range(parts) if counts[i] > 1), key=lambda i: (counts[i] - ideal[i], counts[i]))
        counts[i] -= 1
    # too few: give to the ranges furthest below their ideal size
    while sum(counts) < units:
        i = max(range(parts), key=lambda i: (ideal[i] - counts[i], -i))
        counts[i] += 1
    out, start = [], 0
    for count in counts:
        out.append((start, start + count * unit))
        start += count * unit
    return out


def _split(total: int, parts: int, shares: Sequence[float] | None, unit: int = 1) -> list[tuple[int, int]]:
    if shares is None or len(set(shares)) == 1:
        return split_evenly(total, parts, unit)
    return split_weighted(total, shares, unit)


@dataclass(frozen=True)
class NodeSlice:
    """What node `index` holds: KV heads [kv_start, kv_stop), feed-forward rows [ff_start,
    ff_stop) of every FFN, classifier rows [vocab_start, vocab_stop)."""

    index: int
    kv_start: int
    kv_stop: int
    ff_start: int
    ff_stop: int
    vocab_start: int
    vocab_stop: int
    head_dim: int
    n_kv_groups: int

    @property
    def n_kv_heads(self) -> int:
        return self.kv_stop - self.kv_start

    @property
    def n_heads(self) -> int:
        return self.n_kv_heads * self.n_kv_groups

    @property
    def q_rows(self) -> tuple[int, int]:
        """Rows of wq (= columns of wo) this node holds."""
        per_kv = self.n_kv_groups * self.head_dim
        return self.kv_start * per_kv, self.kv_stop * per_kv

    @property
    def kv_rows(self) -> tuple[int, int]:
        """Rows of wk and wv this node holds."""
        return self.kv_start * self.head_dim, self.kv_stop * self.head_dim

    @property
    def ff_width(self) -> int:
        return self.ff_stop - self.ff_start

    @property
    def vocab_width(self) -> int:
        return self.vocab_stop - self.vocab_start


@dataclass(frozen=True)
class Cut:
    """How a node gets a tensor: `rows`/`cols` [start, stop) in values, `full`, or `root` (root only)."""

    kind: Literal["rows", "cols", "full", "root"]
    start: int = 0
    stop: int = 0


_LAYER_TENSOR = re.compile(r"layers\.\d+\.(?:experts\.\d+\.)?(\w+)$")


@dataclass(frozen=True)
class Plan:
    """The slices of every node for one model and one cluster size."""

    config: ModelConfig
    nodes: tuple[NodeSlice, ...]

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @staticmethod
    def make(config: ModelConfig, n_nodes: int, shares: Sequence[float] | None = None) -> Plan:
        """Plan `n_nodes` nodes for `config`; raises PlanError saying why a size is impossible
        and which sizes would work. `shares` (one positive number per node, root first) sizes
        every node's part of the KV heads, feed-forward rows and vocabulary in proportion, e.g.
        (2, 1) for a root twice as fast as its worker; None splits evenly."""
        if shares is not None:
            try:
                shares = [float(x) for x in shares]
            except (TypeError, ValueError):
                raise PlanError(f"--shares must be numbers, got {shares!r}") from None
            if len(shares) != n_nodes:
                raise PlanError(f"--shares needs one number per node, root first: {n_nodes} for {n_nodes} nodes, "
                                f"got {len(shares)}")
            if not all(math.isfinite(x) and x > 0 for x in shares):
                raise PlanError(f"--shares must be positive numbers, got {' '.join(f'{x:g}' for x in shares)}")
        problem = _problem(config, n_nodes, shares)
        if problem:
            valid = [n for n in range(1, config.n_kv_heads + 1) if not _problem(config, n)]
            raise PlanError(f"cannot split this model over {n_nodes} nodes: {problem}; "
                            f"node counts that work: {', '.join(map(str, valid))}")
        ff_unit = BLOCK if config.weight_float_type.block_values > 1 else 1
        kv = _split(config.n_kv_heads, n_nodes, shares)
        ff = _split(config.ff_dim, n_nodes, shares, ff_unit)
        vocab = _split(config.vocab_size, n_nodes, shares)
        nodes = tuple(
            NodeSlice(i, kv[i][0], kv[i][1], ff[i][0], ff[i][1], vocab[i][0], vocab[i][1],
                      config.head_dim, config.n_kv_groups)
            for i in range(n_nodes)
        )
        return Plan(config, nodes)

    def cut(self, name: str, node: int) -> Cut:
        """How node `node` holds tensor `name` (names as in formats.model_file.tensor_specs)."""
        s = self.nodes[node]
        if name == "embedding":
            return Cut("root")
        if name == "classifier":
            return Cut("rows", s.vocab_start, s.vocab_stop)
        if name == "final_norm":
            return Cut("full")
        match = _LAYER_TENSOR.search(name)
        if not match:
            raise KeyError(f"the plan does not know tensor {name!r}")
        kind = match.group(1)
        if kind == "wq":
            return Cut("rows", *s.q_rows)
        if kind in ("wk", "wv"):
            return Cut("rows", *s.kv_rows)
        if kind == "wo":
            return Cut("cols", *s.q_rows)
        if kind in ("w1", "w3"):
            return Cut("rows", s.ff_start, s.ff_stop)
        if kind == "w2":
            return Cut("cols", s.ff_start, s.ff_stop)
        if kind in ("router", "q_norm", "k_norm", "attention_norm", "ffn_norm"):
            return Cut("full")
        raise KeyError(f"the plan does not know tensor {name!r}")

    def holds(self, name: str, node: int) -> bool:
        """Whether node `node` holds any of tensor `name`."""
        return self.cut(name, node).kind != "root" or node == 0

    def slice_shape(self, name: str, shape: tuple[int, int], node: int) -> tuple[int, int]:
        """The (rows, cols) in values of node `node`'s part of a tensor of `shape`."""
        cut = self.cut(name, node)
        if cut.kind == "rows":
            return cut.stop - cut.start, shape[1]
        if cut.kind == "cols":
            return shape[0], cut.stop - cut.start
        return shape

    def node_weight_bytes(self, node: int) -> int:
        """Bytes of weights node `node` holds (the embedding counts for the root only)."""
        from dllama_py.formats.model_file import tensor_specs

        total = 0
        for spec in tensor_specs(self.config):
            if not self.holds(spec.name, node):
                continue
            rows, cols = self.slice_shape(spec.name, spec.shape, node)
            total += spec.float_type.tensor_bytes(rows, cols)
        return total

    def embedding_bytes(self) -> int:
        """Bytes of the embedding table (held by the root, memory-mapped)."""
        from dllama_py.formats.model_file import tensor_specs

        return next(spec.nbytes for spec in tensor_specs(self.config) if spec.name == "embedding")

    def node_kv_cache_bytes(self, node: int, seq_len: int) -> int:
        """Bytes of node `node`'s KV cache (f32 keys and values) for `seq_len` positions."""
        s = self.nodes[node]
        return 2 * self.config.n_layers * seq_len * s.n_kv_heads * s.head_dim * 4

    def describe(self, seq_len: int, addresses: list[str] | None = None) -> str:
        """A table of the plan: per node its heads, feed-forward rows, vocabulary rows and RAM."""
        c = self.config
        lines = [f"plan: {self.n_nodes} node(s), {c.n_heads} heads / {c.n_kv_heads} KV heads, "
                 f"feed-forward {c.ff_dim}, vocabulary {c.vocab_size}, KV cache for {seq_len} positions"]
        for s in self.nodes:
            where = "root" if s.index == 0 else "worker"
            if addresses and 0 < s.index < len(addresses):
                where += f" {addresses[s.index]}"
            q0, q1 = s.q_rows
            # The root reads embedding rows from the mapped file as tokens need them: not in RAM.
            embedding = self.embedding_bytes() if s.index == 0 else 0
            ram = self.node_weight_bytes(s.index) - embedding + self.node_kv_cache_bytes(s.index, seq_len)
            lines.append(
                f"  node {s.index} ({where}): KV heads {s.kv_start}-{s.kv_stop - 1}, "
                f"query heads {q0 // c.head_dim}-{q1 // c.head_dim - 1}, "
                f"ff rows {s.ff_start}-{s.ff_stop - 1} ({s.ff_width}), "
                f"vocab {s.vocab_start}-{s.vocab_stop - 1}, RAM {ram / 2**20:.1f} MiB"
                + (f" (+ the {embedding / 2**20:.{0 if embedding >= 10 * 2**20 else 1}f} MiB embedding, "
                   "read from the file as needed)"
                   if embedding else "")
            )
        return "\n".join(lines)


def _problem(config: ModelConfig, n_nodes: int, shares: Sequence[float] | None = None) -> str | None:
    """Why `n_nodes` (with `shares`) cannot run `config`, or None when it can."""
    if n_nodes < 1:
        return "a cluster needs at least one node"
    if n_nodes > config.n_kv_heads:
        return f"every node must own at least one KV head and the model has {config.n_kv_heads}"
    quantized = config.weight_float_type in (FloatType.Q40, FloatType.Q80)
    if quantized:
        per_kv = config.n_kv_groups * config.head_dim
        for start, stop in _split(config.n_kv_heads, n_nodes, shares):
            if ((stop - start) * per_kv) % BLOCK:
                return (f"a node's share of wo would be {(stop - start) * per_kv} columns, "
                        f"not a whole number of {BLOCK}-value blocks")
        if config.ff_dim // BLOCK < n_nodes:
            return f"the feed-forward width {config.ff_dim} has fewer {BLOCK}-value blocks than nodes"
    elif config.ff_dim < n_nodes:
        return f"the feed-forward width {config.ff_dim} is smaller than the node count"
    if config.vocab_size < n_nodes:
        return "the vocabulary is smaller than the node count"
    return None


def cut_tensor(stored: np.ndarray, float_type: FloatType, cut: Cut) -> np.ndarray:
    """Apply `cut` to a stored tensor (rows, row_elements): rows give a view (no copy), columns
    a contiguous copy of whole blocks; `full` and `root` return the tensor itself."""
    if cut.kind == "rows":
        return stored[cut.start:cut.stop]
    if cut.kind == "cols":
        per = float_type.block_values
        unit = float_type.block_bytes // float_type.storage_dtype.itemsize
        return np.ascontiguousarray(stored[:, cut.start // per * unit:cut.stop // per * unit])
    return stored
