"""A soak at a smaller count than benchmarks/bench_soak.py: 400 mixed requests (whole, streamed,
cancelled, invalid, constrained, with log-probabilities) from 4 clients against a live dllama-api
over stories260K. Every answer is what it should be, the model stays loaded, every cancelled
stream is counted, and the server's resident memory after them is within 8 MiB of what it was
after a warm-up (measured: +0.7 to +1.2 MiB after 300 to 1,000 requests)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest
from api_support import ApiServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_soak import resident_bytes, soak  # noqa: E402

FLAT_BYTES = 8 * 2**20


@pytest.fixture(scope="module")
def soaked_server(stories_files, tmp_path_factory):
    api = ApiServer(*stories_files, tmp_path_factory.mktemp("soak_logs") / "api.log", "--chat-template", "chatml",
                    "--max-queued", "64", api_key=None)
    yield api
    api.stop()


def test_memory_stays_flat_over_mixed_requests(soaked_server):
    url = soaked_server.url
    warm = soak(url, 50, clients=4, seed=99)
    assert not warm["failures"], warm["failures"][:5]
    before = resident_bytes(soaked_server.process.pid)
    result = soak(url, 400, clients=4, seed=1)
    after = resident_bytes(soaked_server.process.pid)
    assert not result["failures"], result["failures"][:5]
    assert sum(len(v) for v in result["latencies"].values()) == 400
    # every valid request is served or (a hang-up) cancelled; a hang-up is counted when the
    # generation thread notices it
    valid = sum(len(v) for run in (warm, result) for k, v in run["latencies"].items() if k != "invalid")
    deadline = time.monotonic() + 60
    while True:
        health = httpx.get(f"{url}/health", timeout=10).json()
        counted = health["requests"]["served"] + health["requests"]["cancelled"]
        if counted >= valid or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert health["model_loaded"] and health["requests"]["failed"] == 0
    assert counted == valid and health["requests"]["cancelled"] > 0
    assert after - before < FLAT_BYTES, f"RSS grew by {(after - before) / 2**20:.1f} MiB over 400 requests"
