"""A worker against hostile or careless peers (issue 14): a SETUP field of the wrong type, strangers
that hold the handshake (idle, dribbling, a flood), what it logs when secrets differ, and a port
out of range. Real worker processes on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from cluster_helpers import WorkerProcess, assert_serves_a_real_root, quiet
from test_cluster_faults import FakeRoot

from dllama_py.cluster import protocol
from dllama_py.cluster.root import cluster_engine
from dllama_py.commands.cli import main
from dllama_py.engine.engine import EngineError

# A frame that announces a HELLO_ROOT-sized payload (4 length bytes, then 55 bytes): sent one byte
# at a time, every read gets something long before any per-read timeout.
SLOW_FRAME = (55).to_bytes(4, "little") + bytes(55)


def connect(worker: WorkerProcess) -> socket.socket:
    return socket.create_connection(protocol.parse_address(worker.address), timeout=30)


def test_a_setup_whose_addresses_is_a_number_is_refused_and_the_worker_serves_on(stories):
    """Defect 1: a peer that completes the handshake (no secret) and sends a SETUP whose
    addresses is a number used to kill the worker (TypeError in a log line)."""
    model, tok = stories
    worker = WorkerProcess()
    try:
        root = FakeRoot(worker.address)
        root.send_setup(model, worker.address, addresses=5)
        worker.wait_for_line("addresses must be a list of strings, got 5")
        root.sock.close()
        assert worker.alive()
        assert_serves_a_real_root(model, tok, worker)
    finally:
        worker.stop()


def test_a_real_root_gets_through_while_strangers_hold_connections(stories):
    """Defect 2: one stranger dribbling a byte every 2 s and three idle ones, all connected
    before the root, used to keep it out ("did not answer the handshake within 10 s")."""
    model, tok = stories
    worker = WorkerProcess()
    stop = threading.Event()
    strangers: list[socket.socket] = []
    try:
        dribbler = connect(worker)
        strangers.append(dribbler)

        def dribble() -> None:
            for byte in SLOW_FRAME:
                if stop.wait(2.0):
                    return
                try:
                    dribbler.sendall(bytes([byte]))
                except OSError:
                    return

        threading.Thread(target=dribble, daemon=True).start()
        strangers += [connect(worker) for _ in range(3)]
        assert_serves_a_real_root(model, tok, worker)
        assert worker.alive()
    finally:
        stop.set()
        for sock in strangers:
            sock.close()
        worker.stop()


def test_a_stranger_that_dribbles_is_dropped_at_the_handshake_deadline():
    """Defect 2: the 10 s are for the whole handshake, not for each read."""
    worker = WorkerProcess()
    sock = connect(worker)
    try:
        protocol.read(protocol.recv_frame(sock), protocol.HelloWorker)
        sock.settimeout(2.0)
        start = time.monotonic()
        closed_after = None
        for byte in SLOW_FRAME:  # 59 bytes, 2 s apart: two minutes if nobody stops it
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(64) == b"":
                    closed_after = time.monotonic() - start
                    break
            except TimeoutError:
                continue
            except OSError:
                closed_after = time.monotonic() - start
                break
        assert closed_after is not None and closed_after < 30, closed_after
        worker.wait_for_line("the handshake took longer than 10 s")
        assert worker.alive()
    finally:
        sock.close()
        worker.stop()


def test_a_flood_of_idle_connections_does_not_keep_a_root_out(stories):
    """Defect 2: more idle strangers than the worker handshakes at once (32): the oldest are
    dropped, and the root, the newest, gets through."""
    model, tok = stories
    worker = WorkerProcess()
    strangers: list[socket.socket] = []
    try:
        for _ in range(40):
            strangers.append(connect(worker))
        worker.wait_for_line("dropped connection from", timeout=30)
        assert_serves_a_real_root(model, tok, worker)
    finally:
        for sock in strangers:
            sock.close()
        worker.stop()


@pytest.mark.parametrize("worker_secret, root_secret, logged", [
    (None, "beta", "the root uses a secret but this worker has none"),
    ("alpha", None, "the root has no secret but this worker requires one"),
    ("alpha", "beta", "the root's secret differs from this worker's"),
])
def test_the_worker_says_from_its_side_why_the_secrets_do_not_match(stories, worker_secret, root_secret, logged):
    """Defect 8: a worker without a secret used to log "the root does not know this worker's secret"."""
    model, _ = stories
    worker = WorkerProcess(secret=worker_secret)
    try:
        with pytest.raises(EngineError, match="secret"):
            cluster_engine(model, [worker.address], threads=1, log=quiet, progress=False, secret=root_secret)
        worker.wait_for_line(logged)
    finally:
        worker.stop()


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_a_port_out_of_range_is_one_line_without_traceback(capsys, port):
    """Defect 6: `dllama worker --port 70000` printed an OverflowError traceback."""
    assert main(["worker", "--host", "127.0.0.1", "--port", port]) == 1
    err = capsys.readouterr().err
    assert err == f"error: --port must be between 0 and 65535, got {port}\n", err
