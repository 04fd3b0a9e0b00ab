"""Log-probabilities, against transformers and against the log-softmax of the engine's own logits,
on one node and on a cluster (where they come from every node's top tokens, reduced at the root).

The compat llama-tiny model (f32, transformers' own weights, testdata/compat) scores a prompt:
every token's log-probability given the tokens before it equals transformers' log-softmax within
1e-3. While generating, a sampler that asks for log-probabilities gets the chosen token's and the
top 5's: the same whether they are read from the nodes' top tokens (greedy, or temperature 1) or
from every logit (another temperature, or penalties), and the same on 1 and 2 nodes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cluster_helpers import WorkerProcess, make_engine
from conftest import TESTDATA
from hf_reference import hf_logits, load_hf

from dllama_py.engine.engine import Engine
from dllama_py.engine.exchange import LogitsMode
from dllama_py.engine.sampler import Penalties, Sampler
from dllama_py.generation.generator import Generator
from dllama_py.text.tokenizer import Tokenizer

COMPAT = TESTDATA / "compat"
MODEL = COMPAT / "dllama" / "dllama_model_llama-tiny_f32.m"
TOKENIZER = COMPAT / "dllama" / "dllama_tokenizer_tok512.t"
PROMPT = [1, 82, 113, 102, 104, 35, 120, 115, 114, 113, 35, 100, 35, 119, 108, 112, 104]  # 'Once upon a time'


def log_softmax(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    top = row.max()
    return row - (top + np.log(np.exp(row - top).sum()))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load(TOKENIZER)


def test_prompt_logprobs_equal_transformers(tokenizer):
    torch.set_num_threads(1)
    reference = np.stack([log_softmax(r) for r in hf_logits(load_hf(COMPAT / "hf" / "llama-tiny"), PROMPT)])
    with Engine(MODEL, threads=1, buffer_type="f32", max_seq_len=64, log=lambda _: None) as engine:
        generator = Generator(engine, tokenizer, nbatches=5)  # several batches: rows of every one
        scored = generator.prompt_logprobs(PROMPT, 5)
    assert scored[0] is None and len(scored) == len(PROMPT)
    for pos in range(1, len(PROMPT)):
        entry, expected = scored[pos], reference[pos - 1]
        assert entry.token == PROMPT[pos]
        assert abs(entry.logprob - expected[PROMPT[pos]]) < 1e-3
        top_ids = [i for i, _ in entry.top]
        assert top_ids == list(np.argsort(-expected, kind="stable")[:5])
        np.testing.assert_allclose([v for _, v in entry.top], expected[top_ids], atol=1e-3)


def generate_with_logprobs(engine: Engine, tokenizer: Tokenizer, sampler: Sampler, steps: int = 12):
    """Tokens, their log-probabilities, and the log-softmax of every logit at each step."""
    generator = Generator(engine, tokenizer)
    events, full = [], []
    real_logprobs = engine.logprobs

    def logprobs_and_reference(token, top):
        entry = real_logprobs(token, top)
        full.append(log_softmax(engine._full_logits()[-1]))  # fetched after: the entry came from what the step kept
        return entry

    engine.logprobs = logprobs_and_reference
    try:
        generator.generate(PROMPT, steps, sampler, stop_ids=[], on_token=lambda e: events.append(e))
    finally:
        del engine.logprobs
    events = [e for e in events if e.id >= 0]
    return events, full


SAMPLERS = {
    "greedy": lambda: Sampler(0.0, logprobs=5),
    "temperature 1, top-p": lambda: Sampler(1.0, 0.9, 7, logprobs=5),
    "temperature 0.7 (every logit)": lambda: Sampler(0.7, 0.9, 7, logprobs=5),
    "greedy with a penalty (every logit)": lambda: Sampler(0.0, penalties=Penalties(frequency=0.5), logprobs=5),
}
EXPECTED_READOUT = {"greedy": LogitsMode.TOPK, "temperature 1, top-p": LogitsMode.TOPK,
                    "temperature 0.7 (every logit)": LogitsMode.FULL,
                    "greedy with a penalty (every logit)": LogitsMode.FULL}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_generated_logprobs_equal_the_log_softmax_of_the_logits(tokenizer, name):
    with Engine(MODEL, threads=1, buffer_type="f32", max_seq_len=64, log=lambda _: None) as engine:
        assert engine.readout_for(SAMPLERS[name](), 512).mode == EXPECTED_READOUT[name]
        events, full = generate_with_logprobs(engine, tokenizer, SAMPLERS[name]())
    assert len(events) == 12
    for event, reference in zip(events, full):
        entry = event.logprobs
        assert entry.token == event.id
        assert abs(entry.logprob - reference[event.id]) < 1e-6
        top_ids = [i for i, _ in entry.top]
        assert top_ids == list(np.argsort(-reference, kind="stable")[:5])
        np.testing.assert_allclose([v for _, v in entry.top], reference[top_ids], atol=1e-6)
    if name.startswith("greedy"):
        assert all(e.logprobs.top[0][0] == e.id for e in events)


def test_logprobs_on_two_nodes_equal_one_node(tokenizer):
    with Engine(MODEL, threads=1, buffer_type="f32", max_seq_len=64, log=lambda _: None) as engine:
        alone, _ = generate_with_logprobs(engine, tokenizer, Sampler(1.0, 0.9, 3, logprobs=5))
    worker = WorkerProcess()
    try:
        with make_engine(MODEL, [worker], 2, buffer_type="f32", max_seq_len=64) as engine:
            together, _ = generate_with_logprobs(engine, tokenizer, Sampler(1.0, 0.9, 3, logprobs=5))
    finally:
        worker.stop()
    assert [e.id for e in together] == [e.id for e in alone]
    for a, b in zip(alone, together):
        assert abs(a.logprobs.logprob - b.logprobs.logprob) < 1e-5
        assert [i for i, _ in a.logprobs.top] == [i for i, _ in b.logprobs.top]
        np.testing.assert_allclose([v for _, v in a.logprobs.top], [v for _, v in b.logprobs.top], atol=1e-5)
