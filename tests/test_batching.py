"""Several sequences in one step (continuous batching's mechanism): each in its own KV-cache slot,
at its own position, with its own readout, while the weights are read once for all of them.

A sequence's logits in a batched step equal those of the same sequence run alone within 1e-5
relative (the batch kernels may sum in another order), and its greedy and sampled tokens are the
same, on one node and on clusters of 2 and 3 nodes (stories260K, f32 buffers).
"""

from __future__ import annotations

import numpy as np
import pytest
from cluster_helpers import make_engine

from dllama_py.engine.engine import Engine, EngineError
from dllama_py.engine.exchange import FULL, Readout
from dllama_py.engine.sampler import Sampler
from dllama_py.text.tokenizer import Tokenizer

PROMPTS = ["Once upon a time", "The cat sat on the", "Lily and Tom went to the park and"]
STEPS = 12


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def lone_run(engine: Engine, ids: list[int]) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and every step's logits of one sequence alone, in slot 0."""
    engine.step(ids, 0, FULL)
    tokens, logits = [], []
    for i in range(STEPS):
        row = engine.logits().copy()
        logits.append(row)
        tokens.append(int(np.argmax(row)))
        engine.step([tokens[-1]], len(ids) + i, FULL)
    return tokens, logits


def batched_run(engine: Engine, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[np.ndarray]]]:
    """The same, every sequence in its own slot: all prompts in one step, then one row each per step."""
    engine.step_batch([(slot, 0, ids, FULL) for slot, ids in enumerate(prompts)])
    tokens: list[list[int]] = [[] for _ in prompts]
    logits: list[list[np.ndarray]] = [[] for _ in prompts]
    for i in range(STEPS):
        for index in range(len(prompts)):
            row = engine.logits(index).copy()
            logits[index].append(row)
            tokens[index].append(int(np.argmax(row)))
        engine.step_batch([(slot, len(ids) + i, [tokens[slot][-1]], FULL) for slot, ids in enumerate(prompts)])
    return tokens, logits


@pytest.fixture(scope="module")
def prompts(stories) -> list[list[int]]:
    tokenizer = Tokenizer.load(stories[1])
    return [tokenizer.encode(text) for text in PROMPTS]


@pytest.mark.parametrize("nodes", [1, 2, 3])
def test_each_sequence_of_a_batch_equals_its_lone_run(stories, workers, prompts, nodes):
    model = stories[0]
    with make_engine(model, workers, nodes, buffer_type="f32", max_seq_len=128) as engine:
        alone = [lone_run(engine, ids) for ids in prompts]
    with make_engine(model, workers, nodes, buffer_type="f32", max_seq_len=128, slots=4) as engine:
        tokens, logits = batched_run(engine, prompts)
    for index, (lone_tokens, lone_logits) in enumerate(alone):
        assert tokens[index] == lone_tokens, index
        worst = max(relative(a, b) for a, b in zip(logits[index], lone_logits))
        assert worst < 1e-5, (index, worst)


@pytest.mark.parametrize("nodes", [1, 2])
def test_sequences_with_different_readouts_in_one_step(stories, workers, prompts, nodes):
    """Greedy from the nodes' best tokens, nucleus sampling from their top tokens and sampling from
    every logit, side by side: each gives the tokens it gives alone."""
    model = stories[0]
    samplers = [lambda: Sampler(0.0), lambda: Sampler(0.8, 0.9, 7), lambda: Sampler(1.0, 1.0, 3)]

    def alone(engine: Engine, index: int) -> list[int]:
        sampler, ids = samplers[index](), prompts[index]
        readout = engine.readout_for(sampler, 512)
        engine.step(ids, 0, readout)
        out = []
        for i in range(STEPS):
            out.append(engine.next_token(sampler))
            engine.step([out[-1]], len(ids) + i, readout)
        return out

    with make_engine(model, workers, nodes, buffer_type="f32", max_seq_len=128) as engine:
        expected = [alone(engine, i) for i in range(len(prompts))]
    with make_engine(model, workers, nodes, buffer_type="f32", max_seq_len=128, slots=3) as engine:
        live = [s() for s in samplers]
        readouts = [engine.readout_for(s, 512) for s in live]
        assert {r.mode.name for r in readouts} == {"ARGMAX", "TOPK", "FULL"}
        engine.step_batch([(i, 0, ids, readouts[i]) for i, ids in enumerate(prompts)])
        got: list[list[int]] = [[] for _ in prompts]
        for step in range(STEPS):
            for i, sampler in enumerate(live):
                got[i].append(engine.next_token(sampler, i))
            engine.step_batch([(i, len(ids) + step, [got[i][-1]], readouts[i]) for i, ids in enumerate(prompts)])
    assert got == expected


