"""`dllama worker --model-dir DIR`: a worker that has the root's model file reads its slices
from it and receives no weight bytes; without a matching file it receives them as before.
Real worker processes on 127.0.0.1, real roots (cluster_engine).

Shipped bytes are the root's mesh counter at the end of loading (before the engine resets it):
what the root sent its worker, weights included."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cluster_helpers import REPO, WorkerProcess
from dllama_py.converter.gguf_tokenizer import read_tokenizer

from dllama_py.cluster import model_dir
from dllama_py.cluster.model_dir import ModelDir, ModelDirError
from dllama_py.cluster.root import ClusterTransport, cluster_engine
from dllama_py.cluster.slice_cache import model_fingerprint
from dllama_py.engine.engine import open_model
from dllama_py.engine.exchange import ALL_ROWS
from dllama_py.engine.sampler import Sampler
from dllama_py.formats.model_file import read_model
from dllama_py.generation.generator import Generator
from dllama_py.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def folder(stories, testdata, tmp_path_factory) -> Path:
    """Two real models (a .m and the F32 GGUF of stories260K), a K-quant GGUF and junk."""
    d = tmp_path_factory.mktemp("models")
    shutil.copy(stories[0], d / "stories.m")
    (d / "stories.gguf").symlink_to(testdata / "stories260K" / "stories260K.gguf")
    (d / "spm.gguf").symlink_to(testdata / "gguf" / "llama-spm-q4_k_m.gguf")
    (d / "junk.m").write_bytes(b"not a model" * 100)
    (d / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 200)
    (d / "empty.gguf").write_bytes(b"")
    (d / "gone.m").symlink_to(d / "nowhere")
    (d / "notes.txt").write_text("not looked at")
    return d


@pytest.fixture(scope="module")
def local(folder, tmp_path_factory):
    """A worker with that folder, and a slice cache that a model file takes precedence over."""
    cache = tmp_path_factory.mktemp("cache")
    worker = WorkerProcess(extra=["--model-dir", str(folder), "--cache-dir", str(cache)])
    worker.cache = cache
    yield worker
    worker.stop()


@pytest.fixture
def shipped(monkeypatch) -> list[int]:
    """Filled with the bytes every root of the test sent on its mesh up to its workers' LOADED."""
    sent: list[int] = []
    wait_loaded = ClusterTransport.wait_loaded

    def spy(self):
        sent.append(self.mesh.bytes_sent)
        wait_loaded(self)

    monkeypatch.setattr(ClusterTransport, "wait_loaded", spy)
    return sent


def greedy_text(model: Path, tokenizer: Tokenizer, worker: WorkerProcess, reference: list[dict]) -> list[str]:
    """Every reference prompt greedy-decoded on root + worker equals llama2.c's; the root's log."""
    lines: list[str] = []
    engine = cluster_engine(model, [worker.address], threads=1, log=lines.append, progress=False)
    try:
        generator = Generator(engine, tokenizer)
        for case in reference:
            generator.reset()
            ids = tokenizer.encode(case["prompt"], add_bos=tokenizer.add_bos)
            assert ids == case["prompt_ids_with_bos"]
            result = generator.generate(ids, case["num_generated"], Sampler(0.0), stop_ids=[1])
            assert result.generated_ids == case["generated_ids"], case["prompt"]
        worker_bytes = engine.plan.node_weight_bytes(1)
    finally:
        engine.close()
    return lines + [f"worker bytes {worker_bytes}"]


def read_locally(lines: list[str]) -> bool:
    return any(line.startswith("node 1 ") and "from its own disk" in line and "nothing shipped" in line
               for line in lines)


def weight_bytes(lines: list[str]) -> int:
    return int(lines[-1].split()[-1])


@pytest.mark.parametrize("name", ["stories.m", "stories.gguf"])
def test_worker_with_the_model_file_receives_no_weights(stories, folder, local, shipped, reference, name):
    model = folder / name
    tokenizer = Tokenizer.load(stories[1]) if name.endswith(".m") else read_tokenizer(model)[0]
    start = len(local.lines)
    lines = greedy_text(model.resolve(), tokenizer, local, reference)
    assert read_locally(lines), lines
    assert shipped == [0], shipped  # not one byte on the mesh before LOADED
    read = local.wait_for_line("MiB of weights from", after=start)
    assert f"read {weight_bytes(lines) / 2**20:.1f} MiB of weights from {folder / name}" in read, read
    assert not any("received" in line for line in local.lines[start:]), local.lines[start:]
    assert list(local.cache.iterdir()) == []  # the model file wins over the slice cache: nothing stored


