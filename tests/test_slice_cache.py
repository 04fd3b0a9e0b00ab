"""`dllama worker --cache-dir`: a worker keeps the slices it received and the next root that
runs the same model on the same plan ships it nothing. Real worker processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cluster_helpers import WorkerProcess

from dllama_py.cluster.root import cluster_engine
from dllama_py.cluster.slice_cache import entry_key, model_fingerprint
from dllama_py.engine.sampler import Sampler
from dllama_py.formats.model_file import read_model
from dllama_py.generation.generator import Generator
from dllama_py.model.plan import Plan
from dllama_py.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def reference(testdata: Path) -> dict:
    return json.loads((testdata / "reference" / "stories260K_greedy.json").read_text())["results"][0]


def run(model: Path, tok: Path, workers: list[WorkerProcess], reference: dict) -> list[str]:
    """One root session greedy-decoding the reference prompt; returns the root's log lines."""
    lines: list[str] = []
    engine = cluster_engine(model, [w.address for w in workers], threads=1, log=lines.append, progress=False)
    try:
        tokenizer = Tokenizer.load(tok)
        ids = tokenizer.encode(reference["prompt"])
        result = Generator(engine, tokenizer).generate(ids, reference["num_generated"], Sampler(0.0), stop_ids=[1])
        assert result.generated_ids == reference["generated_ids"]
    finally:
        engine.close()
    return lines


def shipped(lines: list[str], node: int) -> bool:
    return any(line.startswith(f"node {node} ") and "MB/s" in line for line in lines)


def from_cache(lines: list[str], node: int) -> bool:
    return any(line.startswith(f"node {node} ") and "nothing shipped" in line for line in lines)


def test_second_root_ships_nothing_to_a_caching_worker(stories_f32, reference, tmp_path):
    model, tok = stories_f32
    worker = WorkerProcess(extra=["--cache-dir", str(tmp_path / "cache")])
    try:
        first = run(model, tok, [worker], reference)
        assert shipped(first, 1) and not from_cache(first, 1)
        worker.wait_for_line("cache: stored")
        second = run(model, tok, [worker], reference)  # same text, asserted in run()
        assert from_cache(second, 1) and not shipped(second, 1), second
        worker.wait_for_line("from the cache")
    finally:
        worker.stop()
    entries = [p for p in (tmp_path / "cache").iterdir()]
    assert len(entries) == 1 and entries[0].is_dir() and (entries[0] / "entry.json").is_file()


def test_other_plans_and_damaged_entries_are_shipped_again(stories_f32, reference, tmp_path):
    model, tok = stories_f32
    cache = tmp_path / "cache"
    caching, plain = WorkerProcess(extra=["--cache-dir", str(cache)]), WorkerProcess()
    try:
        run(model, tok, [caching], reference)  # node 1 of 2
        caching.wait_for_line("cache: stored")
        three = run(model, tok, [caching, plain], reference)  # node 1 of 3: another slice
        assert shipped(three, 1) and shipped(three, 2)
        assert len(list(cache.iterdir())) == 2
        # damage the 2-node entry: it is deleted and shipped again, and the text stays right
        with read_model(model) as m:
            entry = cache / entry_key(model_fingerprint(m), Plan.make(m.config, 2), 1)
        victim = entry / "layers.0.wq.bin"
        victim.write_bytes(victim.read_bytes()[:100])
        again = run(model, tok, [caching], reference)
        assert shipped(again, 1) and not from_cache(again, 1)
        damaged_at = caching.lines.index(caching.wait_for_line("incomplete or damaged"))
        caching.wait_for_line("cache: stored", after=damaged_at)
        assert from_cache(run(model, tok, [caching], reference), 1)
    finally:
        caching.stop()
        plain.stop()


def test_fingerprint_follows_the_bytes_not_the_path(stories_f32, tmp_path):
    model, _ = stories_f32
    copy = tmp_path / "copy.m"
    shutil.copy(model, copy)
    with read_model(model) as a, read_model(copy) as b:
        assert model_fingerprint(a) == model_fingerprint(b)
    data = bytearray(copy.read_bytes())
    with read_model(copy) as m:
        offset = m.tensors["layers.2.w2"].offset  # the first bytes of a tensor are always sampled
    data[offset] ^= 0x40
    copy.write_bytes(bytes(data))
    with read_model(model) as a, read_model(copy) as b:
        assert model_fingerprint(a) != model_fingerprint(b)


def test_unusable_cache_dir_is_refused_at_start(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    out = subprocess.run([sys.executable, "-m", "dllama_py.commands.cli", "worker", "--host", "127.0.0.1", "--port", "0",
                          "--cache-dir", str(not_a_dir / "sub")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "cannot use" in out.stderr and "Traceback" not in out.stderr, out.stderr


# ---- disk space, unit level ---------------------------------------------------------------------
def fake_entry(cache_dir: Path, name: str, nbytes: int, age_s: float) -> Path:
    import os
    import time

    entry = cache_dir / name
    entry.mkdir()
    (entry / "w.bin").write_bytes(bytes(nbytes))
    (entry / "entry.json").write_text("{}")
    when = time.time() - age_s
    os.utime(entry, (when, when))
    return entry


def test_least_recently_used_entries_make_room_and_the_disk_keeps_its_reserve(tmp_path, monkeypatch):
    from collections import namedtuple

    from dllama_py.cluster import slice_cache

    cache = slice_cache.SliceCache(tmp_path, log=lambda m: None)
    old, middle, new = (fake_entry(tmp_path, n, 1000, age) for n, age in (("old", 300), ("middle", 200), ("new", 100)))
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(slice_cache, "RESERVE_MIN", 0)
    # a 100 kB disk with 6 kB free keeps 5 kB: storing 2.5 kB needs the two oldest entries gone
    monkeypatch.setattr(slice_cache.shutil, "disk_usage", lambda path: Usage(100_000, 94_000, 6_000))
    assert cache.make_room(2_500)
    assert not old.exists() and not middle.exists() and new.exists()
    # more than the disk could ever give: nothing stored, nothing more deleted
    writer = cache.writer("k" * 40, 10**9)
    assert writer.failed and new.exists()
    writer.write("x", np.zeros(4, np.uint8))
    writer.commit()
    assert not (tmp_path / ("k" * 40)).exists()


def test_a_dead_workers_half_written_entry_is_removed_at_start(tmp_path):
    from dllama_py.cluster.slice_cache import SliceCache

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".{'a' * 40}.{int(dead.stdout)}.123.tmp"
    live = tmp_path / f".{'b' * 40}.{os.getpid()}.456.tmp"
    stale.mkdir()
    live.mkdir()
    SliceCache(tmp_path, log=lambda m: None)
    assert not stale.exists() and live.exists()
