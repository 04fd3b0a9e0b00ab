"""The cluster computes what one node does: llama2.c's text with stories260K on 1-4 nodes (also
with weighted --shares, without spinning, and for two roots in a row), f32 logits equal within 1e-5,
distributed-llama's own q40 logits on 2 and 4 nodes, the same sampled tokens at a temperature."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from cluster_helpers import REPO, WorkerProcess, make_engine, quiet

from dllama_py.cluster.root import cluster_engine
from dllama_py.engine.engine import Engine
from dllama_py.engine.exchange import ALL_ROWS
from dllama_py.engine.sampler import Sampler
from dllama_py.generation.generator import Generator
from dllama_py.text.tokenizer import Tokenizer


@pytest.mark.parametrize("nodes", [1, 2, 3, 4])
def test_greedy_text_equals_llama2c_on_any_node_count(stories, workers, reference, nodes):
    model, tok = stories
    tokenizer = Tokenizer.load(tok)
    engine = make_engine(model, workers, nodes)
    try:
        generator = Generator(engine, tokenizer)
        for case in reference:
            generator.reset()
            ids = tokenizer.encode(case["prompt"])
            assert ids == case["prompt_ids_with_bos"]
            result = generator.generate(ids, case["num_generated"], Sampler(0.0), stop_ids=[1])
            assert result.generated_ids == case["generated_ids"], case["prompt"]
    finally:
        engine.close()


@pytest.mark.parametrize("nodes,shares", [(2, None), (3, None), (4, None), (2, [3, 1]), (3, [1, 2, 1]),
                                          (4, [1, 1, 1, 5])])
def test_f32_logits_on_n_nodes_equal_one_node(stories, workers, nodes, shares):
    """Any node count, with even or weighted slices (--shares), computes what one node does."""
    model, _ = stories
    rng = np.random.default_rng(nodes)
    tokens = [1] + rng.integers(3, 512, size=40).tolist()
    single = Engine(model, threads=1)
    single.step(tokens[:32], 0, ALL_ROWS)
    want = [single.logits().copy()]
    single.step(tokens[32:], 32, ALL_ROWS)
    want.append(single.logits().copy())
    single.close()
    engine = make_engine(model, workers, nodes, shares=shares)
    if shares is not None:
        assert len({s.ff_width for s in engine.plan.nodes}) > 1  # the slices really differ
    try:
        engine.step(tokens[:32], 0, ALL_ROWS)
        got = [engine.logits().copy()]
        engine.step(tokens[32:], 32, ALL_ROWS)
        got.append(engine.logits().copy())
    finally:
        engine.close()
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert np.max(np.abs(a - b)) <= 1e-5 * max(1.0, float(np.max(np.abs(b))))


# distributed-llama's own q40 files, q80 buffers, fed exactly the tokens it fed.
# Measured here (max |ours - distributed-llama| over every step, logits of magnitude 8-10):
# llama-tiny 0.068 / 0.062, qwen3-tiny 0.104, qwen3moe-tiny 0.073 on 2 nodes. That is the q80
# rounding noise: distributed-llama's own q40 logits move by up to 0.18 when only the node
# count changes (compat/README.md), i.e. when the same activations are rounded in other slices.
# The bound is that spread; the greedy token must agree wherever the top-2 margin exceeds twice
# the difference at that step (where no rounding difference can flip it).
Q40_LOGIT_BOUND = 0.18


@pytest.mark.parametrize("model_name", ["llama-tiny", "qwen3-tiny", "qwen3moe-tiny"])
@pytest.mark.parametrize("nodes,sync", [(2, "allgather"), (4, "allgather"), (4, "reducescatter")])
def test_compat_q40_logits_match_distributed_llama_on_n_nodes(testdata, workers, model_name, nodes, sync,
                                                               monkeypatch):
    """distributed-llama's own q40 logits (q80 buffers). Its sync is an all-gather; 4 nodes also
    run this project's default there, reduce-scatter then all-gather, which rounds each sum to
    q80 a second time (measured: medians 0.05-0.11 instead of 0.04-0.09, one MoE router
    near-tie 0.31): its bounds are 0.13 for the median and 0.35 for a MoE outlier."""
    monkeypatch.setenv("DLLAMA_SYNC", sync)  # the root decides; SETUP tells the workers
    median_bound, moe_outlier = (0.1, 0.3) if sync == "allgather" else (0.13, 0.35)
    manifest = json.loads((testdata / "compat" / "manifest.json").read_text())
    cases = [c for c in manifest["cases"] if c["model"] == model_name and c["weights"] == "q40"
             and c["nodes"] == nodes and c["dllama_exit_code"] == 0]
    assert cases, f"no compat case for {model_name} on {nodes} nodes"
    engine = make_engine(testdata / "compat" / c_file(cases[0]), workers, nodes, buffer_type="q80")
    try:
        for case in cases:
            prompt = case["prompt_ids_dllama"]
            fed, positions = case["dllama_fed_tokens"], case["dllama_positions"]
            want = np.load(testdata / "compat" / case["dllama_logits_file"])
            engine.step(prompt[:-1], 0)
            diffs: list[float] = []
            for step, (token, pos) in enumerate(zip(fed, positions)):
                engine.step([token], pos)
                got = engine.logits()
                diff = float(np.max(np.abs(got - want[step])))
                diffs.append(diff)
                top2 = np.sort(want[step])[-2:]
                if top2[1] - top2[0] > 2 * diff:  # only then can no rounding flip the greedy token
                    assert int(np.argmax(got)) == case["dllama_generated_ids"][step]
            outliers = [d for d in diffs if d > Q40_LOGIT_BOUND]
            if model_name == "qwen3moe-tiny":
                # A router near-tie can pick another expert for one token in one layer after a
                # different rounding (measured once: 0.257 at one step of 'The cat sat' on 2 nodes).
                assert len(outliers) <= 1 and max(diffs) <= moe_outlier, (case["prompt"], diffs)
            else:
                assert not outliers, (case["prompt"], diffs)
            assert float(np.median(diffs)) <= median_bound, (case["prompt"], diffs)
    finally:
        engine.close()


def c_file(case: dict) -> str:
    return case["model_file"]


def test_two_roots_one_after_another_use_the_same_workers(stories, workers):
    model, tok = stories
    tokenizer = Tokenizer.load(tok)
    texts = []
    for _ in range(2):
        engine = make_engine(model, workers, 3)
        texts.append(Generator(engine, tokenizer).generate(tokenizer.encode("The cat"), 12, Sampler(0.0)).text)
        engine.close()
    assert texts[0] == texts[1] and texts[0]


def test_cluster_without_spinning_gives_the_same_text(stories, reference):
    """DLLAMA_NET_SPIN_US=0 (sleep in poll() at once) on root and worker changes nothing but timing."""
    model, tok = stories
    tokenizer = Tokenizer.load(tok)
    worker = WorkerProcess(extra_env={"DLLAMA_NET_SPIN_US": "0"})
    try:
        os.environ["DLLAMA_NET_SPIN_US"] = "0"
        try:
            engine = cluster_engine(model, [worker.address], threads=1, log=quiet, progress=False)
        finally:
            del os.environ["DLLAMA_NET_SPIN_US"]
        assert engine.transport.mesh.spin_us == 0
        try:
            generator = Generator(engine, tokenizer)
            for case in reference:
                generator.reset()
                result = generator.generate(tokenizer.encode(case["prompt"]), case["num_generated"], Sampler(0.0),
                                            stop_ids=[1])
                assert result.generated_ids == case["generated_ids"], case["prompt"]
        finally:
            engine.close()
    finally:
        worker.stop()


def test_shares_flag_weights_the_plan_and_keeps_the_text(stories, workers, reference):
    model, tok = stories
    base = [sys.executable, "-m", "dllama_py.commands.cli", "inference", "--model", str(model), "--tokenizer", str(tok),
            "--prompt", "Once upon a time", "--steps", "20", "--temperature", "0", "--nthreads", "1"]
    out = subprocess.run(base + ["--workers", workers[0].address, "--shares", "3", "1"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(reference[0]["text"][:40])
    assert "node 0 (root): KV heads 0-2," in out.stderr and "node 1 (worker" in out.stderr and "KV heads 3-3" in out.stderr
    for extra, message in [(["--shares", "1", "2"], "give --workers too"),
                           (["--workers", workers[0].address, "--shares", "1"], "one number per node"),
                           (["--workers", workers[0].address, "--shares", "1", "0"], "positive")]:
        bad = subprocess.run(base + extra, capture_output=True, text=True, cwd=REPO, timeout=60)
        assert bad.returncode != 0 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


@pytest.mark.parametrize("nodes", [2, 3])
@pytest.mark.parametrize("topp", [0.9, 0.5, 1.0])
def test_temperature_sampling_on_a_cluster_picks_the_same_tokens_as_one_node(stories, workers, nodes, topp):
    model, tok = stories
    tokenizer = Tokenizer.load(tok)
    prompt = tokenizer.encode("Once upon a time")
    texts = []
    for n in (1, nodes):
        engine = make_engine(model, workers, n)
        try:
            result = Generator(engine, tokenizer).generate(prompt, 48, Sampler(0.8, topp, seed=7), stop_ids=[])
        finally:
            engine.close()
        texts.append(result.generated_ids)
        if n > 1 and topp < 1.0:
            # the nucleus usually lies in the nodes' top tokens: only then no full logits travel
            assert engine.topk_hits > engine.topk_misses
    assert texts[0] == texts[1]
