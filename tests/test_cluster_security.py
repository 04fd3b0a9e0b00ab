"""What a worker lets in: garbage and wrong protocol versions are refused, secrets must match, a
second root is told the worker is busy, a worker listed twice or under two names is refused, and so
are bad spin settings."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time

import pytest
from cluster_helpers import REPO, WorkerProcess, assert_serves_a_real_root, quiet

from dllama_py.cluster import protocol
from dllama_py.cluster.root import cluster_engine
from dllama_py.engine.engine import EngineError
from dllama_py.engine.exchange import ARGMAX


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
