"""dllama-api as a real process, spoken to with the official `openai` package and httpx:
chat and completions (streaming or not), usage counts, stop sequences, max_tokens, seeds,
llama2.c's reference text, concurrency and KV-cache reuse. Every test runs twice: on one node
and on a root + 1 worker cluster.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from api_support import (
    TEMPLATE,
    ApiServer,
    Worker,
    free_port,
    reference_completion,
    sse_events,
)

from dllama_py.generation.chat_session import ChatFormat
from dllama_py.generation.generator import common_prefix
from dllama_py.text.tokenizer import Tokenizer

STORY = "Once upon a time"



@pytest.fixture(scope="session")
def tokenizer(stories_files) -> Tokenizer:
    return Tokenizer.load(stories_files[1])


@pytest.fixture(scope="module", params=["one node", "root + 1 worker"])
def server(request, stories_files, tmp_path_factory):
    model, tok = stories_files
    logs = tmp_path_factory.mktemp("api_logs")
    worker = None
    extra: list[str] = []
    if request.param != "one node":
        worker = Worker(free_port(), logs / "worker.log")
        extra = ["--workers", worker.address]
    api = ApiServer(model, tok, logs / "api.log", *extra)
    yield api
    api.stop()
    if worker is not None:
        worker.stop()


def chat_ids(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    return ChatFormat(tokenizer, TEMPLATE).encode(messages)


# ---- models and health ----------------------------------------------------------------------


def test_models_lists_the_loaded_model(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["stories260K"]
    assert models.data[0].object == "model"
    assert server.client().models.retrieve("stories260K").id == "stories260K"


def test_health_reports_the_model_and_its_nodes(server):
    response = server.health()
    assert response.status_code == 200
    status = response.json()
    assert status["status"] == "ok" and status["model_loaded"] is True
    assert status["nodes"] == 1 + len(status["workers"])
    assert all(w["connected"] for w in status["workers"])
    assert status["context"] == 512


def test_startup_log_names_the_url(server):
    assert "dllama-api: serving stories260K on " in server.log()
    assert f"http://127.0.0.1:{server.port}" in server.log()


# ---- completions ----------------------------------------------------------------------------


def test_greedy_completion_equals_llama2c_reference(server, testdata):
    ref = reference_completion(testdata, STORY)
    completion = server.client().completions.create(
        model="stories260K", prompt=STORY, temperature=0, max_tokens=ref["num_generated"]
    )
    assert completion.object == "text_completion"
    choice = completion.choices[0]
    assert STORY + choice.text == ref["text"]
    assert choice.finish_reason == "length"
    assert completion.usage.prompt_tokens == len(ref["prompt_ids_with_bos"])
    assert completion.usage.completion_tokens == ref["num_generated"]
    assert completion.usage.total_tokens == len(ref["prompt_ids_with_bos"]) + ref["num_generated"]


def test_streamed_completion_equals_the_reference_too(server, testdata):
    ref = reference_completion(testdata, STORY)
    stream = server.client().completions.create(
        model="stories260K",
        prompt=STORY,
        temperature=0,
        max_tokens=ref["num_generated"],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert STORY + text == ref["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == ref["num_generated"]
    assert chunks[-1].usage.prompt_tokens == len(ref["prompt_ids_with_bos"])


def test_completion_of_token_ids_and_echo(server, testdata):
    ref = reference_completion(testdata, STORY)
    completion = server.client().completions.create(
        model="stories260K", prompt=ref["prompt_ids_with_bos"], temperature=0, max_tokens=10, echo=True
    )
    assert ref["text"].startswith(completion.choices[0].text)
    assert completion.choices[0].text.startswith(STORY)


def test_stop_sequences_cut_the_text_and_finish_with_stop(server, testdata):
    ref = reference_completion(testdata, STORY)
    client = server.client()
    full = ref["text"][len(STORY) :]
    completion = client.completions.create(model="stories260K", prompt=STORY, temperature=0, max_tokens=60, stop="Lily")
    assert completion.choices[0].text == full[: full.index("Lily")]
    assert completion.choices[0].finish_reason == "stop"
    # the earliest of several stop strings wins, streaming too
    stream = client.completions.create(
        model="stories260K", prompt=STORY, temperature=0, max_tokens=60, stop=["park", "girl"], stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == full[: full.index("girl")]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_ends_with_length(server):
    completion = server.client().completions.create(model="stories260K", prompt=STORY, temperature=0, max_tokens=5)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5


def test_a_seed_gives_the_same_text_twice(server):
    client = server.client()

    def sample(seed: int) -> str:
        return (
            client.completions.create(
                model="stories260K", prompt=STORY, temperature=1.0, top_p=0.9, seed=seed, max_tokens=30
            )
            .choices[0]
            .text
        )

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


# ---- chat -----------------------------------------------------------------------------------


def test_chat_answer_has_usage_equal_to_the_tokenizer_count(server, tokenizer):
    messages = [
        {"role": "system", "content": "You tell short stories."},
        {"role": "user", "content": "Tell me about a cat."},
    ]
    completion = server.client().chat.completions.create(
        model="stories260K", messages=messages, temperature=0, max_tokens=12
    )
    assert completion.object == "chat.completion"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert completion.usage.prompt_tokens == len(chat_ids(tokenizer, messages))
    assert completion.usage.completion_tokens == 12


def test_chat_stop_string_finishes_with_stop(server):
    messages = [{"role": "user", "content": "Hello"}]
    client = server.client()
    whole = client.chat.completions.create(model="stories260K", messages=messages, temperature=0, max_tokens=40)
    text = whole.choices[0].message.content
    assert "." in text
    cut = client.chat.completions.create(
        model="stories260K", messages=messages, temperature=0, max_tokens=40, stop=["."]
    )
    assert cut.choices[0].message.content == text[: text.index(".")]
    assert cut.choices[0].finish_reason == "stop"


def test_streamed_chat_equals_the_whole_answer(server):
    messages = [{"role": "user", "content": "Tell me a story about a dog."}]
    client = server.client()
    whole = client.chat.completions.create(model="stories260K", messages=messages, temperature=0, max_tokens=30)
    stream = client.chat.completions.create(
        model="stories260K",
        messages=messages,
        temperature=0,
        max_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_is_server_sent_events_ending_with_done(server):
    body = {
        "model": "stories260K",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 5,
        "stream": True,
        "temperature": 0,
    }
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, headers=server.headers(), timeout=30
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    objects = [json.loads(e) for e in events[:-1]]
    assert len({o["id"] for o in objects}) == 1
    assert objects[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in objects[-1]  # only with stream_options.include_usage


def test_list_of_text_parts_is_the_same_as_a_string(server):
    client = server.client()
    plain = client.chat.completions.create(
        model="stories260K", temperature=0, max_tokens=8, messages=[{"role": "user", "content": "Tell me a story"}]
    )
    parts = client.chat.completions.create(
        model="stories260K",
        temperature=0,
        max_tokens=8,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Tell me a story"}]}],
    )
    assert parts.choices[0].message.content == plain.choices[0].message.content


def test_second_chat_turn_evaluates_only_the_new_tokens(server, tokenizer):
    client = server.client()
    first = [{"role": "user", "content": "Write about a little red bird."}]
    answer = client.chat.completions.create(model="stories260K", messages=first, temperature=0, max_tokens=20)
    second = first + [
        {"role": "assistant", "content": answer.choices[0].message.content},
        {"role": "user", "content": "What did the bird do next?"},
    ]
    reply = client.chat.completions.create(model="stories260K", messages=second, temperature=0, max_tokens=5)
    ids_first, ids_second = chat_ids(tokenizer, first), chat_ids(tokenizer, second)
    assert common_prefix(ids_first, ids_second) == len(ids_first)
    x_dllama = reply.model_extra["x_dllama"]
    assert reply.usage.prompt_tokens == len(ids_second)
    assert x_dllama["prompt_tokens_cached"] >= len(ids_first)  # the first turn was not evaluated again
    assert x_dllama["prompt_tokens_evaluated"] <= len(ids_second) - len(ids_first)
    assert x_dllama["prompt_tokens_evaluated"] + x_dllama["prompt_tokens_cached"] == len(ids_second)


# ---- concurrency ----------------------------------------------------------------------------

PROMPTS = [
    "Once upon a time",
    "Lily wanted to",
    "The cat",
    "Tom and his dog",
    "One day, a bird",
    "The sun was",
    "Sam had a red",
    "In the park",
]


def test_eight_concurrent_clients_each_get_their_own_text(server):
    client = server.client()

    def complete(i: int) -> str:
        prompt, max_tokens = PROMPTS[i], 20 + i
        if i % 2:  # half of them stream
            stream = client.completions.create(
                model="stories260K", prompt=prompt, temperature=0, max_tokens=max_tokens, stream=True
            )
            return "".join(c.choices[0].text for c in stream)
        return (
            client.completions.create(model="stories260K", prompt=prompt, temperature=0, max_tokens=max_tokens)
            .choices[0]
            .text
        )

    alone = [complete(i) for i in range(len(PROMPTS))]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(complete, range(len(PROMPTS))))
    assert together == alone
    assert len(set(alone)) == len(PROMPTS)
