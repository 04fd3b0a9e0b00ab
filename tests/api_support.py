"""Helpers for the dllama-api tests: the stories260K model files, real server and worker processes.

Holds no tests itself; test_api*.py import from it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

VENV_BIN = Path(sys.executable).parent
API_KEY = "test-key-123"
TEMPLATE = "llama2"  # tok512 has no template of its own; llama2's <s>/</s> are tok512's BOS/EOS
STARTUP_TIMEOUT_S = 30.0


def tool(name: str) -> str:
    """A console script of this environment (dllama, dllama-api, convert-hf...)."""
    path = VENV_BIN / name
    if not path.exists():
        pytest.fail(f"{path} not found: install the package into this environment (pip install -e .)")
    return str(path)


def make_stories_files(testdata: Path, folder: Path) -> tuple[Path, Path]:
    """stories260K as a .m file (f32) and tok512 as a .t file, made with our converters."""
    model, tokenizer = folder / "stories260K.m", folder / "tok512.t"
    for command in (
        [tool("convert-hf"), str(testdata / "stories260K_hf"), "f32", "stories", "--output", str(model)],
        [
            tool("convert-tokenizer"),
            str(testdata / "stories260K" / "tok512.model"),
            "tok512",
            "--output",
            str(tokenizer),
        ],
    ):
        subprocess.run(command, check=True, capture_output=True, timeout=120)
    return model, tokenizer


def reference_completion(testdata: Path, prompt: str) -> dict:
    """llama2.c's greedy output for `prompt` from the shared reference file."""
    data = json.loads((testdata / "reference" / "stories260K_greedy.json").read_text())
    return next(r for r in data["results"] if r["prompt"] == prompt)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A child process whose output goes to a log file; stopped with SIGINT, then SIGKILL."""

    def __init__(self, command: list[str], log_path: Path) -> None:
        self.command = command
        self.log_path = log_path
        self.log_file = open(log_path, "w")  # noqa: SIM115 - the child writes to it until stop()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            command, stdout=self.log_file, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.process.poll() is not None:
                pytest.fail(f"{self.command[0]} exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.command[0]} did not log {text!r} in {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log_file.close()


class Worker(Process):
    def __init__(self, port: int, log_path: Path) -> None:
        super().__init__(
            [tool("dllama"), "worker", "--host", "127.0.0.1", "--port", str(port), "--nthreads", "1"],
            log_path,
        )
        self.address = f"127.0.0.1:{port}"
        self.wait_for_log("listening on")


class ApiServer(Process):
    """`dllama-api` on a free port of 127.0.0.1, ready once /health answers."""

    def __init__(
        self, model: Path, tokenizer: Path, log_path: Path, *extra: str, api_key: str | None = API_KEY
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.tokenizer_path = tokenizer
        command = [
            tool("dllama-api"),
            "--model",
            str(model),
            "--tokenizer",
            str(tokenizer),
            "--port",
            str(self.port),
            "--nthreads",
            "1",
            "--chat-template",
            TEMPLATE,
            *extra,
        ]
        if api_key:
            command += ["--api-key", api_key]
        super().__init__(command, log_path)
        self.wait_for_log("dllama-api: serving")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs):  # -> openai.OpenAI
        import openai

        return openai.OpenAI(
            base_url=f"{self.url}/v1",
            api_key=self.api_key or "none",
            max_retries=0,
            timeout=kwargs.pop("timeout", 30.0),
            **kwargs,
        )

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.url}/health", timeout=10)

    def get(self, path: str, **kwargs) -> httpx.Response:
        kwargs.setdefault("headers", self.headers())
        return httpx.get(f"{self.url}{path}", timeout=kwargs.pop("timeout", 30), **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        kwargs.setdefault("headers", self.headers())
        return httpx.post(f"{self.url}{path}", timeout=kwargs.pop("timeout", 30), **kwargs)

    def wait_health(self, ok: bool, timeout: float = 20.0) -> dict:
        """Poll /health until the model is (ok) or is not loaded; returns the last status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.health().json()
            if status["model_loaded"] == ok:
                return status
            if time.monotonic() > deadline:
                pytest.fail(f"/health still says {status} after {timeout} s:\n{self.log()}")
            time.sleep(0.1)


def sse_events(raw: str) -> list[str]:
    """The data of each Server-Sent Event in a raw stream; fails on anything else."""
    assert raw.endswith("\n\n"), raw[-200:]
    events = raw[:-2].split("\n\n")
    for event in events:
        assert event.startswith("data: "), event
    return [event[len("data: ") :] for event in events]
