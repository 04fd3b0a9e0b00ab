"""Real worker processes on 127.0.0.1 for the cluster tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from dllama_py.cluster.root import cluster_engine
from dllama_py.engine.engine import Engine
from dllama_py.engine.sampler import Sampler
from dllama_py.generation.generator import Generator
from dllama_py.text.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """A `dllama worker` subprocess; its log lines are collected in `lines`."""

    def __init__(self, secret: str | None = None, threads: int = 1, extra: list[str] | None = None,
                 extra_env: dict[str, str] | None = None, port: int | None = None) -> None:
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        self.address = f"127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "dllama_py.commands.cli", "worker", "--host", "127.0.0.1", "--port", str(self.port),
                "--nthreads", str(threads)] + (extra or [])
        env = dict(os.environ)
        env.pop("DLLAMA_SECRET", None)
        env.update(extra_env or {})
        if secret is not None:
            argv += ["--secret", secret]
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                                     cwd=REPO)
        self.lines: list[str] = []
        self._listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._listening.wait(30):
            self.stop()
            raise RuntimeError(f"worker did not start: {self.lines}")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if "listening on" in line:
                self._listening.set()

    def wait_for_line(self, text: str, timeout: float = 10.0, after: int = 0) -> str:
        """The first log line (from index `after` on) containing `text`, waiting up to `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines)[after:]:
                if text in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"worker never logged {text!r}; log: {self.lines}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def resident_bytes_of_mapping(path: Path) -> int:
    """Bytes of `path`'s memory mappings that are resident in this process (Linux /proc)."""
    target = str(Path(path).resolve())
    rss, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                inside = line.rstrip().endswith(target)
            elif inside and line.startswith("Rss:"):
                rss += int(fields[1]) * 1024
    return rss


def quiet(_message: str) -> None:
    pass


def assert_serves_a_real_root(model: Path, tok: Path, worker: WorkerProcess) -> None:
    """The worker (after whatever a test did to it) still runs a real root's greedy generation."""
    engine = cluster_engine(model, [worker.address], threads=1, log=quiet, progress=False)
    try:
        tokenizer = Tokenizer.load(tok)
        result = Generator(engine, tokenizer).generate(tokenizer.encode("Once upon a time"), 5, Sampler(0.0))
    finally:
        engine.close()
    assert result.generated_ids[:3] == [432, 383, 286]


def make_engine(model: Path, workers: list[WorkerProcess], nodes: int, **kw) -> Engine:
    if nodes == 1:
        kw.pop("shares", None)
        return Engine(model, threads=1, **kw)
    return cluster_engine(model, [w.address for w in workers[: nodes - 1]], threads=1, log=quiet, progress=False, **kw)
