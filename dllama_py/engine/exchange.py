"""What of the logits travels to the root after a step, and how the root puts it together.

Every node holds the classifier rows of its vocabulary slice. Sampling rarely needs every
logit (distributed-llama sends them all, about 250 KB per token for a 128k vocabulary):
- ARGMAX (greedy): each node sends its best (value, id): 8 bytes;
- TOPK (temperature + top-p): each node sends its K most likely tokens with their scaled
  logits, the maximum and the softmax normaliser of its slice (8K + 12 bytes); the root gets
  the exact probabilities of those tokens and samples exactly when the nucleus lies inside
  them, else asks for FULL;
- FULL: each node's whole slice (4 bytes per logit).
Every reply ends with the node's network counters (bytes sent and received so far), so the
root can report the traffic of every node. `Exchange` is the one implementation: every node
(a worker replying, the root collecting, one node alone) encodes its part with `part`, the
transport gathers the parts at the root, and the root reads them with `combine`. What a step
asks for is a `Readout`: the mode, whether every row's logits are kept, and the sampling
settings the nodes apply before choosing their candidates (temperature, vocabulary limit).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from dllama_py.model.plan import Plan


class LogitsMode(IntEnum):
    """What a worker sends back after a step."""

    NONE = 0  # nothing (a prompt batch whose logits nobody needs)
    ARGMAX = 1  # (max value f32, index i32) of its classifier slice for the last row
    FULL = 2  # its whole classifier slice, f32, for the rows the step asked for
    TOPK = 3  # its most likely tokens and softmax normaliser (see below)

VALUE_ID = struct.Struct("<fi")  # a logit (scaled for TOPK) and its global token id
TOPK_TAIL = struct.Struct("<fff")  # max of scaled logits, sum of exp(scaled - max), tokens in the slice
TOPK = 64
COUNTERS = struct.Struct("<QQd")  # bytes sent, bytes received, seconds waited in syncs, by the node so far


class NonFiniteLogits(RuntimeError):
    """A forward pass gave NaN or infinite logits: nothing can be sampled from this step. The
    engine itself is sound (every node took part in the step and the exchange), so one request
    fails, not the engine. The usual cause is a model whose weights hold NaN or Inf (convert-hf
    refuses those unless --allow-non-finite), or values beyond what its float type holds.
    A RuntimeError like engine.EngineError, which this module cannot import (engine.py imports it)."""

    def __init__(self, where: str) -> None:
        super().__init__(f"the forward pass produced non-finite logits (NaN or infinity) {where}: the model's "
                         "weights may hold NaN or Inf, or its values overflow; nothing can be sampled from them")


def layout(sizes: list[int]) -> tuple[list[int], list[int]]:
    """Gather offsets for per-node reply sizes (plus the counters), in node order."""
    sizes = [n + COUNTERS.size for n in sizes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return offsets, sizes


def with_counters(payload: bytes, sent: int, received: int, waited_s: float) -> bytes:
    """A node's reply: its payload followed by its network counters and its time spent waiting
    for the other nodes in syncs."""
    return payload + COUNTERS.pack(sent, received, waited_s)


def counters_of(buf: np.ndarray, offsets: list[int], sizes: list[int]) -> list[tuple[int, int, float]]:
    """Every node's (bytes sent, bytes received, seconds waited) from a gathered reply buffer."""
    return [COUNTERS.unpack_from(buf, o + n - COUNTERS.size) for o, n in zip(offsets, sizes)]


def encode_argmax(row: np.ndarray, vocab_start: int, vocab_limit: int) -> bytes:
    """Best (value, global id below vocab_limit) of one node's logits row; the first index wins ties."""
    usable = min(len(row), vocab_limit - vocab_start)
    if usable <= 0:
        return VALUE_ID.pack(float("-inf"), vocab_start)
    best = int(np.argmax(row[:usable]))
    return VALUE_ID.pack(float(row[best]), vocab_start + best)


