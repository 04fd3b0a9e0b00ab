"""The slicing plan: which part of every tensor each node of a cluster holds.

Pure Python, no I/O. The root uses it to cut slices, the workers to allocate buffers, the
tests to check coverage; nothing else computes slice boundaries (docs/architecture.md).

How each tensor is split (by rows or columns, along which axis, whole or root only) is declared
once, in structure.py; a plan says where every node's range along each axis lies (NodeSlice)
and cuts tensors by that declaration. Feed-forward ranges are whole quantization blocks.
Slices may be unequal: any N from 1 to n_heads works when the block sizes allow it (beyond
n_kv_heads, nodes share KV heads and split their query heads).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from dllama_py.model.config import FloatType, ModelConfig
from dllama_py.model.structure import Axis, Split, TensorSpec, tensor_specs

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
    """What node `index` holds: KV heads [kv_start, kv_stop) and query heads [q_start, q_stop)
    (the query heads of its KV heads: all of them, or with more nodes than KV heads a part of
    one KV head's, that head computed by every node that shares it), feed-forward rows
    [ff_start, ff_stop) of every FFN, classifier rows [vocab_start, vocab_stop)."""

    index: int
    kv_start: int
    kv_stop: int
    ff_start: int
    ff_stop: int
    vocab_start: int
    vocab_stop: int
    head_dim: int
    q_start: int
    q_stop: int

    @property
    def n_kv_heads(self) -> int:
        return self.kv_stop - self.kv_start

    @property
    def n_heads(self) -> int:
        return self.q_stop - self.q_start

    @property
    def q_rows(self) -> tuple[int, int]:
        """Rows of wq (= columns of wo) this node holds."""
        return self.q_start * self.head_dim, self.q_stop * self.head_dim

    @property
    def kv_rows(self) -> tuple[int, int]:
        """Rows of wk and wv this node holds."""
        return self.kv_start * self.head_dim, self.kv_stop * self.head_dim

    def range(self, axis: Axis) -> tuple[int, int]:
        """This node's [start, stop) along `axis`, in values (rows of the tensors split along it)."""
        if axis == Axis.Q:
            return self.q_rows
        if axis == Axis.KV:
            return self.kv_rows
        if axis == Axis.FF:
            return self.ff_start, self.ff_stop
        return self.vocab_start, self.vocab_stop

    @property
    def ff_width(self) -> int:
        return self.ff_stop - self.ff_start

    @property
    def vocab_width(self) -> int:
        return self.vocab_stop - self.vocab_start


@dataclass(frozen=True)
class Cut:
    """How a node gets a tensor: ROWS or COLS [start, stop) in values, FULL, or ROOT (root only)."""

    kind: Split
    start: int = 0
    stop: int = 0


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
            valid = [n for n in range(1, config.n_heads + 1) if not _problem(config, n)]
            raise PlanError(f"cannot split this model over {n_nodes} nodes: {problem}; "
                            f"node counts that work: {', '.join(map(str, valid))}")
        ff_unit = BLOCK if config.weight_float_type.block_values > 1 else 1
        kv, q = _head_ranges(config, n_nodes, shares)
        ff = _split(config.ff_dim, n_nodes, shares, ff_unit)
        vocab = _split(config.vocab_size, n_nodes, shares)
        nodes = tuple(
            NodeSlice(i, kv[i][0], kv[i][1], ff[i][0], ff[i][1], vocab[i][0], vocab[i][1],
                      config.head_dim, q[i][0], q[i][1])
            for i in range(n_nodes)
        )
        return Plan(config, nodes)

    @cached_property
    def specs(self) -> dict[str, TensorSpec]:
        """Every tensor of the model by name (structure.tensor_specs), in file order."""
        return {spec.name: spec for spec in tensor_specs(self.config)}

    def cut(self, name: str, node: int) -> Cut:
        """How node `node` holds tensor `name`, by the split its role declares (structure.py)."""
        spec = self.specs.get(name)
        if spec is None or spec.role is None:
            raise KeyError(f"the plan does not know tensor {name!r}")
        split, axis = spec.role.split, spec.role.axis
        if axis is None:
            return Cut(split)
        start, stop = self.nodes[node].range(axis)
        return Cut(split, start, stop)

    def holds(self, name: str, node: int) -> bool:
        """Whether node `node` holds any of tensor `name`."""
        return self.cut(name, node).kind is not Split.ROOT or node == 0

    def slice_shape(self, name: str, shape: tuple[int, int], node: int) -> tuple[int, int]:
        """The (rows, cols) in values of node `node`'s part of a tensor of `shape`."""
        cut = self.cut(name, node)
        if cut.kind is Split.ROWS:
            return cut.stop - cut.start, shape[1]
        if cut.kind is Split.COLS:
            return shape[0], cut.stop - cut.start
        return shape

    def node_weight_bytes(self, node: int) -> int:
        """Bytes of weights node `node` holds (the embedding counts for the root only)."""
        total = 0
        for spec in self.specs.values():
            if not self.holds(spec.name, node):
                continue
            rows, cols = self.slice_shape(spec.name, spec.shape, node)
            total += spec.float_type.tensor_bytes(rows, cols)
        return total

    def embedding_bytes(self) -> int:
        """Bytes of the embedding table (held by the root, memory-mapped)."""
        return self.specs["embedding"].nbytes

    def node_kv_cache_bytes(self, node: int, seq_len: int) -> int:
        """Bytes of node `node`'s KV cache (f32 keys and values) for `seq_len` positions."""
        s = self.nodes[node]
        return 2 * self.config.n_layers * seq_len * s.n_kv_heads * s.head_dim * 4

    def describe(self, seq_len: int, addresses: list[str] | None = None, slots: int = 1) -> str:
        """A table of the plan: per node its heads, feed-forward rows, vocabulary rows and RAM
        (the KV cache of `slots` sequences of `seq_len` positions included)."""
        c = self.config
        each = self.node_kv_cache_bytes(0, seq_len) / 2**20
        kv = f"{seq_len} positions" if slots == 1 else \
            f"{slots} sequences x {seq_len} positions (root: {each:.1f} MiB each)"
        lines = [f"plan: {self.n_nodes} node(s), {c.n_heads} heads / {c.n_kv_heads} KV heads, "
                 f"feed-forward {c.ff_dim}, vocabulary {c.vocab_size}, KV cache for {kv}"]
        for s in self.nodes:
            where = "root" if s.index == 0 else "worker"
            if addresses and 0 < s.index < len(addresses):
                where += f" {addresses[s.index]}"
            # The root reads embedding rows from the mapped file as tokens need them: not in RAM.
            embedding = self.embedding_bytes() if s.index == 0 else 0
            ram = self.node_weight_bytes(s.index) - embedding + self.node_kv_cache_bytes(s.index, seq_len) * slots
            lines.append(
                f"  node {s.index} ({where}): KV heads {s.kv_start}-{s.kv_stop - 1}, "
                f"query heads {s.q_start}-{s.q_stop - 1}, "
                f"ff rows {s.ff_start}-{s.ff_stop - 1} ({s.ff_width}), "
                f"vocab {s.vocab_start}-{s.vocab_stop - 1}, RAM {ram / 2**20:.1f} MiB"
                + (f" (+ the {embedding / 2**20:.{0 if embedding >= 10 * 2**20 else 1}f} MiB embedding, "
                   "read from the file as needed)"
                   if embedding else "")
            )
        return "\n".join(lines)


AUTO_SHARE_STEPS = 20  # --shares auto rounds every node's share to 1/20 of the whole


MEMORY_HEADROOM = 0.9  # --shares auto plans at most this part of a node's available RAM


def auto_shares(speeds: list[float], memories: list[int | None] | None = None, need: int = 0,
                names: list[str] | None = None) -> list[float]:
    """Shares in proportion to the nodes' speeds, rounded to 5% steps (at least one step each):
    measurements move a little from run to run, and a plan that stays the same keeps using the
    workers' slice caches. With `memories` (bytes each node has available, None if unknown) and
    `need` (bytes the whole model needs: weights and KV cache), no node gets more of the model
    than 90% of its RAM holds; the rest goes to the others, again by speed. Raises PlanError
    when all of them together cannot hold it."""
    n = len(speeds)
    speeds = [x if math.isfinite(x) and x > 0 else 1.0 for x in speeds]  # a failed probe counts as slow
    if min(speeds) < max(speeds) * 1e-3:  # no node below 0.1% of the fastest
        speeds = [max(x, max(speeds) * 1e-3) for x in speeds]
    caps = [float("inf")] * n
    if memories and need > 0:
        caps = [MEMORY_HEADROOM * m / need if m else float("inf") for m in memories]
        if sum(min(cap, 1.0) for cap in caps) < 1.0:
            have = " ".join(f"{(names or [str(i) for i in range(n)])[i]} {m / 2**30:.1f} GiB"
                            for i, m in enumerate(memories) if m)
            raise PlanError(f"the model needs {need / 2**30:.1f} GiB (weights and KV cache) and the nodes have "
                            f"less than that available together ({have}; {MEMORY_HEADROOM:.0%} of it is planned): "
                            "add a node or use a shorter --max-seq-len")
    fixed: dict[int, float] = {}  # nodes held to what their RAM allows
    while True:
        rest = [i for i in range(n) if i not in fixed]
        left = 1.0 - sum(fixed.values())
        speed = sum(speeds[i] for i in rest)
        part = {i: left * speeds[i] / speed for i in rest}
        over = [i for i in rest if part[i] > caps[i]]
        if not over:
            break
        fixed.update({i: caps[i] for i in over})
    part.update(fixed)
    # Capped nodes round down, so that rounding never hands a node more than its RAM holds.
    return [float(max(1, int(AUTO_SHARE_STEPS * part[i]) if i in fixed else round(AUTO_SHARE_STEPS * part[i])))
            for i in range(n)]


def _head_ranges(config: ModelConfig, n_nodes: int, shares: Sequence[float] | None = None
                 ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Every node's KV heads and query heads. Up to n_kv_heads nodes: whole KV heads each, with
    their query heads. Beyond: every node one KV head, the nodes sharing a KV head (each computes
    it: its wk and wv rows are small) splitting its query heads."""
    groups = config.n_kv_groups
    if n_nodes <= config.n_kv_heads:
        kv = _split(config.n_kv_heads, n_nodes, shares)
        return kv, [(a * groups, b * groups) for a, b in kv]
    sharing = [stop - start for start, stop in split_evenly(n_nodes, config.n_kv_heads)]  # nodes per KV head
    kv, q, node = [], [], 0
    for head, count in enumerate(sharing):
        part = None if shares is None else shares[node:node + count]
        for a, b in _split(groups, count, part):
            kv.append((head, head + 1))
            q.append((head * groups + a, head * groups + b))
        node += count
    return kv, q


def _problem(config: ModelConfig, n_nodes: int, shares: Sequence[float] | None = None) -> str | None:
    """Why `n_nodes` (with `shares`) cannot run `config`, or None when it can."""
    if n_nodes < 1:
        return "a cluster needs at least one node"
    if n_nodes > config.n_heads:
        return f"every node must own at least one query head and the model has {config.n_heads}"
    quantized = config.weight_float_type in (FloatType.Q40, FloatType.Q80)
    if quantized:
        for start, stop in _head_ranges(config, n_nodes, shares)[1]:
            if ((stop - start) * config.head_dim) % BLOCK:
                return (f"a node's share of wo would be {(stop - start) * config.head_dim} columns, "
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
    if cut.kind is Split.ROWS:
        return stored[cut.start:cut.stop]
    if cut.kind is Split.COLS:
        per = float_type.block_values
        unit = float_type.block_bytes // float_type.storage_dtype.itemsize
        return np.ascontiguousarray(stored[:, cut.start // per * unit:cut.stop // per * unit])
    return stored