def test_a_slot_keeps_its_sequence_while_others_run(stories, prompts):
    """A sequence paused in slot 0 while slots 1 and 2 run carries on as if alone."""
    with Engine(stories[0], threads=1, buffer_type="f32", max_seq_len=128, log=lambda _: None) as engine:
        lone_tokens, _ = lone_run(engine, prompts[0])
    with Engine(stories[0], threads=1, buffer_type="f32", max_seq_len=128, slots=3, log=lambda _: None) as engine:
        engine.step(prompts[0], 0, FULL, slot=0)
        first = int(np.argmax(engine.logits()))
        engine.step_batch([(1, 0, prompts[1], FULL), (2, 0, prompts[2], FULL)])
        engine.step([first], len(prompts[0]), FULL, slot=0)
        tokens = [first]
        for i in range(1, STEPS):
            tokens.append(int(np.argmax(engine.logits())))
            engine.step([tokens[-1]], len(prompts[0]) + i, FULL, slot=0)
    assert tokens == lone_tokens


def test_bad_batches_are_refused(stories):
    with Engine(stories[0], threads=1, max_seq_len=64, slots=2, log=lambda _: None) as engine:
        for sequences, match in [
            ([(0, 0, [1], FULL), (0, 5, [1], FULL)], "at most once"),
            ([(2, 0, [1], FULL)], "slot 2"),
            ([(0, 0, [], FULL)], "at least one"),
            ([], "1 to"),
            ([(1, 63, [1, 2], FULL)], "do not fit"),
        ]:
            with pytest.raises(EngineError, match=match):
                engine.step_batch(sequences)
        engine.step_batch([(1, 62, [1, 2], Readout())])  # the last positions of slot 1 are fine
    with pytest.raises(EngineError, match="slots"):
        Engine(stories[0], threads=1, slots=0, log=lambda _: None)


def test_the_batcher_gives_what_the_generator_gives(stories):
    """Five requests (greedy and seeded samples, stop tokens, a stop string) through three slots with
    chunked prefill give the texts and finish reasons Generator.generate gives for each alone."""
    from dllama_py.generation.batch import Batcher, Request
    from dllama_py.generation.generator import Generator

    tokenizer = Tokenizer.load(stories[1])
    texts = ["Once upon a time", "The cat sat on the", "Lily and Tom", "A big dog", "Tim had a red ball"]

    def sampler(i: int) -> Sampler:
        return Sampler(0.0) if i % 2 == 0 else Sampler(0.9, 0.9, 100 + i)

    stops = ([], ["park"], [], [" the"], [])
    with Engine(stories[0], threads=1, log=lambda _: None) as engine:
        alone = [Generator(engine, tokenizer).generate(tokenizer.encode(t), 40, sampler(i), stop_ids=[2],
                                                       stop_strings=stops[i]) for i, t in enumerate(texts)]
    done: dict[int, object] = {}
    with Engine(stories[0], threads=1, slots=3, log=lambda _: None) as engine:
        batcher = Batcher(engine, tokenizer, nbatches=4)
        queue = list(enumerate(texts))
        while queue or batcher.active:
            while queue and batcher.free_slots:
                i, text = queue.pop(0)
                batcher.start(Request(tokenizer.encode(text), 40, sampler(i), stop_ids=[2], stop_strings=stops[i],
                                      on_done=lambda result, i=i: done.__setitem__(i, result)))
            batcher.step()
    assert [done[i].text for i in range(len(texts))] == [r.text for r in alone]
    assert [done[i].finish_reason for i in range(len(texts))] == [r.finish_reason for r in alone]
    assert [done[i].generated_ids for i in range(len(texts))] == [r.generated_ids for r in alone]
    assert {r.finish_reason for r in alone} == {"stop", "length"}


