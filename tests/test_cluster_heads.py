"""More nodes than KV heads: stories260K has 8 query heads and 4 KV heads; on 5, 6 and 8 nodes
the nodes that share a KV head each compute it and split its query heads. The f32 logits equal
one node's within 1e-5 and the greedy text is llama2.c's."""

from __future__ import annotations

import numpy as np
import pytest
from cluster_helpers import WorkerProcess, make_engine

from dllama_py.engine.engine import Engine
from dllama_py.engine.exchange import ALL_ROWS
from dllama_py.engine.sampler import Sampler
from dllama_py.generation.generator import Generator
from dllama_py.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def seven_workers():
    procs = [WorkerProcess() for _ in range(7)]
    yield procs
    for w in procs:
        w.stop()


@pytest.mark.parametrize("nodes", [5, 6, 8])
def test_more_nodes_than_kv_heads(stories, seven_workers, reference, nodes):
    model, tok = stories
    tokens = [1] + np.random.default_rng(nodes).integers(3, 512, size=20).tolist()
    single = Engine(model, threads=1, log=lambda _: None)
    single.step(tokens, 0, ALL_ROWS)
    want = single.logits().copy()
    single.close()
    engine = make_engine(model, seven_workers, nodes)
    try:
        assert {s.n_kv_heads for s in engine.plan.nodes} == {1} and len(engine.plan.nodes) == nodes
        assert len({s.kv_start for s in engine.plan.nodes}) == 4  # some nodes share a KV head
        engine.step(tokens, 0, ALL_ROWS)
        got = engine.logits().copy()
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
        tokenizer = Tokenizer.load(tok)
        generator = Generator(engine, tokenizer)
        for case in reference[:2]:
            generator.reset()
            result = generator.generate(tokenizer.encode(case["prompt"]), case["num_generated"], Sampler(0.0),
                                        stop_ids=[1])
            assert result.generated_ids == case["generated_ids"], case["prompt"]
    finally:
        engine.close()
