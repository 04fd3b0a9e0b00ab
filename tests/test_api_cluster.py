"""dllama-api on a root + 1 worker cluster when the worker dies: the request in flight ends with
an error, /health and new requests say 503 while it is gone, and the server reconnects by itself
(re-shipping the slices) once the worker is back, without a restart."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from api_support import ApiServer, Worker, free_port


def test_worker_death_ends_the_request_then_the_server_reconnects(stories_files, tmp_path):
    """--on-node-loss stop: a lost worker fails the request and the server waits for it (the
    default re-plans instead: tests/test_node_loss.py)."""
    port = free_port()
    worker = Worker(port, tmp_path / "worker1.log")
    api = ApiServer(
        *stories_files,
        tmp_path / "api.log",
        "--on-node-loss",
        "stop",
        "--workers",
        worker.address,
        "--reconnect-interval",
        "0.3",
        "--debug-token-delay-ms",
        "10",
    )
    replacement = None
    try:
        client = api.client()
        before = client.completions.create(model="stories260K", prompt="Once upon a time", temperature=0, max_tokens=20)
        body = {"prompt": "Once upon a time", "max_tokens": 300, "stream": True, "ignore_eos": True}
        with httpx.stream(
            "POST", f"{api.url}/v1/completions", json=body, headers=api.headers(), timeout=30
        ) as stream:
            events = stream.iter_lines()
            assert next(events).startswith("data: ")
            worker.kill()
            rest = [line[len("data: ") :] for line in events if line.startswith("data: ")]
        error = json.loads(rest[-2])["error"]  # the stream ends with an error event, then [DONE]
        assert error["code"] == "generation_failed" and "Traceback" not in error["message"]
        assert rest[-1] == "[DONE]"

        status = api.wait_health(ok=False)
        assert api.health().status_code == 503
        assert status["status"] == "unavailable" and status["error"]
        assert status["workers"] == [{"address": worker.address, "connected": False}]
        with pytest.raises(openai.InternalServerError) as raised:
            client.completions.create(model="stories260K", prompt="Once", max_tokens=2)
        assert raised.value.status_code == 503
        assert raised.value.body["code"] == "model_unavailable"

        replacement = Worker(port, tmp_path / "worker2.log")
        status = api.wait_health(ok=True)
        assert status["nodes"] == 2 and status["reconnect_attempts"] >= 1
        after = client.completions.create(model="stories260K", prompt="Once upon a time", temperature=0, max_tokens=20)
        assert after.choices[0].text == before.choices[0].text
        assert "the model is back" in api.log()
    finally:
        api.stop()
        worker.stop()
        if replacement is not None:
            replacement.stop()


def test_health_notices_a_worker_that_dies_while_the_server_is_idle(stories_files, tmp_path):
    port = free_port()
    worker = Worker(port, tmp_path / "worker.log")
    api = ApiServer(*stories_files, tmp_path / "api.log", "--workers", worker.address, "--reconnect-interval", "0.3")
    replacement = None
    try:
        assert api.health().json()["status"] == "ok"
        worker.kill()  # no request is running or coming: the idle server re-plans onto the root alone
        deadline = time.monotonic() + 30
        while (status := api.health().json())["nodes"] != 1:
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        assert status["status"] == "ok" and status["lost_workers"] == [worker.address]
        assert status["workers"] == [{"address": worker.address, "connected": False}]
        assert f"lost node {worker.address}" in api.log()
        replacement = Worker(port, tmp_path / "worker2.log")  # it answers again: taken back while idle
        deadline = time.monotonic() + 30
        while (status := api.health().json())["nodes"] != 2:
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        assert status["lost_workers"] == [] and status["workers"][0]["connected"]
    finally:
        api.stop()
        worker.stop()
        if replacement is not None:
            replacement.stop()
