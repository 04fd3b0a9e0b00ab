"""Byte-pair merging: repeatedly merge the adjacent pair whose concatenation has the lowest rank.

Ties go to the leftmost pair, as in sentencepiece, tiktoken and Hugging Face tokenizers.
Short inputs use a plain scan (fastest in Python); long ones a heap with lazy invalidation,
O(n log n).
"""

from __future__ import annotations

import heapq

_SCAN_LIMIT = 48


def bpe_merge(parts: list[bytes], ranks: dict[bytes, float]) -> list[bytes]:
    """Merge `parts` (initial symbols, in order) by `ranks`; returns the final symbols."""
    if len(parts) <= _SCAN_LIMIT:
        return _merge_scan(parts, ranks)
    return _merge_heap(parts, ranks)


def _merge_scan(parts: list[bytes], ranks: dict[bytes, float]) -> list[bytes]:
    get = ranks.get
    while len(parts) > 1:
        best_rank = None
        best_index = -1
        for index in range(len(parts) - 1):
            rank = get(parts[index] + parts[index + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_index = rank, index
        if best_index < 0:
            break
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return parts


def _merge_heap(parts: list[bytes], ranks: dict[bytes, float]) -> list[bytes]:
    get = ranks.get
    heappop, heappush = heapq.heappop, heapq.heappush
    count = len(parts)
    next_index = list(range(1, count + 1))
    next_index[-1] = -1
    previous_index = list(range(-1, count - 1))
    alive = [True] * count
    heap = []
    for index in range(count - 1):
        rank = get(parts[index] + parts[index + 1])
        if rank is not None:
            heap.append((rank, index, parts[index], parts[index + 1]))
    heapq.heapify(heap)
    while heap:
        rank, index, left, right = heappop(heap)
        right_index = next_index[index]
        # stale entry: a neighbour was merged since this pair was pushed
        if not alive[index] or right_index < 0 or parts[index] != left or parts[right_index] != right:
            continue
        merged = left + right
        parts[index] = merged
        alive[right_index] = False
        after = next_index[right_index]
        next_index[index] = after
        if after >= 0:
            previous_index[after] = index
            pair_rank = get(merged + parts[after])
            if pair_rank is not None:
                heappush(heap, (pair_rank, index, merged, parts[after]))
        before = previous_index[index]
        if before >= 0:
            pair_rank = get(parts[before] + merged)
            if pair_rank is not None:
                heappush(heap, (pair_rank, before, parts[before], merged))
    return [parts[index] for index in range(count) if alive[index]]
