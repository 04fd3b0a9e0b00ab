"""The slicing plan (dllama_py/plan.py): every row of every tensor belongs to exactly one node
(or to all, for the tensors every node holds), for even splits and for weighted `shares`."""

from __future__ import annotations

import numpy as np
import pytest

from dllama_py.model.config import ArchType, FloatType, ModelConfig
from dllama_py.model.plan import Plan, PlanError, split_evenly, split_weighted
from dllama_py.model.structure import Split, tensor_specs


def llama(weight_type: FloatType = FloatType.Q40, n_kv_heads: int = 8, **kw) -> ModelConfig:
    args = dict(arch=ArchType.LLAMA, dim=512, hidden_dim=1408, n_layers=2, n_heads=16, n_kv_heads=n_kv_heads,
                vocab_size=1000, max_seq_len=256, weight_float_type=weight_type, rope_theta=10000)
    args.update(kw)
    return ModelConfig(**args)


def covered_once(ranges: list[tuple[int, int]], total: int, unit: int = 1) -> bool:
    """The ranges are contiguous, start at 0, end at the last whole unit, each is non-empty."""
    return (ranges[0][0] == 0 and ranges[-1][1] == total // unit * unit
            and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            and all(stop > start and (stop - start) % unit == 0 for start, stop in ranges))


