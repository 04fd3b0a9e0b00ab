"""The cluster from a user's point of view: real worker processes on 127.0.0.1.

Proves tensor parallelism gives the same results as one node (llama2.c's text with stories260K
on 1-4 nodes, f32 logits equal within 1e-5, distributed-llama's own q40 logits on 2 and 4
nodes), and that faults end cleanly: a killed or frozen worker, garbage on a worker's port,
two roots in a row, mismatched secrets.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cluster_helpers import REPO, WorkerProcess, resident_bytes_of_mapping

from dllama_py.cluster import protocol
from dllama_py.cluster.root import cluster_engine
from dllama_py.commands.demo import demo_config
from dllama_py.engine.engine import Engine, EngineError
from dllama_py.engine.exchange import ALL_ROWS, ARGMAX
from dllama_py.engine.sampler import Sampler
from dllama_py.formats.model_file import read_model, write_model
from dllama_py.generation.generator import Generator
from dllama_py.model.config import HeaderKey
from dllama_py.model.plan import Plan, cut_tensor
from dllama_py.model.structure import Split, tensor_specs
from dllama_py.text.tokenizer import Tokenizer


def quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module")
def stories(stories_f32: tuple[Path, Path]) -> tuple[Path, Path]:
    return stories_f32


@pytest.fixture(scope="module")
def workers():
    """Three workers, shared by the tests of this module (each test leaves them waiting)."""
    procs = [WorkerProcess() for _ in range(3)]
    yield procs
    for w in procs:
        w.stop()


def assert_serves_a_real_root(model: Path, tok: Path, worker: WorkerProcess) -> None:
    """The worker (after whatever a test did to it) still runs a real root's greedy generation."""
    engine = cluster_engine(model, [worker.address], threads=1, log=quiet, progress=False)
    try:
        tokenizer = Tokenizer.load(tok)
        result = Generator(engine, tokenizer).generate(tokenizer.encode("Once upon a time"), 5, Sampler(0.0))
    finally:
        engine.close()
    assert result.generated_ids[:3] == [432, 383, 286]


@pytest.fixture(scope="module")
def reference(testdata: Path) -> list[dict]:
    return json.loads((testdata / "reference" / "stories260K_greedy.json").read_text())["results"]


def make_engine(model: Path, workers: list[WorkerProcess], nodes: int, **kw) -> Engine:
    if nodes == 1:
        kw.pop("shares", None)
        return Engine(model, threads=1, **kw)
    return cluster_engine(model, [w.address for w in workers[: nodes - 1]], threads=1, log=quiet, progress=False, **kw)


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
@pytest.mark.parametrize("nodes", [2, 4])
def test_compat_q40_logits_match_distributed_llama_on_n_nodes(testdata, workers, model_name, nodes):
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
                assert len(outliers) <= 1 and max(diffs) <= 0.3, (case["prompt"], diffs)
            else:
                assert not outliers, (case["prompt"], diffs)
            assert float(np.median(diffs)) <= 0.1, (case["prompt"], diffs)
    finally:
        engine.close()


def c_file(case: dict) -> str:
    return case["model_file"]


def test_killed_worker_is_reported_with_its_address_within_10_seconds(stories):
    model, tok = stories
    tokenizer = Tokenizer.load(tok)
    victim, other = WorkerProcess(), WorkerProcess()
    engine = cluster_engine(model, [other.address, victim.address], threads=1, log=quiet, progress=False)
    killed_at: list[float] = []

    def on_token(event) -> None:
        if len(killed_at) == 0 and event.stats is not None:
            victim.proc.send_signal(signal.SIGKILL)
            killed_at.append(time.monotonic())

    try:
        with pytest.raises(EngineError) as error:
            Generator(engine, tokenizer).generate(tokenizer.encode("Once upon a time"), 400, Sampler(0.0),
                                                  stop_ids=[], on_token=on_token)
        elapsed = time.monotonic() - killed_at[0]
        assert elapsed < 10.0
        assert victim.address in str(error.value)
        assert "layer" in str(error.value) or "step" in str(error.value) or "token" in str(error.value)
    finally:
        engine.transport.mesh.close()
        engine.forward.close()
        victim.stop()
    # the surviving worker goes back to waiting and serves the next root
    other.wait_for_line("waiting for the next root")
    assert other.alive()
    again = cluster_engine(model, [other.address], threads=1, log=quiet, progress=False)
    again.step([1, 403], 0, ARGMAX)
    assert again.argmax() == 407
    again.close()
    other.stop()


