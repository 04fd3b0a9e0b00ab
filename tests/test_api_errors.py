"""dllama-api's errors (OpenAI's JSON shape, the right status, never a traceback), what it
accepts from real clients, its queue limit, and clients that go away mid-generation."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from api_support import ApiServer

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "Hi"}]




@pytest.fixture(scope="module")
def slow_server(stories_files, tmp_path_factory):
    """One slot, one waiting request at most, and 20 ms per token, so a test can act during a generation."""
    api = ApiServer(
        *stories_files,
        tmp_path_factory.mktemp("api_logs") / "api.log",
        "--parallel",
        "1",
        "--max-queued",
        "1",
        "--debug-token-delay-ms",
        "20",
    )
    yield api
    api.stop()


def assert_error(
    response: httpx.Response, status: int, param: str | None = None, code: str | None = None
) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


# ---- 401 ------------------------------------------------------------------------------------


def test_missing_or_wrong_api_key_is_401(server):
    assert_error(server.post(CHAT, json={"messages": HI}, headers={}), 401, code="invalid_api_key")
    assert_error(server.post(CHAT, json={"messages": HI}, headers={"Authorization": "Bearer nope"}), 401)
    assert_error(httpx.get(f"{server.url}/v1/models"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_health_and_chat_page_need_no_key(server):
    assert server.health().status_code == 200
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "<textarea" in page.text
    assert httpx.get(f"{server.url}/static/chat.js").status_code == 200


# ---- 400 ------------------------------------------------------------------------------------


def test_malformed_json_is_400(server):
    error = assert_error(
        server.post(CHAT, content=b'{"messages": [', headers=server.headers()), 400, code="invalid_json"
    )
    assert "JSON" in error["message"]
    assert_error(server.post(CHAT, content=b"[1, 2]", headers=server.headers()), 400)
    assert_error(server.post(CHAT, content=b"", headers=server.headers()), 400)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": "hello"}, "messages"),
        ({}, "messages"),
        ({"messages": HI, "temperature": "hot"}, "temperature"),
        ({"messages": HI, "temperature": 3}, "temperature"),
        ({"messages": HI, "max_tokens": "5"}, "max_tokens"),
        ({"messages": HI, "max_tokens": 0}, "max_tokens"),
        ({"messages": HI, "stream": "yes"}, "stream"),
        ({"messages": HI, "stop": 7}, "stop"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
    ],
)
def test_bad_types_are_400_naming_the_field(server, body, param):
    assert_error(server.post(CHAT, json=body), 400, param)


def test_unknown_role_is_400(server):
    error = assert_error(
        server.post(CHAT, json={"messages": [{"role": "wizard", "content": "x"}]}), 400, "messages[0].role"
    )
    assert "wizard" in error["message"]


def test_prompt_longer_than_the_context_is_400(server):
    long_text = "the cat sat on the mat " * 150  # about 900 tokens; the context holds 512
    assert_error(
        server.post(CHAT, json={"messages": [{"role": "user", "content": long_text}]}),
        400,
        "messages",
        "context_length_exceeded",
    )
    assert_error(
        server.post("/v1/completions", json={"prompt": long_text}), 400, "prompt", "context_length_exceeded"
    )
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model="stories260K", prompt=long_text)


@pytest.mark.parametrize(
    "extra, param",
    [
        # n, logprobs, penalties, logit_bias, response_format and forced tool calls are served
        # (tests/test_api_sampling.py, tests/test_api_structured.py)
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": {"name": "f"}}, "function_call"),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0].type",
        ),
    ],
)
def test_unsupported_features_are_400_naming_the_field(server, extra, param):
    error = assert_error(
        server.post(CHAT, json={"messages": HI, **extra}), 400, param, "unsupported_parameter"
    )
    assert param.split("[")[0] in error["message"]


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"n": 17}, "n"),
        ({"n": 0}, "n"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logit_bias": {"abc": 5}}, "logit_bias"),
        ({"logit_bias": {"42": 200}}, "logit_bias"),
        ({"logit_bias": {"600": 1}}, "logit_bias"),  # stories260K has 512 tokens
        ({"logit_bias": {"42": "5"}}, "logit_bias.42"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"repeat_penalty": 0}, "repeat_penalty"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
         "response_format"),
        ({"tool_choice": "required"}, "tool_choice"),  # without tools
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_sampling_and_format_values_are_400_naming_the_field(server, extra, param):
    error = assert_error(server.post(CHAT, json={"messages": HI, **extra}), 400, param)
    assert param.split(".")[0] in error["message"]


def test_completion_unsupported_fields_are_400(server):
    assert_error(server.post("/v1/completions", json={"prompt": "Once", "logprobs": 21}), 400, "logprobs")
    for extra, param in (
        ({"best_of": 3}, "best_of"),
        ({"suffix": "end"}, "suffix"),
        ({"prompt": ["a", "b"]}, "prompt"),
    ):
        assert_error(
            server.post("/v1/completions", json={"prompt": "Once", **extra}),
            400,
            param,
            "unsupported_parameter",
        )


def test_default_valued_fields_real_clients_send_are_accepted(server):
    # what Open WebUI and the openai package send when nothing special is asked, plus unknown fields
    body = {
        "model": "stories260K",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": "Really."},
            {"role": "user", "content": "Hi", "name": "ann"},
        ],
        "stream": False,
        "n": 1,
        "logprobs": False,
        "top_logprobs": None,
        "tools": [],
        "tool_choice": "none",
        "functions": None,
        "frequency_penalty": 0,
        "presence_penalty": 0.0,
        "logit_bias": {},
        "response_format": {"type": "text"},
        "stop": None,
        "seed": None,
        "user": "someone",
        "parallel_tool_calls": False,
        "metadata": {"chat_id": "1"},
        "reasoning_effort": None,
        "max_tokens": 4,
        "max_completion_tokens": None,
        "temperature": 0,
        "top_p": 1,
        "something_new": [1],
    }
    response = server.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4


def test_unknown_route_is_404_in_openai_shape(server):
    assert_error(httpx.get(f"{server.url}/v1/engines"), 404)
    assert_error(
        httpx.get(f"{server.url}/v1/models/other", headers=server.headers()), 404, "model", "model_not_found"
    )


# ---- the queue and clients that go away -----------------------------------------------------


def long_stream(server: ApiServer, max_tokens: int = 300) -> httpx.Response:
    """A streamed completion that runs max_tokens * 20 ms unless cancelled; the caller closes it."""
    client = httpx.Client(timeout=30)
    request = client.build_request(
        "POST",
        f"{server.url}/v1/completions",
        headers=server.headers(),
        json={
            "prompt": "Once upon a time",
            "max_tokens": max_tokens,
            "stream": True,
            "ignore_eos": True,
            "temperature": 0,
        },
    )
    return client.send(request, stream=True)


def wait_idle(server: ApiServer, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = server.health().json()
        if not status["queue"]["running"] and status["queue"]["waiting"] == 0:
            return status
        assert time.monotonic() < deadline, f"still busy after {timeout} s: {status}"
        time.sleep(0.02)


def test_full_queue_is_429_and_requests_are_served_afterwards(slow_server):
    wait_idle(slow_server, 5)
    running = long_stream(slow_server)
    lines = running.iter_lines()
    assert next(lines).startswith("data: ")  # generating now
    waiting = long_stream(slow_server)  # queued behind it
    assert waiting.status_code == 200
    response = slow_server.post("/v1/completions", json={"prompt": "Once", "max_tokens": 2})
    assert_error(response, 429, code="queue_full")
    assert response.headers["retry-after"] == "1"
    with pytest.raises(openai.RateLimitError):
        slow_server.client().completions.create(model="stories260K", prompt="Once", max_tokens=2)
    running.close()
    waiting.close()
    wait_idle(slow_server, 3)
    done = slow_server.client().completions.create(model="stories260K", prompt="Once", max_tokens=2)
    assert done.usage.completion_tokens == 2


def test_client_disconnecting_mid_stream_stops_its_generation(slow_server):
    before = wait_idle(slow_server, 5)["requests"]
    response = long_stream(slow_server, max_tokens=400)  # 8 s if nobody stopped it
    lines = response.iter_lines()
    received = 0
    while received < 3:
        if next(lines).startswith("data: "):
            received += 1
    response.close()
    # stopped long before the 8 s the answer would take; generous for a busy machine
    after = wait_idle(slow_server, 5)["requests"]
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["tokens_generated"] - before["tokens_generated"] < 60
    # the next request is served at once, not after the 400-token answer
    started = time.monotonic()
    slow_server.client().completions.create(model="stories260K", prompt="Once", max_tokens=3)
    assert time.monotonic() - started < 5.0


def test_client_giving_up_on_a_whole_answer_stops_its_generation(slow_server):
    before = wait_idle(slow_server, 5)["requests"]
    with pytest.raises(httpx.TimeoutException):
        slow_server.post(
            "/v1/completions", timeout=0.3, json={"prompt": "Once", "max_tokens": 400, "ignore_eos": True}
        )
    after = wait_idle(slow_server, 5)["requests"]
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["tokens_generated"] - before["tokens_generated"] < 60


def test_a_waiting_request_is_served_when_the_running_one_ends(slow_server):
    wait_idle(slow_server, 5)
    gate = long_stream(slow_server, max_tokens=300)  # holds the generator (6 s) while another waits
    gate_lines = gate.iter_lines()  # kept: a dropped line iterator closes the connection
    assert next(gate_lines).startswith("data: ")
    answers: list[str] = []

    def ask() -> None:
        answers.append(slow_server.client().completions.create(model="stories260K", prompt="Once", max_tokens=2).object)

    waiting = threading.Thread(target=ask)
    waiting.start()
    deadline = time.monotonic() + 5
    while slow_server.health().json()["queue"]["waiting"] != 1:
        assert time.monotonic() < deadline, "the second request never waited in the queue"
        time.sleep(0.02)
    assert answers == []
    gate.close()  # the running request goes away; the waiting one is served
    waiting.join(10)
    assert answers == ["text_completion"]