def encode_topk(row: np.ndarray, vocab_start: int, vocab_limit: int, temperature: float) -> bytes:
    """The K most likely tokens of one node's slice (scaled by 1/temperature, ids global and
    below vocab_limit), padded with id -1, then the slice's max, normaliser and token count."""
    usable = max(0, min(len(row), vocab_limit - vocab_start))
    scaled = row[:usable].astype(np.float64) / temperature
    out = bytearray()
    if usable:
        k = min(TOPK, usable)
        top = np.argpartition(-scaled, k - 1)[:k]
        top = top[np.lexsort((top, -scaled[top]))]
        m = float(scaled.max())
        s = float(np.exp(scaled - m).sum())
        for i in top:
            out += VALUE_ID.pack(float(scaled[i]), vocab_start + int(i))
    else:
        k, m, s = 0, float("-inf"), 0.0
    out += VALUE_ID.pack(float("-inf"), -1) * (TOPK - k)
    out += TOPK_TAIL.pack(m, s, float(usable))
    return bytes(out)


def best_of(buf: np.ndarray, offsets: list[int]) -> int:
    """The global argmax from every node's ARGMAX reply (ties go to the lowest id); raises
    NonFiniteLogits when a node's best is NaN or infinite (its argmax finds a NaN first) or no
    node has a finite one. A node whose slice lies past the vocabulary limit sends -inf."""
    candidates = [VALUE_ID.unpack_from(buf, o) for o in offsets]
    for node, (v, _) in enumerate(candidates):
        if math.isnan(v) or v == math.inf:
            raise NonFiniteLogits(f"on node {node}")
    value = max(v for v, _ in candidates)
    if value == -math.inf:
        raise NonFiniteLogits("on every node")
    return min(i for v, i in candidates if v == value)


class Candidates:
    """The root's view of a TOPK gather: candidate ids with their exact probabilities."""

    def __init__(self, buf: np.ndarray, offsets: list[int]) -> None:
        ids, values, tails = [], [], []
        for o in offsets:
            for j in range(TOPK):
                v, i = VALUE_ID.unpack_from(buf, o + j * VALUE_ID.size)
                if i >= 0:
                    ids.append(i)
                    values.append(v)
            tails.append(TOPK_TAIL.unpack_from(buf, o + TOPK * VALUE_ID.size))
        for node, (m, s, n) in enumerate(tails):  # a NaN or inf anywhere in a slice makes its max or sum one
            if n > 0 and not (math.isfinite(m) and math.isfinite(s) and s > 0):
                raise NonFiniteLogits(f"on node {node}")
        if any(math.isnan(v) or v == math.inf for v in values):
            raise NonFiniteLogits("among the top tokens")
        live = [(m, s, n) for m, s, n in tails if n > 0]
        if not live:
            raise NonFiniteLogits("on every node (no token below the vocabulary limit)")
        top = max(m for m, _, _ in live)
        z = sum(s * np.exp(m - top) for m, s, _ in live)
        self.ids = np.asarray(ids, dtype=np.int64)
        self.probs = np.exp(np.asarray(values, dtype=np.float64) - top) / z
        # the most likely token a node did not send: at most its K-th candidate
        bounds = []
        start = 0
        for (m, s, n), o in zip(tails, offsets):
            sent = min(TOPK, int(n))
            if n > sent:
                kth = VALUE_ID.unpack_from(buf, o + (sent - 1) * VALUE_ID.size)[0]
                bounds.append(float(np.exp(kth - top) / z))
            start += sent
        self.unsent_bound = max(bounds, default=0.0)
        self.every_token_sent = not bounds


@dataclass(frozen=True)
class Readout:
    """What a step keeps of its logits: `mode`, the logits of every row (`all_rows`, FULL only)
    or of the last, and for TOPK and ARGMAX the sampling settings every node applies to its
    slice: logits scaled by 1/temperature, ids at or above `vocab_limit` ignored (0: none)."""

    mode: LogitsMode = LogitsMode.FULL
    all_rows: bool = False
    temperature: float = 1.0
    vocab_limit: int = 0

    def __post_init__(self) -> None:
        if self.all_rows and self.mode != LogitsMode.FULL:
            raise ValueError("the logits of every row travel only in full (LogitsMode.FULL)")
        if not self.temperature > 0:  # also refuses NaN
            raise ValueError(f"a readout's temperature must be positive, got {self.temperature}")


NO_LOGITS = Readout(LogitsMode.NONE)
FULL = Readout()
ALL_ROWS = Readout(all_rows=True)
ARGMAX = Readout(LogitsMode.ARGMAX)


