"""Cluster faults end cleanly: a killed or frozen worker (and --net-timeout), a worker dying or
freezing while or after it receives its weights, a root dying while shipping them or after, a worker
waiting its turn for weights, setups a worker cannot serve, unreachable workers."""

from __future__ import annotations

import dataclasses
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
from cluster_helpers import REPO, WorkerProcess, assert_serves_a_real_root, quiet

from dllama_py.cluster import protocol
from dllama_py.cluster.root import cluster_engine
from dllama_py.commands.demo import demo_config
from dllama_py.engine.engine import EngineError
from dllama_py.engine.exchange import ARGMAX
from dllama_py.engine.sampler import Sampler
from dllama_py.formats.model_file import read_model, write_model
from dllama_py.generation.generator import Generator
from dllama_py.model.config import HeaderKey
from dllama_py.model.plan import Plan, cut_tensor
from dllama_py.model.structure import Split, tensor_specs
from dllama_py.text.tokenizer import Tokenizer


def test_killed_worker_is_reported_with_its_address_within_10_seconds(stories):
    model, tok = stories
    tokenizer = Tokenizer.load(tok)
    victim, other = WorkerProcess(), WorkerProcess()
    engine = cluster_engine(model, [other.address, victim.address], threads=1, log=quiet, progress=False, on_node_loss="stop")
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
    again = cluster_engine(model, [other.address], threads=1, log=quiet, progress=False, on_node_loss="stop")
    again.step([1, 403], 0, ARGMAX)
    assert again.argmax() == 407
    again.close()
    other.stop()


def test_frozen_worker_stops_the_root_within_10_seconds(stories):
    model, _ = stories
    worker = WorkerProcess()
    engine = cluster_engine(model, [worker.address], threads=1, log=quiet, progress=False, on_node_loss="stop")
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
                                 "--net-timeout", "1.5", "--on-node-loss", "stop"],
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
            cluster_engine(model, [address], threads=1, log=quiet, progress=False, on_node_loss="stop")
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
            cluster_engine(model, [address], threads=1, log=quiet, progress=False, on_node_loss="stop", timeout_ms=1500)
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
            cluster_engine(model, [worker.address], threads=1, log=quiet, progress=False, on_node_loss="stop", max_seq_len=1 << 28)
        message = str(error.value)
        assert worker.address in message and "cannot serve this model" in message, message
        assert "GiB available" in message and "--max-seq-len" in message, message
        worker.wait_for_line("GiB available")
        assert worker.alive()
    finally:
        worker.stop()


def test_unreachable_worker_is_named(stories):
    model, _ = stories
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EngineError) as error:
        cluster_engine(model, [f"127.0.0.1:{port}"], threads=1, log=quiet, progress=False, on_node_loss="stop")
    assert f"127.0.0.1:{port}" in str(error.value)


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
        engine = cluster_engine(model, [worker.address], threads=1, log=quiet, progress=False, on_node_loss="stop")
        engine.step([1, 403], 0, ARGMAX)
        assert engine.argmax() == 407
        engine.close()
    finally:
        worker.stop()
