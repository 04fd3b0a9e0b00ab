"""Many users at once (continuous batching) through a real dllama-api process and the `openai`
client, on one node and on root + 1 worker (stories260K, f32 buffers, --parallel 8):

- 8 concurrent greedy requests (llama2.c's three reference prompts, each several times) return
  exactly llama2.c's reference texts, as one request alone does;
- sampled requests with seeds give what they give alone, whatever runs beside them;
- a request that joins while others stream is served at once, beside them (/health shows the
  slots in use), and everything it and they return is right;
- a cancelled stream frees its slot at once;
- the next turn of a chat goes back to the slot holding its prefix (x_dllama counts the cached
  tokens) while other conversations run.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from api_support import ApiServer, Worker, free_port, reference_completion

PROMPTS = ["Once upon a time", "Lily wanted to", "The cat"]


@pytest.fixture(scope="module", params=["one node", "root + 1 worker"])
def server(request, stories_files, tmp_path_factory):
    logs = tmp_path_factory.mktemp("parallel_logs")
    worker = None
    # 5 ms a token (per sequence) so streams overlap and a test can act during a generation
    extra = ["--parallel", "8", "--buffer-float-type", "f32", "--debug-token-delay-ms", "5"]
    if request.param != "one node":
        worker = Worker(free_port(), logs / "worker.log")
        extra += ["--workers", worker.address]
    api = ApiServer(*stories_files, logs / "api.log", *extra)
    yield api
    api.stop()
    if worker is not None:
        worker.stop()


def test_eight_concurrent_greedy_requests_return_llama2c_texts(server, testdata):
    client = server.client()
    refs = [reference_completion(testdata, PROMPTS[i % 3]) for i in range(8)]

    def ask(ref: dict) -> str:
        answer = client.completions.create(model="stories260K", prompt=ref["prompt"], temperature=0,
                                           max_tokens=ref["num_generated"])
        assert answer.usage.completion_tokens == ref["num_generated"]
        return ref["prompt"] + answer.choices[0].text

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(ask, refs))
    assert texts == [ref["text"] for ref in refs]
    health = server.get("/health").json()
    assert health["slots"]["total"] == 8 and health["requests"]["failed"] == 0


def test_sampled_requests_do_not_depend_on_what_runs_beside_them(server):
    client = server.client()

    def ask(seed: int) -> str:
        return client.chat.completions.create(
            model="stories260K", messages=[{"role": "user", "content": f"Story {seed}"}], temperature=0.9,
            top_p=0.9, seed=seed, max_tokens=32).choices[0].message.content

    alone = [ask(seed) for seed in range(4)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, [0, 1, 2, 3, 0, 1, 2, 3]))
    assert together == alone + alone


def stream_text(server: ApiServer, prompt: str, max_tokens: int, started: threading.Event | None = None) -> str:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    text = ""
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=server.headers(),
                      timeout=120) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event["choices"]:
                text += event["choices"][0]["text"]
                if started is not None:
                    started.set()
    return text


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true"
        time.sleep(0.01)


def test_a_request_joins_while_others_stream(server):
    lone = [stream_text(server, prompt, 150) for prompt in PROMPTS]
    started = [threading.Event() for _ in range(2)]
    with ThreadPoolExecutor(3) as pool:
        first = [pool.submit(stream_text, server, PROMPTS[i], 150, started[i]) for i in range(2)]
        for event in started:
            assert event.wait(60)
        in_use = server.get("/health").json()["slots"]["in_use"]
        late = pool.submit(stream_text, server, PROMPTS[2], 150)
        wait_for(lambda: server.get("/health").json()["slots"]["in_use"] >= 3 or late.done())
        texts = [f.result() for f in first] + [late.result()]
    assert in_use == 2
    assert texts == lone


def test_a_cancelled_stream_frees_its_slot_at_once(server):
    body = {"prompt": PROMPTS[0], "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=server.headers(),
                      timeout=60) as response:
        lines = response.iter_lines()  # kept: a generator dropped mid-way closes the response
        for line in lines:
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                break
        health = server.get("/health").json()
        assert health["slots"]["in_use"] == 1, json.dumps(health)
        response.close()  # the client hangs up
    wait_for(lambda: server.get("/health").json()["slots"]["in_use"] == 0, timeout=30)


def test_the_next_turn_of_a_chat_reuses_its_slot(server):
    client = server.client()
    conversations = [[{"role": "user", "content": f"Tell me about {name}."}] for name in ("Lily", "Tom", "Sue")]

    def turn(messages: list[dict]) -> dict:
        answer = client.chat.completions.create(model="stories260K", messages=messages, temperature=0, max_tokens=12)
        messages.append({"role": "assistant", "content": answer.choices[0].message.content})
        messages.append({"role": "user", "content": "And then?"})
        return answer.model_extra["x_dllama"]

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(turn, conversations))
        second = list(pool.map(turn, conversations))
    for x in second:
        assert x["prompt_tokens_cached"] > 10, x  # the first turn's prompt and answer stayed in its slot


def test_n_choices_evaluate_their_prompt_once(server):
    """n=3 samples of one new prompt: the prompt is evaluated once (the other two choices copy its
    slot and evaluate only its last token), and the choices still differ (each samples alone)."""
    client = server.client()
    prompt = "Zed the zebra zipped zippers on a zigzag zone while the wind was"  # in no slot yet
    answer = client.completions.create(model="stories260K", prompt=prompt, n=3, max_tokens=24, temperature=1.0,
                                       seed=5)
    x = answer.model_extra["x_dllama"]
    tokens = answer.usage.prompt_tokens
    # at most the prompt once and a token for each other choice (a slot may already hold its BOS)
    assert x["prompt_tokens_evaluated"] <= tokens + 2 and x["prompt_tokens_cached"] >= 2 * tokens - 2, x
    assert len({choice.text for choice in answer.choices}) > 1
