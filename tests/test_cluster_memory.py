"""What a cluster keeps in memory: the root lets go of the mapped model once the slices are
shipped, and a worker holds its slice once."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
from cluster_helpers import WorkerProcess, make_engine, quiet, resident_bytes_of_mapping

from dllama_py.cluster.root import cluster_engine
from dllama_py.commands.demo import demo_config
from dllama_py.engine.exchange import ARGMAX
from dllama_py.formats.model_file import write_model
from dllama_py.model.structure import tensor_specs


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_root_lets_go_of_the_mapped_model_once_slices_are_shipped(stories, workers):
    """Shipping slices reads the whole model through the root's mapping; those pages are let go,
    and so are the root's own once copied, so its memory holds its own slice only (copied)."""
    model, _ = stories
    engine = make_engine(model, workers, 3)
    try:
        engine.step([1, 2, 3], 0, ARGMAX)
        resident = resident_bytes_of_mapping(model)
    finally:
        engine.close()
    # what a step reads back: the header and a few embedding rows (the kernel maps 64 kB around a fault)
    assert resident <= 128 * 1024 < model.stat().st_size / 4, resident


def rss_anon(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status")
def test_worker_holds_its_slice_once(tmp_path):
    """A worker's memory grows by about its slice during a session: the slices it receives are
    regrouped in place, not copied (which once kept twice the slice for the whole session)."""
    config = dataclasses.replace(demo_config(), dim=1024, hidden_dim=4096, n_heads=16, n_kv_heads=4, n_layers=4)
    model = tmp_path / "wide.m"
    rng = np.random.default_rng(0)
    write_model(model, config, ((s.name, rng.standard_normal(s.shape, dtype=np.float32) * 0.05)
                                for s in tensor_specs(config)))
    worker = WorkerProcess()
    try:
        before = rss_anon(worker.proc.pid)
        engine = cluster_engine(model, [worker.address], threads=1, log=quiet, progress=False, max_seq_len=64)
        try:
            engine.step([1, 2, 3], 0, ARGMAX)
            slice_bytes = engine.plan.node_weight_bytes(1)
            grown = rss_anon(worker.proc.pid) - before
        finally:
            engine.close()
    finally:
        worker.stop()
    assert slice_bytes > 15 * 2**20
    assert grown < 1.35 * slice_bytes, (grown / 2**20, slice_bytes / 2**20)