@dataclass
class Collected:
    """What the root made of every node's part: the best token (ARGMAX), the candidates (TOPK)
    or the logits (FULL: (rows, vocab)), and every node's counters (bytes sent, bytes received,
    seconds waited in syncs, so far)."""

    argmax: int | None = None
    candidates: Candidates | None = None
    logits: np.ndarray | None = None
    counters: list[tuple[int, int, float]] | None = None


@dataclass(frozen=True)
class Segment:
    """The rows of one sequence in a step: its KV-cache `slot`, the `position` of its first row,
    how many `rows`, and what of their logits the step keeps (`readout`). A step is a list of
    segments, its rows their rows in order: one sequence's prompt chunk, or one token of each of
    many sequences (continuous batching)."""

    slot: int
    position: int
    rows: int
    readout: Readout = NO_LOGITS

    @property
    def logit_rows(self) -> int:
        """How many rows of logits the nodes compute for this segment."""
        if self.readout.mode == LogitsMode.NONE:
            return 0
        return self.rows if self.readout.all_rows else 1


class Exchange:
    """The logits exchange of one plan, seen from node `node`."""

    def __init__(self, plan: Plan, node: int) -> None:
        self.plan, self.node = plan, node
        self.vocab_start = plan.nodes[node].vocab_start

    def limit(self, readout: Readout) -> int:
        """The vocabulary limit a readout applies (the whole vocabulary when it sets none)."""
        return readout.vocab_limit or self.plan.config.vocab_size

    def _part_size(self, segment: Segment, node: int) -> int:
        mode = segment.readout.mode
        if mode == LogitsMode.ARGMAX:
            return VALUE_ID.size
        if mode == LogitsMode.TOPK:
            return TOPK * VALUE_ID.size + TOPK_TAIL.size
        if mode == LogitsMode.FULL:
            return segment.logit_rows * self.plan.nodes[node].vocab_width * 4
        return 0

    def layout(self, segments: list[Segment]) -> tuple[list[int], list[int]]:
        """Every node's (offset, size) in the gathered buffer of a step: the parts of every
        segment in order, then the node's counters."""
        return layout([sum(self._part_size(seg, n) for seg in segments) for n in range(self.plan.n_nodes)])

    def part(self, segments: list[Segment], logits: np.ndarray, counters: tuple[int, int, float]) -> bytes:
        """This node's part from its logits slice (the logit rows of every segment in order,
        (rows, V_node)), with its counters."""
        out, row = [], 0
        for seg in segments:
            rows = logits[row:row + seg.logit_rows]
            row += seg.logit_rows
            readout = seg.readout
            if readout.mode == LogitsMode.ARGMAX:
                out.append(encode_argmax(rows[-1], self.vocab_start, self.limit(readout)))
            elif readout.mode == LogitsMode.TOPK:
                out.append(encode_topk(rows[-1], self.vocab_start, self.limit(readout), readout.temperature))
            elif readout.mode == LogitsMode.FULL:
                out.append(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
        return with_counters(b"".join(out), *counters)

    def combine(self, segments: list[Segment], buf: np.ndarray) -> list[Collected]:
        """The root's reading of the gathered parts of every node, one Collected per segment (each
        with every node's counters); raises NonFiniteLogits when what it reads holds NaN or
        infinity (the best value, the top tokens and every slice's maximum and normaliser, or
        every logit)."""
        offsets, sizes = self.layout(segments)
        counters = counters_of(buf, offsets, sizes)
        cursor = list(offsets)  # where each node's next segment part starts
        out = []
        for seg in segments:
            here = list(cursor)
            for n in range(self.plan.n_nodes):
                cursor[n] += self._part_size(seg, n)
            collected = Collected(counters=counters)
            mode = seg.readout.mode
            if mode == LogitsMode.ARGMAX:
                collected.argmax = best_of(buf, here)
            elif mode == LogitsMode.TOPK:
                collected.candidates = Candidates(buf, here)
            elif mode == LogitsMode.FULL:
                parts = [buf[o:o + self._part_size(seg, n)].view(np.float32).reshape(seg.logit_rows, -1)
                         for n, o in enumerate(here)]
                for node, part in enumerate(parts):
                    if not np.isfinite(part).all():
                        raise NonFiniteLogits(f"on node {node}")
                collected.logits = parts[0].copy() if len(parts) == 1 else np.concatenate(parts, axis=1)
            out.append(collected)
        return out
