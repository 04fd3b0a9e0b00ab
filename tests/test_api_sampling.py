"""What evaluation harnesses and agent clients ask of sampling, through a real dllama-api process
and the official `openai` client, on one node and on root + 1 worker (stories260K, f32):

- logprobs/top_logprobs on chat and completions, streamed and not: equal to the engine's own
  (in this process, the same model) and, for echo + max_tokens 0 (a harness's log-likelihood),
  to transformers' log-softmax of stories260K_hf within 1e-3;
- n > 1: choice i is what a lone request with seed + i gives;
- logit_bias, presence/frequency penalties, top_k: the text a local Sampler with the same settings gives;
- /tokenize and /detokenize in llama-server's shapes; --alias names the model too.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
from api_support import TEMPLATE, ApiServer, Worker, free_port, sse_events
from hf_reference import hf_logits, load_hf

from dllama_py.engine.engine import Engine
from dllama_py.engine.sampler import Penalties, Sampler
from dllama_py.generation.chat_session import ChatFormat
from dllama_py.generation.generator import Generator
from dllama_py.text.tokenizer import Tokenizer

STORY = "Once upon a time"
HI = [{"role": "user", "content": "Tell me a story about a cat."}]


@pytest.fixture(scope="module")
def tokenizer(stories_files) -> Tokenizer:
    return Tokenizer.load(stories_files[1])


@pytest.fixture(scope="module")
def local(stories_files):
    engine = Engine(stories_files[0], threads=1, log=lambda _: None)
    yield engine
    engine.close()


@pytest.fixture(scope="module", params=["one node", "root + 1 worker"])
def server(request, stories_files, tmp_path_factory):
    model, tok = stories_files
    logs = tmp_path_factory.mktemp("api_logs")
    worker = None
    extra = ["--alias", "gpt-4o-mini"]
    if request.param != "one node":
        worker = Worker(free_port(), logs / "worker.log")
        extra += ["--workers", worker.address]
    api = ApiServer(model, tok, logs / "api.log", *extra)
    yield api
    api.stop()
    if worker is not None:
        worker.stop()


def local_generation(engine: Engine, tokenizer: Tokenizer, prompt_ids: list[int], sampler: Sampler, n: int):
    """(ids, logprobs entries) of a local generation with the same engine code."""
    events = []
    result = Generator(engine, tokenizer).generate(prompt_ids, n, sampler, on_token=events.append)
    return result.generated_ids, [e.logprobs for e in events if e.id >= 0]


def chat_prompt(tokenizer: Tokenizer) -> list[int]:
    return ChatFormat(tokenizer, TEMPLATE).encode(HI)


# ---- log-probabilities -----------------------------------------------------------------------


def test_chat_logprobs_equal_the_engines(server, local, tokenizer):
    response = server.client().chat.completions.create(
        model="stories260K", messages=HI, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    ids, expected = local_generation(local, tokenizer, chat_prompt(tokenizer), Sampler(0.0, logprobs=3), 12)
    assert len(content) == len(ids) == response.usage.completion_tokens
    for entry, token, reference in zip(content, ids, expected):
        assert entry.bytes == list(tokenizer.id_to_piece(token))
        assert entry.logprob == pytest.approx(reference.logprob, abs=1e-5)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].bytes == entry.bytes  # greedy: the chosen token is the most likely
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([lp for _, lp in reference.top], abs=1e-5)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob


def test_streamed_chat_logprobs_equal_the_whole_answers(server):
    body = {"model": "stories260K", "messages": HI, "max_tokens": 10, "temperature": 0, "logprobs": True,
            "top_logprobs": 2}
    whole = server.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
    streamed = []
    for event in events(server.post("/v1/chat/completions", json={**body, "stream": True})):
        if event["choices"] and event["choices"][0]["logprobs"]:
            streamed += event["choices"][0]["logprobs"]["content"]
    assert streamed == whole


def events(response: httpx.Response) -> list[dict]:
    """The JSON events of a streamed response (without the closing [DONE])."""
    data = sse_events(response.text)
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_echo_logprobs_of_the_prompt_equal_transformers(server, testdata, tokenizer):
    text = "Once upon a time, there was a little girl named Lily. She loved to play outside."
    response = server.client().completions.create(
        model="stories260K", prompt=text, max_tokens=0, echo=True, logprobs=3)
    choice = response.choices[0]
    ids = tokenizer.encode(text, add_bos=True)
    assert choice.text == text
    assert choice.logprobs.tokens == [tokenizer.id_to_piece(i).decode("utf-8", errors="replace") for i in ids]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    torch.set_num_threads(1)
    logits = hf_logits(load_hf(testdata / "stories260K_hf"), ids).astype(np.float64)
    top = logits.max(1, keepdims=True)
    reference = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))  # log-softmax
    expected = [reference[i - 1, ids[i]] for i in range(1, len(ids))]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-3)
    for i in range(1, len(ids)):
        assert len(choice.logprobs.top_logprobs[i]) <= 3
        best = max(choice.logprobs.top_logprobs[i].values())
        assert best == pytest.approx(reference[i - 1].max(), abs=1e-3)


def test_completion_logprobs_streamed_and_not(server, local, tokenizer):
    body = {"model": "stories260K", "prompt": STORY, "max_tokens": 8, "temperature": 0, "logprobs": 2}
    whole = server.post("/v1/completions", json=body).json()["choices"][0]
    ids, expected = local_generation(local, tokenizer, tokenizer.encode(STORY), Sampler(0.0, logprobs=2), 8)
    assert whole["logprobs"]["token_logprobs"] == pytest.approx([e.logprob for e in expected], abs=1e-5)
    assert "".join(whole["logprobs"]["tokens"]) == tokenizer.decode(ids) or \
        "".join(whole["logprobs"]["tokens"]).lstrip() == whole["text"].lstrip()
    streamed = []
    for event in events(server.post("/v1/completions", json={**body, "stream": True})):
        if event["choices"] and event["choices"][0]["logprobs"]:
            streamed += event["choices"][0]["logprobs"]["token_logprobs"]
    assert streamed == whole["logprobs"]["token_logprobs"]


# ---- n > 1 ----------------------------------------------------------------------------------


def test_n_choices_each_equal_a_lone_request_with_its_seed(server):
    client = server.client()
    many = client.chat.completions.create(model="stories260K", messages=HI, max_tokens=16, temperature=1.0,
                                          top_p=0.9, seed=40, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    alone = [client.chat.completions.create(model="stories260K", messages=HI, max_tokens=16, temperature=1.0,
                                            top_p=0.9, seed=40 + i) for i in range(3)]
    assert [c.message.content for c in many.choices] == [a.choices[0].message.content for a in alone]
    assert len({a.choices[0].message.content for a in alone}) > 1  # different seeds, different stories
    assert many.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert many.usage.prompt_tokens == alone[0].usage.prompt_tokens  # the prompt counts once


def test_n_choices_streamed(server):
    body = {"model": "stories260K", "messages": HI, "max_tokens": 8, "temperature": 1.0, "seed": 3, "n": 2,
            "stream": True}
    texts: dict[int, str] = {}
    finishes = {}
    for event in events(server.post("/v1/chat/completions", json=body)):
        if not event["choices"]:
            continue
        choice = event["choices"][0]
        texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    whole = server.post("/v1/chat/completions", json={**body, "stream": False}).json()
    assert texts == {c["index"]: c["message"]["content"] for c in whole["choices"]}
    assert set(finishes) == {0, 1}


# ---- logit_bias, penalties, top_k ------------------------------------------------------------


def completion_text(server, **extra) -> str:
    body = {"model": "stories260K", "prompt": STORY, "max_tokens": 48, "temperature": 0, **extra}
    response = server.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def local_text(local, tokenizer, sampler: Sampler) -> str:
    return Generator(local, tokenizer).generate(tokenizer.encode(STORY), 48, sampler).text


def test_logit_bias_bans_and_forces_tokens(server, local, tokenizer):
    plain_ids = Generator(local, tokenizer).generate(tokenizer.encode(STORY), 24, Sampler(0.0)).generated_ids
    banned = plain_ids[0]
    text = completion_text(server, logit_bias={str(banned): -100})
    assert text == local_text(local, tokenizer, Sampler(0.0, logit_bias={banned: -100}))
    assert text != local_text(local, tokenizer, Sampler(0.0))
    forced = tokenizer.encode(" cat", add_bos=False)[-1]
    response = server.post("/v1/completions", json={"model": "stories260K", "prompt": STORY, "max_tokens": 5,
                                                    "temperature": 0, "logit_bias": {str(forced): 100},
                                                    "logprobs": 0})
    tokens = response.json()["choices"][0]["logprobs"]["tokens"]
    assert tokens == [tokenizer.id_to_piece(forced).decode()] * 5


@pytest.mark.parametrize("extra,sampler", [
    ({"frequency_penalty": 1.5}, lambda: Sampler(0.0, penalties=Penalties(frequency=1.5))),
    ({"presence_penalty": 2.0}, lambda: Sampler(0.0, penalties=Penalties(presence=2.0))),
    ({"repeat_penalty": 1.3, "repeat_last_n": 16}, lambda: Sampler(0.0, penalties=Penalties(repeat=1.3,
                                                                                            repeat_last_n=16))),
    ({"temperature": 0.9, "top_k": 5, "seed": 11}, lambda: Sampler(0.9, 0.9, 11, top_k=5)),
    ({"temperature": 0.9, "min_p": 0.2, "seed": 11}, lambda: Sampler(0.9, 0.9, 11, min_p=0.2)),
])
def test_penalties_and_filters_give_what_the_sampler_gives(server, local, tokenizer, extra, sampler):
    assert completion_text(server, **extra) == local_text(local, tokenizer, sampler())


@pytest.mark.parametrize("extra", [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                                   {"repeat_penalty": 1.3, "repeat_last_n": 16}])
def test_penalties_change_the_greedy_text(server, extra):
    assert completion_text(server, **extra) != completion_text(server)


# ---- tokenize, detokenize, aliases ------------------------------------------------------------


def test_tokenize_and_detokenize_in_llama_servers_shapes(server, tokenizer):
    response = httpx.post(f"{server.url}/tokenize", json={"content": STORY}, headers=server.headers())
    assert response.json() == {"tokens": tokenizer.encode(STORY, add_bos=False)}
    with_bos = httpx.post(f"{server.url}/tokenize", json={"content": STORY, "add_special": True,
                                                           "with_pieces": True}, headers=server.headers()).json()
    assert [t["id"] for t in with_bos["tokens"]] == tokenizer.encode(STORY, add_bos=True)
    assert with_bos["tokens"][1]["piece"] == tokenizer.id_to_piece(with_bos["tokens"][1]["id"]).decode()
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": response.json()["tokens"]}, headers=server.headers())
    assert back.json() == {"content": STORY}
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [99999]}, headers=server.headers())
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    wrong_type = httpx.post(f"{server.url}/tokenize", json={"content": 5}, headers=server.headers())
    assert wrong_type.status_code == 400 and wrong_type.json()["error"]["param"] == "content"


def test_an_alias_names_the_model_and_the_context_length_is_listed(server):
    client = server.client()
    answer = client.completions.create(model="gpt-4o-mini", prompt=STORY, max_tokens=2)
    assert answer.choices[0].text
    assert json.loads(client.models.list().model_dump_json())["data"][0]["context_length"] > 0
    response = server.post("/v1/completions", json={"model": "gpt-5", "prompt": STORY})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
