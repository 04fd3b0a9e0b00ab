"""The cluster from the command line: `dllama inference` across workers, `dllama demo`, and
workers addressed over IPv6."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_helpers import REPO, WorkerProcess, quiet

from dllama_py.cluster import protocol
from dllama_py.cluster.root import cluster_engine
from dllama_py.engine.sampler import Sampler
from dllama_py.generation.generator import Generator
from dllama_py.text.tokenizer import Tokenizer


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


def test_demo_runs_two_nodes_and_cleans_up():
    out = subprocess.run([sys.executable, "-m", "dllama_py.commands.cli", "demo", "--steps", "8"], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Once upon a time") and len(out.stdout.split()) >= 8
    assert "node 1 (worker 127.0.0.1:" in out.stderr and "tokens/s" in out.stderr
    folder = [line for line in out.stderr.splitlines() if "writing a random" in line][0].split(" to ")[-1]
    assert not Path(folder).exists()