@pytest.mark.parametrize("nodes", [1, 2])
def test_sequences_with_one_prompt_evaluate_it_once(stories, workers, nodes):
    """Four seeded samples of one long prompt (the n choices of a request): the first evaluates
    the prompt, the others copy its slot's keys and values on every node (COPY), evaluate only the
    last prompt token, and give what each gives alone."""
    from dllama_py.generation.batch import Batcher, Request
    from dllama_py.generation.generator import Generator

    tokenizer = Tokenizer.load(stories[1])
    prompt = tokenizer.encode("Once upon a time, there was a little girl named Lily. She loved to play outside")
    samplers = [lambda i=i: Sampler(1.0, 0.95, 40 + i) for i in range(4)]
    with Engine(stories[0], threads=1, log=lambda _: None, buffer_type="f32") as engine:
        alone = [Generator(engine, tokenizer).generate(prompt, 20, s(), stop_ids=[2]) for s in samplers]
    engine = make_engine(stories[0], workers, nodes, slots=4, buffer_type="f32")
    rows = []
    step_batch = engine.step_batch
    engine.step_batch = lambda sequences: rows.append(sum(len(t) for _, _, t, _ in sequences)) or step_batch(sequences)
    try:
        done: dict[int, object] = {}
        batcher = Batcher(engine, tokenizer, nbatches=8)
        for i, s in enumerate(samplers):
            batcher.start(Request(prompt, 20, s(), stop_ids=[2], on_done=lambda r, i=i: done.__setitem__(i, r)))
        while batcher.active:
            batcher.step()
    finally:
        engine.close()
    assert [done[i].generated_ids for i in range(4)] == [r.generated_ids for r in alone]
    assert len({tuple(r.generated_ids) for r in alone}) > 1  # the samples differ: each has its own slot
    assert [done[i].prompt_tokens_evaluated for i in range(4)] == [len(prompt), 1, 1, 1]
    assert sum(rows) == len(prompt) + 3 + sum(len(done[i].generated_ids) for i in range(4)) - \
        sum(1 for i in range(4) if len(done[i].generated_ids) == 20)


def test_automatic_slot_count_follows_the_ram_left_after_the_weights(stories):
    """slots="auto" (dllama-api without --parallel): as many KV slots as half of the RAM left after
    the weights holds on every node, from 4 to 8; the least roomy node decides."""
    from dllama_py.engine.engine import auto_slots
    from dllama_py.formats.model_file import read_model
    from dllama_py.model.plan import Plan

    with read_model(stories[0]) as model:
        config = model.config
    plan = Plan.make(config, 2)
    weights = plan.node_weight_bytes(1)
    per_slot = plan.node_kv_cache_bytes(1, 256)
    assert auto_slots(config, plan, 256, [None, weights + 2 * 6 * per_slot])[0] == 6
    assert auto_slots(config, plan, 256, [None, weights + 2 * 100 * per_slot])[0] == 8
    assert auto_slots(config, plan, 256, [None, weights + per_slot])[0] == 4
    assert auto_slots(config, plan, 256, [1 << 40, weights + 2 * 5 * per_slot])[0] == 5
    assert auto_slots(config, plan, None, [None, None])[0] == 4
    with Engine(stories[0], threads=1, slots="auto", log=lambda _: None) as engine:
        assert 4 <= engine.slots <= 8
