"""dllama-api against careless clients and flags (issue 14, defects 4, 5 and 8): --max-queued 0,
--reconnect-interval 0, an unknown model, max_tokens beyond the context, a huge header, HEAD /."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import httpx
import pytest
from api_support import ApiServer, free_port, tool

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "Hi"}]



@pytest.fixture(scope="module")
def server(stories_files, tmp_path_factory):
    """Served as 'storyteller'; the file's stem is 'stories260K'."""
    api = ApiServer(*stories_files, tmp_path_factory.mktemp("api_logs") / "api.log", "--model-name", "storyteller")
    yield api
    api.stop()


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


# ---- defect 8: the API's details ---------------------------------------------------------------


def test_a_request_naming_an_unknown_model_is_404_model_not_found(server):
    for path, body in ((COMPLETIONS, {"prompt": "Once", "max_tokens": 2}), (CHAT, {"messages": HI, "max_tokens": 2})):
        error = error_of(server.post(path, json={**body, "model": "gpt-4o"}), 404)
        assert error["code"] == "model_not_found" and error["param"] == "model", error
        assert "'gpt-4o'" in error["message"] and "storyteller" in error["message"], error
        for name in ("storyteller", "stories260K"):  # the served name and the file's stem
            assert server.post(path, json={**body, "model": name}).status_code == 200
        assert server.post(path, json=body).status_code == 200  # no model: the one there is
    models = httpx.get(f"{server.url}/v1/models/stories260K", headers=server.headers(), timeout=10)
    assert models.status_code == 200 and models.json()["id"] == "storyteller"


@pytest.mark.parametrize("path, field, extra", [
    (COMPLETIONS, "max_tokens", {"prompt": "Once"}),
    (CHAT, "max_tokens", {"messages": HI}),
    (CHAT, "max_completion_tokens", {"messages": HI}),
])
def test_max_tokens_beyond_the_context_is_refused(server, path, field, extra):
    """10^9 used to run to the end of the context; it is a 400 naming the field and the context."""
    for value in (10**30, 10**9, 513):
        error = error_of(server.post(path, json={**extra, field: value}), 400)
        assert error["param"] == field, error
        assert f"{field}: {value} is more than the context of 512 tokens" in error["message"], error
    assert server.post(path, json={**extra, field: 3}).status_code == 200


def test_a_header_too_large_gets_a_json_error_in_openai_shape(server):
    """uvicorn (h11) answered headers over 16 KiB with a plain-text 400."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000)  # headers never end
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith("HTTP/1.1 431"), reply[:300]
    assert "content-type: application/json" in [line.lower() for line in lines], lines
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and "headers are too large" in error["message"], error
    assert server.health().status_code == 200


def test_head_of_the_chat_page_answers_like_get_without_a_body(server):
    """HEAD / was a 405."""
    get = httpx.get(f"{server.url}/", timeout=10)
    head = httpx.head(f"{server.url}/", timeout=10)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert int(head.headers["content-length"]) == len(get.content)


# ---- defect 4: --max-queued 0 ------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_queue_server(stories_files, tmp_path_factory):
    api = ApiServer(*stories_files, tmp_path_factory.mktemp("api_logs") / "api.log", "--parallel", "1", "--max-queued", "0",
                    "--debug-token-delay-ms", "20")
    yield api
    api.stop()


def wait_idle(server: ApiServer, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        queue = server.health().json()["queue"]
        if not queue["running"] and queue["waiting"] == 0:
            return
        assert time.monotonic() < deadline, queue
        time.sleep(0.05)


def test_max_queued_0_refuses_a_request_while_one_runs(no_queue_server):
    """Queue(maxsize=0) used to mean no limit at all: the second request waited."""
    server = no_queue_server
    wait_idle(server)
    client = httpx.Client(timeout=60)
    running = client.send(
        client.build_request("POST", f"{server.url}{COMPLETIONS}", headers=server.headers(),
                             json={"prompt": "Once", "max_tokens": 300, "ignore_eos": True, "stream": True}),
        stream=True)
    try:
        lines = running.iter_lines()
        assert next(lines).startswith("data: ")  # generating now
        error = error_of(server.post(COMPLETIONS, json={"prompt": "Once", "max_tokens": 2}, timeout=60), 429)
        assert error["code"] == "queue_full" and "--max-queued 0" in error["message"], error
        assert server.health().json()["queue"]["max_waiting"] == 0
    finally:
        running.close()
        client.close()
    wait_idle(server)
    assert server.post(COMPLETIONS, json={"prompt": "Once", "max_tokens": 2}, timeout=60).status_code == 200


# ---- defect 5 and 6: flags refused at start ----------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--reconnect-interval", "0"], "--reconnect-interval must be at least 0.1 seconds, got 0"),
    (["--reconnect-interval", "-3"], "--reconnect-interval must be at least 0.1 seconds, got -3"),
    (["--reconnect-interval", "nan"], "--reconnect-interval must be at least 0.1 seconds, got nan"),
    (["--port", "70000"], "--port must be between 0 and 65535, got 70000"),
    (["--temperature", "nan"], "--temperature must be a finite number, 0 or more, got nan"),
    (["--topp", "inf"], "--topp must be a finite number, got inf"),
])
def test_bad_server_flags_are_refused_at_start_in_one_line(stories_files, flags, message):
    """--reconnect-interval 0 used to retry in a busy loop (1,520 attempts in 8 s) once a worker failed."""
    model, tok = stories_files
    port = free_port() if "--port" not in flags else None
    command = [tool("dllama-api"), "--model", str(model), "--tokenizer", str(tok), *flags]
    if port is not None:
        command += ["--port", str(port)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out
    assert out.stderr == f"error: {message}\n", out.stderr