def test_frozen_worker_stops_the_root_within_10_seconds(stories):
    model, _ = stories
    worker = WorkerProcess()
    engine = cluster_engine(model, [worker.address], threads=1, log=quiet, progress=False)
    try:
        engine.step([1, 403], 0, ARGMAX)
        worker.proc.send_signal(signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(EngineError) as error:
            engine.step([407], 2, ARGMAX)
        assert time.monotonic() - start < 10.0
        assert worker.address in str(error.value) and "timeout" in str(error.value)
    finally:
        worker.proc.send_signal(signal.SIGCONT)
        engine.transport.mesh.close()
        engine.forward.close()
        worker.stop()


def test_net_timeout_flag_sets_how_long_a_frozen_worker_is_waited_for(stories):
    """`dllama chat --net-timeout 1.5`: the root gives up on a frozen worker after 1.5 s (not 8)."""
    model, tok = stories
    worker = WorkerProcess()
    try:
        root = subprocess.Popen([sys.executable, "-m", "dllama_py.commands.cli", "chat", "--model", str(model), "--tokenizer",
                                 str(tok), "--chat-template", "llama2", "--nthreads", "1", "--workers", worker.address,
                                 "--net-timeout", "1.5"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=REPO)
        worker.wait_for_line("received")
        time.sleep(0.5)
        worker.proc.send_signal(signal.SIGSTOP)
        start = time.monotonic()
        out, err = root.communicate("Hello\n", timeout=30)
        elapsed = time.monotonic() - start
        assert root.returncode != 0 and worker.address in err and "timeout after 1500 ms" in err, err
        assert elapsed < 6, elapsed
        assert "Traceback" not in err
    finally:
        worker.proc.send_signal(signal.SIGCONT)
        worker.stop()


def send_raw(address: str, data: bytes) -> None:
    host, port = protocol.parse_address(address)
    with socket.create_connection((host, port), timeout=5) as s:
        s.recv(64)  # the worker's hello
        s.sendall(data)
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except (TimeoutError, ConnectionResetError):
            pass


def test_worker_refuses_garbage_and_wrong_versions_then_serves_a_real_root(stories):
    model, tok = stories
    worker = WorkerProcess()
    try:
        send_raw(worker.address, os.urandom(64) + b"\xff\xff\xff\x7f")
        worker.wait_for_line("refused connection")
        wrong_version = struct.pack("<4sHB", b"DLPY", 99, int(protocol.MsgType.HELLO_ROOT)) + bytes(48)
        send_raw(worker.address, struct.pack("<I", len(wrong_version)) + wrong_version)
        worker.wait_for_line("protocol version 99")
        absurd = struct.pack("<I", 0xFFFFFFF0)
        send_raw(worker.address, absurd)
        worker.wait_for_line("4294967280 bytes")
        assert worker.alive()
        assert_serves_a_real_root(model, tok, worker)
    finally:
        worker.stop()


class FakeRoot:
    """A root that speaks the protocol (no secret) but sends what the test chooses."""

    def __init__(self, address: str) -> None:
        self.sock = socket.create_connection(protocol.parse_address(address), timeout=10)
        hello = protocol.read(protocol.recv_frame(self.sock), protocol.HelloWorker)
        proof = protocol.proof(None, b"root", hello.nonce)
        protocol.send_frame(self.sock, protocol.HelloRoot(protocol.new_nonce(), proof).encode())
        welcome = protocol.read(protocol.recv_frame(self.sock), protocol.Welcome)
        assert welcome.status == protocol.WelcomeStatus.OK

    def setup(self, model: Path, address: str, **changes) -> protocol.Message:
        """Send a setup (the stories model, this worker as node 1 of 2, with `changes`); the reply."""
        self.send_setup(model, address, **changes)
        return protocol.read(protocol.recv_frame(self.sock, 1 << 16))

    def send_setup(self, model: Path, address: str, **changes) -> None:
        with read_model(model) as m:
            header = [(int(k), v) for k, v in m.config.header_items()]
        fields = dict(session=protocol.new_nonce().hex(), node_index=1, addresses=["root", address], header=header,
                      buffer_type="f32", seq_len=64, max_batch=4, kv_storage="ram", timeout_ms=2000, model_id="")
        fields.update(changes)
        protocol.send_frame(self.sock, protocol.Setup(**fields).encode())


def test_worker_refuses_a_setup_it_cannot_serve_and_tells_the_root_why(stories):
    model, tok = stories
    worker = WorkerProcess()
    try:
        with read_model(model) as m:
            huge = [(int(k), 1 << 30 if k == HeaderKey.MAX_SEQ_LEN else v) for k, v in m.config.header_items()]
        cases = [
            (dict(header=huge, seq_len=1 << 30), "GiB available"),  # a KV cache no computer here holds
            (dict(addresses=["root"] + [worker.address] * 9), "10 nodes"),  # more nodes than KV heads
            (dict(node_index=5), "node index 5"),
            (dict(buffer_type="q4"), "buffer type"),
            (dict(max_batch=10**9), "batch of"),
            (dict(header=[(0, 1), (1, 0xDEAD)]), "header has no"),
        ]
        for changes, reason in cases:
            root = FakeRoot(worker.address)
            answer = root.setup(model, worker.address, **changes)
            root.sock.close()
            assert isinstance(answer, protocol.Error) and reason in answer.reason, (changes, answer)
            worker.wait_for_line(reason)
        assert worker.alive()
        assert_serves_a_real_root(model, tok, worker)
    finally:
        worker.stop()


def test_worker_waiting_for_its_peers_gives_up_at_once_when_the_root_goes_away(stories):
    """A worker that waits for another worker to connect (which never comes, e.g. because that
    one refused the setup) notices its root closing and is free again within a second or two."""
    model, tok = stories
    worker = WorkerProcess()
    try:
        root = FakeRoot(worker.address)
        root.send_setup(model, worker.address, node_index=2, addresses=["root", "127.0.0.1:9", worker.address])
        time.sleep(0.3)
        t0 = time.monotonic()
        root.sock.close()
        worker.wait_for_line("root went away", timeout=5)
        assert time.monotonic() - t0 < 3
        assert_serves_a_real_root(model, tok, worker)
    finally:
        worker.stop()


def fake_worker(server: socket.socket, after_ready) -> None:
    """Accept one root on `server`, speak the handshake up to READY, then call after_ready(conn)."""
    conn, _ = server.accept()
    with conn:
        protocol.send_frame(conn, protocol.HelloWorker(protocol.new_nonce()).encode())
        hello = protocol.read(protocol.recv_frame(conn), protocol.HelloRoot)
        proof = protocol.proof(None, b"worker", hello.nonce)
        protocol.send_frame(conn, protocol.Welcome(protocol.WelcomeStatus.OK, proof, 1.0, 0).encode())
        protocol.read(protocol.recv_frame(conn), protocol.Setup)
        protocol.send_frame(conn, protocol.Ready(False).encode())
        after_ready(conn)


def test_worker_that_dies_while_receiving_weights_is_named_with_the_tensor(stories):
    """A worker that vanishes halfway through loading: the root stops at once and says who and
    what was being loaded."""
    model, _ = stories

    def leave_after_100_kb(conn: socket.socket) -> None:
        received = 0
        while received < 100_000:
            received += len(conn.recv(65536))

    with socket.create_server(("127.0.0.1", 0)) as server:
        address = f"127.0.0.1:{server.getsockname()[1]}"
        thread = threading.Thread(target=fake_worker, args=(server, leave_after_100_kb), daemon=True)
        thread.start()
        t0 = time.monotonic()
        with pytest.raises(EngineError) as error:
            cluster_engine(model, [address], threads=1, log=quiet, progress=False)
        assert time.monotonic() - t0 < 5
        thread.join(5)
    message = str(error.value)
    assert address in message and "while loading weights" in message and "loading layers." in message, message


def test_worker_that_freezes_after_its_weights_arrived_stops_the_root_within_the_timeout(stories):
    """A worker that takes every byte of its weights and then says nothing (no heartbeat, no
    LOADED): the root gives up after its timeout and says so."""
    model, _ = stories

    def swallow_and_hang(conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            while conn.recv(1 << 16):
                pass
        except OSError:
            pass

    with socket.create_server(("127.0.0.1", 0)) as server:
        address = f"127.0.0.1:{server.getsockname()[1]}"
        thread = threading.Thread(target=fake_worker, args=(server, swallow_and_hang), daemon=True)
        thread.start()
        t0 = time.monotonic()
        with pytest.raises(EngineError) as error:
            cluster_engine(model, [address], threads=1, log=quiet, progress=False, timeout_ms=1500)
        assert 1.4 < time.monotonic() - t0 < 5
    message = str(error.value)
    assert address in message and "load its weights" in message and "timeout" in message, message


def test_root_that_dies_while_shipping_weights_sends_the_worker_back_to_waiting(stories):
    model, tok = stories
    worker = WorkerProcess()
    try:
        root = FakeRoot(worker.address)
        assert isinstance(root.setup(model, worker.address), protocol.Ready)
        with read_model(model) as m:
            plan = Plan.make(m.config, 2)
            first = next(t for t in tensor_specs(m.config) if plan.cut(t.name, 1).kind is not Split.ROOT)
            rows, cols = plan.slice_shape(first.name, first.shape, 1)
            size = first.float_type.tensor_bytes(rows, cols)
        root.sock.sendall(struct.pack("<I", size) + bytes(size // 2))  # the first tensor, cut short
        root.sock.close()
        line = worker.wait_for_line("waiting for the next root", timeout=5)
        assert f"loading {first.name}" in line and "closed by peer" in line, line
        assert_serves_a_real_root(model, tok, worker)
    finally:
        worker.stop()


def test_a_worker_waits_its_turn_for_weights_longer_than_the_timeout(stories):
    """The root ships to one worker after another; with big slices a worker's turn comes long
    after the network timeout. It must wait for it (a 3-node 8B cluster over 1 Gbit/s needs
    about 12 s per worker), then load and report LOADED."""
    model, _ = stories
    worker = WorkerProcess()
    try:
        root = FakeRoot(worker.address)
        assert root.setup(model, worker.address, timeout_ms=300) == protocol.Ready(False)
        time.sleep(1.2)  # another worker's turn, four times the timeout
        with read_model(model) as m:
            plan = Plan.make(m.config, 2)
            for t in m:
                cut = plan.cut(t.name, 1)
                if cut.kind is not Split.ROOT:
                    part = np.ascontiguousarray(cut_tensor(t.data, t.float_type, cut))
                    root.sock.sendall(struct.pack("<I", part.nbytes) + part.tobytes())
        root.sock.settimeout(10)
        while not isinstance(protocol.read(protocol.recv_frame(root.sock), protocol.Loading, protocol.Loaded),
                             protocol.Loaded):
            pass
        protocol.send_frame(root.sock, protocol.End().encode())
        root.sock.close()
        worker.wait_for_line("finished; waiting for the next root")
    finally:
        worker.stop()


def test_root_reports_the_reason_a_worker_refused(tmp_path):
    """A context whose KV cache does not fit the worker's RAM: the root's error carries the
    worker's reason, before anything was shipped or allocated."""
    config = dataclasses.replace(demo_config(), max_seq_len=1 << 28)
    model = tmp_path / "long.m"
    write_model(model, config, ((s.name, np.zeros(s.shape, np.float32)) for s in tensor_specs(config)))
    worker = WorkerProcess()
    try:
        with pytest.raises(EngineError) as error:
            cluster_engine(model, [worker.address], threads=1, log=quiet, progress=False, max_seq_len=1 << 28)
        message = str(error.value)
        assert worker.address in message and "cannot serve this model" in message, message
        assert "GiB available" in message and "--max-seq-len" in message, message
        worker.wait_for_line("GiB available")
        assert worker.alive()
    finally:
        worker.stop()


def test_two_roots_one_after_another_use_the_same_workers(stories, workers):
    model, tok = stories
    tokenizer = Tokenizer.load(tok)
    texts = []
    for _ in range(2):
        engine = make_engine(model, workers, 3)
        texts.append(Generator(engine, tokenizer).generate(tokenizer.encode("The cat"), 12, Sampler(0.0)).text)
        engine.close()
    assert texts[0] == texts[1] and texts[0]


@pytest.mark.parametrize("worker_secret,root_secret", [("alpha", "beta"), ("alpha", None), (None, "beta")])
def test_secret_mismatch_is_refused_on_both_sides(stories, worker_secret, root_secret):
    model, _ = stories
    worker = WorkerProcess(secret=worker_secret)
    try:
        with pytest.raises(EngineError) as error:
            cluster_engine(model, [worker.address], threads=1, log=quiet, progress=False, secret=root_secret)
        assert worker.address in str(error.value) and "secret" in str(error.value)
        worker.wait_for_line("refused connection")
        assert worker.alive()
    finally:
        worker.stop()


def test_matching_secret_is_accepted(stories):
    model, _ = stories
    worker = WorkerProcess(secret="alpha")
    try:
        engine = cluster_engine(model, [worker.address], threads=1, log=quiet, progress=False, secret="alpha")
        engine.step([1, 403], 0, ARGMAX)
        assert engine.argmax() == 407
        engine.close()
    finally:
        worker.stop()


def test_impossible_node_count_is_refused_with_what_would_work(stories):
    model, tok = stories
    out = subprocess.run([sys.executable, "-m", "dllama_py.commands.cli", "inference", "--model", str(model), "--tokenizer",
                          str(tok), "--prompt", "x", "--steps", "1", "--workers"]
                         + [f"127.0.0.1:{9000 + i}" for i in range(4)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 1
    assert "5 nodes" in out.stderr and "1, 2, 3, 4" in out.stderr and "Traceback" not in out.stderr


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


@pytest.mark.parametrize("value", ["abc", "-5", "2000000"])
def test_bad_spin_setting_is_refused_by_worker_and_root_without_traceback(stories, value):
    model, tok = stories
    env = dict(os.environ, DLLAMA_NET_SPIN_US=value)
    worker = subprocess.run([sys.executable, "-m", "dllama_py.commands.cli", "worker", "--host", "127.0.0.1", "--port", "0"],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    root = subprocess.run([sys.executable, "-m", "dllama_py.commands.cli", "inference", "--model", str(model), "--tokenizer",
                           str(tok), "--prompt", "x", "--steps", "1", "--workers", "127.0.0.1:9"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    for out in (worker, root):
        assert out.returncode in (1, 2), out
        assert "DLLAMA_NET_SPIN_US" in out.stderr and repr(value) in out.stderr and "Traceback" not in out.stderr


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


def test_a_worker_listed_twice_is_refused_before_connecting(stories):
    model, _ = stories
    with pytest.raises(EngineError, match="127.0.0.1:9 is listed more than once"):
        cluster_engine(model, ["127.0.0.1:9", "127.0.0.1:8", "127.0.0.1:9"], threads=1, log=quiet, progress=False)


def test_one_worker_under_two_names_is_refused(stories, workers):
    model, _ = stories
    alias = f"localhost:{workers[0].port}"
    with pytest.raises(EngineError, match=f"{workers[0].address} and {alias} are the same worker"):
        cluster_engine(model, [workers[0].address, alias], threads=1, log=quiet, progress=False)
    engine = cluster_engine(model, [workers[0].address], threads=1, log=quiet, progress=False)  # still free
    engine.close()


def test_ipv6_addresses_are_parsed_in_brackets():
    assert protocol.parse_address("[::1]:9998") == ("::1", 9998)
    assert protocol.parse_address("[fd00::2]:1") == ("fd00::2", 1)
    assert protocol.parse_address("pi.local:9998") == ("pi.local", 9998)
    for bad in ("::1:9998", "[::1]", "10.0.0.2", "10.0.0.2:0", "10.0.0.2:70000", ":9998", "host:port"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            protocol.parse_address(bad)


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_a_worker_on_ipv6(stories, reference):
    model, tok = stories
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    worker = WorkerProcess(extra=["--host", "::1", "--port", str(port)])
    try:
        engine = cluster_engine(model, [f"[::1]:{port}"], threads=1, log=quiet, progress=False)
        tokenizer = Tokenizer.load(tok)
        case = reference[0]
        result = Generator(engine, tokenizer).generate(tokenizer.encode(case["prompt"]), case["num_generated"],
                                                       Sampler(0.0), stop_ids=[1])
        engine.close()
        assert result.generated_ids == case["generated_ids"]
    finally:
        worker.stop()


def test_unreachable_worker_is_named(stories):
    model, _ = stories
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EngineError) as error:
        cluster_engine(model, [f"127.0.0.1:{port}"], threads=1, log=quiet, progress=False)
    assert f"127.0.0.1:{port}" in str(error.value)


def test_dllama_inference_command_across_workers_prints_text_and_traffic(stories, workers, reference):
    model, tok = stories
    out = subprocess.run([sys.executable, "-m", "dllama_py.commands.cli", "inference", "--model", str(model), "--tokenizer",
                          str(tok), "--prompt", "Once upon a time", "--steps", "20", "--temperature", "0",
                          "--nthreads", "1", "--workers", workers[0].address, workers[1].address],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(reference[0]["text"][:40])
    assert "node 2 (worker" in out.stderr and "node 2: sent" in out.stderr
    # every node's traffic per token: all-gathers are symmetric, so each worker sends about what it receives
    traffic = dict(re.findall(r"node (\d): sent ([\d.]+) kB", out.stderr))
    assert set(traffic) == {"0", "1", "2"} and all(float(v) > 0 for v in traffic.values())
    # and how long each node waited for the others (which tells the slowest one)
    waits = dict(re.findall(r"node (\d): .* waited ([\d.]+) ms for the others per token", out.stderr))
    assert set(waits) == {"0", "1", "2"} and all(float(v) >= 0 for v in waits.values())
    assert "Traceback" not in out.stderr


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


def test_demo_runs_two_nodes_and_cleans_up():
    out = subprocess.run([sys.executable, "-m", "dllama_py.commands.cli", "demo", "--steps", "8"], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Once upon a time") and len(out.stdout.split()) >= 8
    assert "node 1 (worker 127.0.0.1:" in out.stderr and "tokens/s" in out.stderr
    folder = [line for line in out.stderr.splitlines() if "writing a random" in line][0].split(" to ")[-1]
    assert not Path(folder).exists()


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


def test_a_root_that_dies_sends_its_workers_back_to_waiting(stories):
    model, tok = stories
    worker = WorkerProcess()
    try:
        # a chat root loads the cluster, then waits for input: kill it there
        root = subprocess.Popen([sys.executable, "-m", "dllama_py.commands.cli", "chat", "--model", str(model), "--tokenizer",
                                 str(tok), "--chat-template", "llama2", "--nthreads", "1", "--workers", worker.address],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        worker.wait_for_line("received")
        time.sleep(0.5)
        root.kill()
        root.wait(10)
        killed = time.monotonic()
        worker.wait_for_line("waiting for the next root", timeout=10)
        assert time.monotonic() - killed < 10
        assert worker.alive()
        engine = cluster_engine(model, [worker.address], threads=1, log=quiet, progress=False)
        engine.step([1, 403], 0, ARGMAX)
        assert engine.argmax() == 407
        engine.close()
    finally:
        worker.stop()


def test_a_second_root_is_told_at_once_that_the_worker_is_busy(stories):
    model, _ = stories
    worker = WorkerProcess()
    try:
        first = cluster_engine(model, [worker.address], threads=1, log=quiet, progress=False)
        start = time.monotonic()
        with pytest.raises(EngineError) as error:
            cluster_engine(model, [worker.address], threads=1, log=quiet, progress=False)
        assert time.monotonic() - start < 3.0
        assert worker.address in str(error.value) and "busy" in str(error.value)
        first.step([1, 403], 0, ARGMAX)  # the first session is unaffected
        assert first.argmax() == 407
        first.close()
        worker.wait_for_line("waiting for the next root")
        second = cluster_engine(model, [worker.address], threads=1, log=quiet, progress=False)
        second.step([1, 403], 0, ARGMAX)
        assert second.argmax() == 407
        second.close()
    finally:
        worker.stop()