@pytest.mark.parametrize("shares", [[1, 1], [2, 1], [1, 3], [5, 1, 1], [1, 2, 1], [1, 1, 1, 100], [0.3, 0.7]])
@pytest.mark.parametrize("total,unit", [(8, 1), (1000, 1), (1408, 32), (8192, 32)])
def test_weighted_split_covers_everything_once_in_proportion(shares, total, unit):
    ranges = split_weighted(total, shares, unit)
    assert len(ranges) == len(shares) and covered_once(ranges, total, unit)
    units = total // unit
    for (start, stop), share in zip(ranges, shares):
        ideal = units * share / sum(shares)
        # the largest remainder method: within one unit of the ideal, except where the minimum of
        # one unit per range had to be taken from the others
        assert abs((stop - start) // unit - ideal) < 1 + len(shares), (ranges, shares)


def test_equal_shares_split_like_split_evenly():
    config = llama()
    for n in (1, 2, 3, 4, 8):
        assert Plan.make(config, n, [2.5] * n) == Plan.make(config, n)
    assert split_weighted(1408, [1, 1, 1], 32) == split_evenly(1408, 3, 32)


def test_two_to_one_gives_the_root_about_two_thirds():
    plan = Plan.make(llama(), 2, [2, 1])
    root, worker = plan.nodes
    assert (root.n_kv_heads, worker.n_kv_heads) == (5, 3)  # 8 heads: 5.33 / 2.67
    assert root.ff_width == 928 and worker.ff_width == 480  # 44 blocks: 29.33 / 14.67 -> 29 / 15
    assert (root.vocab_width, worker.vocab_width) == (667, 333)
    assert plan.node_weight_bytes(0) > 1.8 * plan.node_weight_bytes(1)


@pytest.mark.parametrize("weight_type", [FloatType.F32, FloatType.Q40])
@pytest.mark.parametrize("n,shares", [(1, None), (2, None), (3, None), (2, [3, 1]), (3, [1, 2, 1]), (4, [1, 1, 1, 9])])
def test_every_row_of_every_tensor_has_exactly_one_owner(weight_type, n, shares):
    config = llama(weight_type)
    plan = Plan.make(config, n, shares)
    for spec in tensor_specs(config):
        rows, cols = spec.shape
        owners = np.zeros((rows, cols), dtype=np.int32)
        for node in range(n):
            cut = plan.cut(spec.name, node)
            if cut.kind is Split.ROWS:
                owners[cut.start:cut.stop] += 1
            elif cut.kind is Split.COLS:
                owners[:, cut.start:cut.stop] += 1
                if weight_type == FloatType.Q40:
                    assert cut.start % 32 == 0 and cut.stop % 32 == 0, (spec.name, cut)
            elif cut.kind is Split.FULL:
                owners += 1 if node == 0 else 0  # held by every node; counted once
            else:  # the root's alone (the embedding): every node sees the same answer
                assert cut.kind is Split.ROOT
                owners += 1 if node == 0 else 0
        assert (owners == 1).all(), spec.name


@pytest.mark.parametrize("shares,message", [
    ([1], "one number per node"),
    ([1, 2, 3], "one number per node"),
    ([1, 0], "positive"),
    ([1, -2], "positive"),
    ([1, float("nan")], "positive"),
    (["a", 1], "numbers"),
    (5, "numbers"),
])
def test_bad_shares_are_refused_with_the_reason(shares, message):
    with pytest.raises(PlanError, match=message):
        Plan.make(llama(), 2, shares)


def test_more_nodes_than_query_heads_is_refused_with_the_counts_that_work():
    with pytest.raises(PlanError, match="at least one query head and the model has 16"):
        Plan.make(llama(n_kv_heads=4), 17)
    # f32: any count up to the query heads; q40: wo's columns of a node must be whole blocks
    # (head_dim 32: any), so here every count works too
    with pytest.raises(PlanError, match="node counts that work: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16"):
        Plan.make(llama(n_kv_heads=4), 17)


@pytest.mark.parametrize("nodes", [5, 6, 8, 12, 16])
def test_more_nodes_than_kv_heads_share_kv_heads_and_split_their_query_heads(nodes):
    """Each node computes one KV head (wk, wv rows shared with the nodes beside it) and a part of
    its query heads; every query head, feed-forward row and vocabulary row is held exactly once."""
    config = llama(n_kv_heads=4)  # 16 query heads, 4 per KV head
    plan = Plan.make(config, nodes)
    groups = config.n_kv_groups
    assert covered_once([(s.q_start, s.q_stop) for s in plan.nodes], config.n_heads)
    for s in plan.nodes:
        assert s.n_kv_heads == 1 and s.n_heads >= 1
        assert s.q_start // groups == s.kv_start and (s.q_stop - 1) // groups == s.kv_start  # its own KV head's
    assert {s.kv_start for s in plan.nodes} == set(range(config.n_kv_heads))  # every KV head is computed
    assert covered_once([(s.ff_start, s.ff_stop) for s in plan.nodes], config.ff_dim, 32)


def test_auto_shares_are_rounded_to_steady_5_percent_steps():
    from dllama_py.model.plan import auto_shares

    assert auto_shares([35.0, 35.0]) == [10.0, 10.0]
    assert auto_shares([48.0, 32.0]) == auto_shares([47.0, 33.0]) == auto_shares([49.0, 31.0]) == [12.0, 8.0]
    assert auto_shares([1000.0, 30.0, 30.0]) == [19.0, 1.0, 1.0]
    assert auto_shares([100.0, 0.1]) == [20.0, 1.0]  # every node keeps a share
    assert auto_shares([0.0, 0.0]) == auto_shares([float("nan"), float("inf")]) == [10.0, 10.0]  # failed probes


def test_the_plan_table_counts_the_mapped_embedding_apart_from_the_roots_ram():
    config = llama(FloatType.Q40)
    plan = Plan.make(config, 2)
    root_line, worker_line = plan.describe(64, ["root", "10.0.0.2:9998"]).splitlines()[1:]
    embedding = config.vocab_size * config.dim * 4  # f32 rows, read from the file as tokens need them
    root_ram = plan.node_weight_bytes(0) - embedding + plan.node_kv_cache_bytes(0, 64)
    assert f"RAM {root_ram / 2**20:.1f} MiB (+ the {embedding / 2**20:.1f} MiB embedding" in root_line  # < 10 MiB
    worker_ram = plan.node_weight_bytes(1) + plan.node_kv_cache_bytes(1, 64)
    assert worker_line.endswith(f"RAM {worker_ram / 2**20:.1f} MiB")


def test_auto_shares_hold_a_fast_node_with_little_ram_to_what_it_can_hold():
    from dllama_py.model.plan import auto_shares

    GiB = 2**30
    # the root is 3x faster but has 2 GiB for a 10 GiB model: it gets at most 90% of 2 GiB
    shares = auto_shares([30.0, 10.0], [2 * GiB, 64 * GiB], 10 * GiB)
    assert shares == [3.0, 16.0]  # root capped at 18% -> 15% (rounded down), the worker gets the rest
    assert shares[0] / sum(shares) <= 0.9 * 2 / 10
    # RAM to spare everywhere: speed alone decides; unknown RAM (None) is not a limit
    assert auto_shares([30.0, 10.0], [64 * GiB, 64 * GiB], 10 * GiB) == [15.0, 5.0]
    assert auto_shares([30.0, 10.0], [None, None], 10 * GiB) == [15.0, 5.0]
    # two capped nodes, the third takes the rest
    assert auto_shares([10.0, 10.0, 1.0], [2 * GiB, 2 * GiB, 64 * GiB], 10 * GiB) == [3.0, 3.0, 13.0]


def test_auto_shares_refuse_a_model_the_nodes_cannot_hold_together():
    from dllama_py.model.plan import auto_shares

    GiB = 2**30
    with pytest.raises(PlanError, match=r"needs 10.0 GiB .*\(root 4.0 GiB worker 4.0 GiB.*add a node"):
        auto_shares([1.0, 1.0], [4 * GiB, 4 * GiB], 10 * GiB, ["root", "worker"])
