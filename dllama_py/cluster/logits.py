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
root can report the traffic of every node. Worker and root compute the same gather layouts
from the plan.
"""

from __future__ import annotations

import struct

import numpy as np

from dllama_py.plan import Plan

ARGMAX = struct.Struct("<fi")  # value, global id
TOPK_TAIL = struct.Struct("<fff")  # max of scaled logits, sum of exp(scaled - max), tokens in the slice
TOPK = 64
COUNTERS = struct.Struct("<QQd")  # bytes sent, bytes received, seconds waited in syncs, by the node so far


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


def argmax_layout(n_nodes: int) -> tuple[list[int], list[int]]:
    return layout([ARGMAX.size] * n_nodes)


def topk_layout(n_nodes: int) -> tuple[list[int], list[int]]:
    return layout([TOPK * ARGMAX.size + TOPK_TAIL.size] * n_nodes)


def full_layout(plan: Plan, rows: int) -> tuple[list[int], list[int]]:
    return layout([rows * s.vocab_width * 4 for s in plan.nodes])


def encode_argmax(row: np.ndarray, vocab_start: int, vocab_limit: int) -> bytes:
    """Best (value, global id below vocab_limit) of one node's logits row; the first index wins ties."""
    usable = min(len(row), vocab_limit - vocab_start)
    if usable <= 0:
        return ARGMAX.pack(float("-inf"), vocab_start)
    best = int(np.argmax(row[:usable]))
    return ARGMAX.pack(float(row[best]), vocab_start + best)


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
            out += ARGMAX.pack(float(scaled[i]), vocab_start + int(i))
    else:
        k, m, s = 0, float("-inf"), 0.0
    out += ARGMAX.pack(float("-inf"), -1) * (TOPK - k)
    out += TOPK_TAIL.pack(m, s, float(usable))
    return bytes(out)


def best_of(buf: np.ndarray, offsets: list[int]) -> int:
    """The global argmax from every node's ARGMAX reply (ties go to the lowest id)."""
    candidates = [ARGMAX.unpack_from(buf, o) for o in offsets]
    value = max(v for v, _ in candidates)
    return min(i for v, i in candidates if v == value)


class Candidates:
    """The root's view of a TOPK gather: candidate ids with their exact probabilities."""

    def __init__(self, buf: np.ndarray, offsets: list[int]) -> None:
        ids, values, tails = [], [], []
        for o in offsets:
            for j in range(TOPK):
                v, i = ARGMAX.unpack_from(buf, o + j * ARGMAX.size)
                if i >= 0:
                    ids.append(i)
                    values.append(v)
            tails.append(TOPK_TAIL.unpack_from(buf, o + TOPK * ARGMAX.size))
        live = [(m, s, n) for m, s, n in tails if n > 0]
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
                kth = ARGMAX.unpack_from(buf, o + (sent - 1) * ARGMAX.size)[0]
                bounds.append(float(np.exp(kth - top) / z))
            start += sent
        self.unsent_bound = max(bounds, default=0.0)
        self.every_token_sent = not bounds
