"""An API fuzzer: schemathesis generates requests from the server's own OpenAPI document
(/openapi.json: the request bodies as the server validates them) and mutates them into what it
should refuse (wrong types, missing fields, values out of range, bodies that are not JSON), and
sends them to a live dllama-api process over stories260K. Every answer must be a success or an
error in OpenAI's shape, never a 5xx, and the server must still serve a plain request after.

Cases per operation and mode: DLLAMA_API_FUZZ_CASES (default 100, 800 requests with a body in
all; CI runs the default). Seeded (derandomized)
with a fixed server seed, so a failure repeats. The server runs with a 64-token context so
generated requests stay short. Found so far: a denormal temperature (1e-310) with top_k made
every probability NaN and the sampler raised IndexError (a 503 and a reloaded model); so did a
repeat_penalty of 5e-324 (logits divided by it overflowed; it is now bounded to [0.01, 100]).
"""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from api_support import ApiServer
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

CASES = int(os.environ.get("DLLAMA_API_FUZZ_CASES", "100"))


@pytest.fixture(scope="module")
def fuzzed_server(stories_files, tmp_path_factory):
    api = ApiServer(*stories_files, tmp_path_factory.mktemp("fuzz_api_logs") / "api.log", "--max-seq-len", "64",
                    "--seed", "1", api_key=None)
    yield api
    assert api.process.poll() is None, "the server died while being fuzzed"
    api.stop()


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    return schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json")


# every operation but /health (which answers 503 with its status, not an error); a route without a
# body has nothing to break (a path parameter is any string): only positive cases
BODIES = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"]
OPERATIONS = [("POST", path, mode) for path in BODIES for mode in ("positive", "negative")] + [
    ("GET", "/v1/models", "positive"), ("GET", "/v1/models/{model_id}", "positive")]


def check_openai_shape(response, body=None) -> None:
    assert response.status_code < 500, f"{response.status_code} for {body!r}: {response.text[:500]}"
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]
        assert "Traceback" not in error["message"]


@pytest.mark.parametrize("method,path,mode", OPERATIONS)
def test_every_answer_is_a_success_or_an_openai_error(fuzzed_server, api_schema, method, path, mode):
    """Positive cases follow the schema (the server may still refuse what it cannot serve);
    negative cases break it on purpose."""
    operation = api_schema[path][method]
    calls = []

    @settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    def fuzz(case) -> None:
        response = case.call(base_url=fuzzed_server.url, timeout=120)
        calls.append(response.status_code)
        check_openai_shape(response, case.body)

    fuzz()
    assert calls  # (one case only for a route without inputs)


@pytest.mark.parametrize("extra", [{}, {"top_k": 3}, {"min_p": 0.5}, {"top_p": 1.0}])
def test_a_denormal_temperature_is_greedy(fuzzed_server, extra):
    body = {"prompt": "Once upon a time", "max_tokens": 6, **extra}
    tiny = httpx.post(f"{fuzzed_server.url}/v1/completions", json={**body, "temperature": 1e-310}, timeout=60)
    greedy = httpx.post(f"{fuzzed_server.url}/v1/completions", json={**body, "temperature": 0}, timeout=60)
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


def test_a_repeat_penalty_that_would_overflow_is_a_400(fuzzed_server):
    answer = httpx.post(f"{fuzzed_server.url}/v1/completions", json={"prompt": "Once", "repeat_penalty": 5e-324},
                        timeout=60)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "repeat_penalty"


def test_the_server_still_serves_after_the_fuzzing(fuzzed_server, api_schema):
    # runs after the fuzzing in file order; the fixture's teardown also checks the process is alive
    answer = httpx.post(f"{fuzzed_server.url}/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 4,
                                                                     "temperature": 0}, timeout=60)
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"]