@pytest.mark.parametrize("weight_type", [None, "q80"])
def test_a_gguf_is_matched_as_the_root_opened_it(testdata, folder, local, shipped, weight_type):
    """A K-quant GGUF has another config for every --weight-type; the worker opens it as the root
    did (the Q4_K matrices in q40 or in q80): the same logits as a worker that received its slices."""
    model = testdata / "gguf" / "llama-spm-q4_k_m.gguf"
    tokens = [1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203]
    plain = WorkerProcess()
    logits, logs = [], []
    try:
        for worker in (local, plain):
            lines: list[str] = []
            engine = cluster_engine(model, [worker.address], threads=1, log=lines.append, progress=False,
                                    weight_type=weight_type, max_seq_len=64, buffer_type="f32")
            try:
                engine.step(tokens, 0, ALL_ROWS)
                logits.append(engine.logits().copy())
            finally:
                engine.close()
            logs.append(lines)
    finally:
        plain.stop()
    assert read_locally(logs[0]) and not read_locally(logs[1])
    assert shipped[0] == 0 and shipped[1] > 1 << 20, shipped
    assert np.array_equal(logits[0], logits[1])
    described = "spm.gguf" + (f" (as --weight-type {weight_type})" if weight_type else "") + ";"
    local.wait_for_line(f"the root's model is {described}")


def test_junk_is_skipped_and_fingerprints_are_read_once(stories, folder, local, reference):
    for name in ("junk.m", "junk.gguf", "empty.gguf", "gone.m"):
        local.wait_for_line(f"model dir: skipping {name}: ")
    assert not any("notes.txt" in line or "Traceback" in line for line in local.lines)
    local.wait_for_line("model dir: stories.m: fingerprint")
    local.wait_for_line("model file(s), fingerprinted in")
    assert any("3 model file(s)" in line for line in local.lines), local.lines
    greedy_text(stories[0], Tokenizer.load(stories[1]), local, reference[:1])
    sessions = sum("finished; waiting" in line for line in local.lines)
    assert sessions >= 1 and local.alive()
    for name in ("stories.m", "stories.gguf", "spm.gguf", "junk.m", "junk.gguf", "gone.m"):  # once, not per session
        assert sum(f"model dir: {name}: fingerprint" in line or f"skipping {name}:" in line
                   for line in local.lines) == 1, name


def test_another_model_in_the_folder_is_shipped_as_before(stories, tmp_path, shipped, reference):
    """A copy of the model with one weight changed has another fingerprint: the worker says so and
    receives its slices; the text is still llama2.c's."""
    model, tok = stories
    data = bytearray(model.read_bytes())
    with read_model(model) as m:
        offset = m.tensors["layers.2.w2"].offset  # the first bytes of a tensor are always sampled
    data[offset] ^= 0x40
    (tmp_path / "other.m").write_bytes(bytes(data))
    worker = WorkerProcess(extra=["--model-dir", str(tmp_path)])
    try:
        lines = greedy_text(model, Tokenizer.load(tok), worker, reference)
        worker.wait_for_line("model dir: no model file in")
        worker.wait_for_line("received")
    finally:
        worker.stop()
    assert not read_locally(lines)
    assert shipped[0] >= weight_bytes(lines) > 0, shipped


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_bad_model_dir_is_refused_at_start(tmp_path, kind):
    path = tmp_path / "nothing"
    if kind == "file":
        path.write_text("x")
    run = subprocess.run([sys.executable, "-m", "dllama_py.commands.cli", "worker", "--port", "0",
                          "--model-dir", str(path)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 1
    want = "does not exist" if kind == "missing" else "is not a folder"
    assert run.stderr.splitlines() == [f"error: --model-dir: {path} {want}"], run.stderr


def test_fingerprints_are_kept_by_path_size_and_time(stories, tmp_path, monkeypatch):
    """A second scan reads nothing; a touched file is read again, a changed one gets its new
    fingerprint, and each matches what a root computes for the same file."""
    copy = tmp_path / "a.m"
    shutil.copy(stories[0], copy)
    calls: list[str] = []
    real = model_dir.model_fingerprint
    monkeypatch.setattr(model_dir, "model_fingerprint", lambda m: calls.append(m) or real(m))
    folder = ModelDir(tmp_path, log=lambda message: None)
    with open_model(stories[0]) as m:
        root_id = model_fingerprint(m)
    assert folder.find(root_id).path == copy and len(calls) == 1
    assert folder.find(root_id) is not None and folder.find("0" * 40) is None and len(calls) == 1
    os.utime(copy, ns=(0, 10**18))
    assert folder.find(root_id) is not None and len(calls) == 2
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    assert folder.find(root_id) is None and len(calls) == 3
    with open_model(copy) as m:
        assert folder.find(model_fingerprint(m)).path == copy
    with pytest.raises(ModelDirError, match="is not a folder"):
        ModelDir(copy)
