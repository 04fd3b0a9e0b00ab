"""How a cluster's work is divided: node counts the model cannot be cut for, --shares auto from
every node's measured speed, and per-node wait times that tell which node holds the others up."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import numpy as np
from cluster_helpers import REPO, WorkerProcess, quiet

from dllama_py.cluster.root import cluster_engine
from dllama_py.commands.demo import demo_config
from dllama_py.engine.exchange import ARGMAX
from dllama_py.formats.model_file import write_model
from dllama_py.model.structure import tensor_specs


def test_impossible_node_count_is_refused_with_what_would_work(stories):
    model, tok = stories
    out = subprocess.run([sys.executable, "-m", "dllama_py.commands.cli", "inference", "--model", str(model), "--tokenizer",
                          str(tok), "--prompt", "x", "--steps", "1", "--workers"]
                         + [f"127.0.0.1:{9000 + i}" for i in range(8)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 1  # stories260K has 8 query heads: 9 nodes cannot each own one
    assert "9 nodes" in out.stderr and "1, 2, 3, 4, 5, 6, 7, 8" in out.stderr and "Traceback" not in out.stderr


def test_the_fast_node_is_the_one_that_waits(tmp_path):
    """Per-node wait times tell which node holds the others up: with a worker forced onto the
    scalar SIMD path (several times slower), the root waits and the worker hardly does."""
    config = dataclasses.replace(demo_config(), dim=1024, hidden_dim=4096, n_heads=16, n_kv_heads=4, n_layers=2)
    model = tmp_path / "wide.m"
    rng = np.random.default_rng(0)
    write_model(model, config, ((s.name, rng.standard_normal(s.shape, dtype=np.float32) * 0.05)
                                for s in tensor_specs(config)))
    worker = WorkerProcess(extra_env={"DLLAMA_ISA": "scalar"})
    try:
        engine = cluster_engine(model, [worker.address], threads=1, log=quiet, progress=False, max_seq_len=64)
        try:
            engine.step([1, 2, 3], 0, ARGMAX)
            waits = [engine.step([engine.argmax()], 3 + i, ARGMAX).node_wait_ms for i in range(5)]
        finally:
            engine.close()
    finally:
        worker.stop()
    root_wait, worker_wait = (sum(w[i] for w in waits) for i in (0, 1))
    # the scalar worker is several times slower, so the root waits most; on a busy machine both
    # may also wait for the CPU, so only the order is asserted
    assert root_wait > worker_wait, (root_wait, worker_wait)


def test_auto_shares_follow_every_nodes_measured_speed(stories, workers, monkeypatch):
    """--shares auto: every worker reports the matmul speed it measured at startup; the root adds
    its own (here pretended to be 1000 GB/s) and weighs the plan by them."""
    from dllama_py.model import kernels

    model, _ = stories
    reported = [float(re.search(r"matmul speed ([\d.]+) GB/s", w.wait_for_line("listening on")).group(1))
                for w in workers[:2]]
    assert all(x > 0 for x in reported)
    monkeypatch.setattr(kernels, "measure_matmul_speed", lambda: 1000.0)
    lines: list[str] = []
    engine = cluster_engine(model, [w.address for w in workers[:2]], threads=1, log=lines.append, progress=False,
                           buffer_type="f32", shares="auto")
    try:
        # the root's share rounded to 5% steps, each worker at least one step (they are far slower)
        expected = f"shares {round(20 * 1000 / (1000 + sum(reported)))} 1 1"
        assert any("matmul speed" in line and "root 1000.0" in line and expected in line for line in lines), lines
        root, *rest = engine.plan.nodes
        assert all(root.ff_width > 5 * s.ff_width and s.ff_width > 0 for s in rest), engine.plan.nodes
        engine.step([1, 403], 0, ARGMAX)
        assert engine.argmax() == 407
    finally:
        engine.close()
    # The same fast root with (pretended) next to no free RAM: it keeps the least share it can
    # (one 5% step); the workers, which reported their real RAM in the handshake, take the rest.
    from dllama_py.engine import engine as engine_module

    monkeypatch.setattr(engine_module, "known_available_memory", lambda: 1)
    engine = cluster_engine(model, [w.address for w in workers[:2]], threads=1, log=quiet, progress=False,
                           buffer_type="f32", shares="auto")
    try:
        root, *rest = engine.plan.nodes
        assert all(root.ff_width < s.ff_width for s in rest), engine.plan.nodes
        engine.step([1, 403], 0, ARGMAX)
        assert engine.argmax() == 407
    finally:
        engine.close()
