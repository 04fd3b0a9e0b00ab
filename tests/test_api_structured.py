"""Structured output and forced tool calls through a real dllama-api process and the `openai`
client: whatever the model (stories260K, which knows nothing of JSON), constrained decoding
makes every answer valid.

- response_format json_schema on many schemas (nested objects, enums, arrays, bounded integers,
  booleans, nulls, optional fields, anyOf), greedy and sampled: every answer parses and
  `jsonschema` validates it; json_object gives a JSON object. (A grammar cannot bound how many
  digits a JSON number has or how long an unbounded string is: stories260K, greedy, writes
  -3.1000000... until max_tokens; so the schemas here bound their strings and use integers.);
- tool_choice 'required' and a named function: the answer is a tool call (finish_reason
  'tool_calls') whose arguments validate against the function's parameters, streamed and
  not; then the tool's result goes back and the model answers in text (a whole round trip);
- LangChain's `with_structured_output`, driven as its users do.
"""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from api_support import ApiServer, Worker, free_port
from test_api_tools import ANSWER, FLAVOURS, ScriptedEngine, ScriptedServer, tokenizer_files  # noqa: F401

HI = [{"role": "user", "content": "Describe the weather as JSON."}]

SCHEMAS = {
    "flat object": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 16}, "warm": {"type": "boolean"}},
        "required": ["city", "warm"], "additionalProperties": False,
    },
    "enum and integer bounds": {
        "type": "object",
        "properties": {"unit": {"enum": ["celsius", "fahrenheit"]},
                       "temperature": {"type": "integer", "minimum": -40, "maximum": 50}},
        "required": ["unit", "temperature"], "additionalProperties": False,
    },
    "nested objects": {
        "type": "object",
        "properties": {
            "place": {"type": "object",
                      "properties": {"name": {"type": "string", "maxLength": 10},
                                     "location": {"type": "object",
                                                  "properties": {"lat": {"type": "integer", "minimum": -90,
                                                                         "maximum": 90},
                                                                 "lon": {"type": "integer", "minimum": -180,
                                                                         "maximum": 180}},
                                                  "required": ["lat", "lon"], "additionalProperties": False}},
                      "required": ["name", "location"], "additionalProperties": False},
        },
        "required": ["place"], "additionalProperties": False,
    },
    "array of numbers": {
        "type": "object",
        "properties": {"readings": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                                    "minItems": 1, "maxItems": 4}},
        "required": ["readings"], "additionalProperties": False,
    },
    "array of objects with optional fields and null": {
        "type": "object",
        "properties": {"days": {"type": "array", "maxItems": 3, "items": {
            "type": "object",
            "properties": {"day": {"enum": ["mon", "tue", "wed"]}, "rain": {"type": ["boolean", "null"]},
                           "note": {"type": "string", "maxLength": 8}},
            "required": ["day", "rain"], "additionalProperties": False}}},
        "required": ["days"], "additionalProperties": False,
    },
    "top-level array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 5},
    "anyOf": {"anyOf": [{"type": "object", "properties": {"ok": {"const": True}}, "required": ["ok"],
                         "additionalProperties": False},
                        {"type": "object", "properties": {"error": {"type": "string", "maxLength": 12}},
                         "required": ["error"], "additionalProperties": False}]},
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string", "maxLength": 20},
                                      "unit": {"enum": ["celsius", "fahrenheit"]}},
                       "required": ["city", "unit"], "additionalProperties": False},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "description": "The time in a zone.",
                 "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                "required": ["zone"], "additionalProperties": False}},
}


@pytest.fixture(scope="module")
def server(stories_files, tmp_path_factory):
    """stories260K with the chatml template, which has no place for tools: they are offered in a
    system prompt and called in <tool_call> tags (text/tool_calls.py)."""
    api = ApiServer(*stories_files, tmp_path_factory.mktemp("api_logs") / "api.log", "--chat-template", "chatml")
    yield api
    api.stop()


@pytest.mark.parametrize("name", list(SCHEMAS))
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "top_p": 1.0, "seed": 3}],
                         ids=["greedy", "sampled"])
def test_json_schema_answers_validate(server, name, sampling):
    schema = SCHEMAS[name]
    response = server.client().chat.completions.create(
        model="stories260K", messages=HI, max_tokens=300, **sampling,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    choice = response.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), schema)


def test_on_a_cluster_the_mask_applies_at_the_root(server, stories_files, tmp_path_factory):
    """Root + 1 worker: the root gathers every logit and masks them where it samples; the answer
    validates and equals one node's (the same logits within f32 sums, greedy)."""
    logs = tmp_path_factory.mktemp("api_cluster_logs")
    worker = Worker(free_port(), logs / "worker.log")
    try:
        cluster = ApiServer(*stories_files, logs / "api.log", "--chat-template", "chatml", "--workers", worker.address)
        try:
            schema = SCHEMAS["array of objects with optional fields and null"]
            body = {"model": "stories260K", "messages": HI, "max_tokens": 300, "temperature": 0,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}
            answer = cluster.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        finally:
            cluster.stop()
    finally:
        worker.stop()
    jsonschema.validate(json.loads(answer), schema)
    alone = server.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert answer == alone


def test_json_object_answers_are_objects_streamed_and_not(random_server):
    """Any JSON object, from the random 'model' told by logit_bias to like closing quotes and braces
    (else it may write keys for ever, as an object of any shape allows)."""
    closing = {str(random_server.tokenizer.encode_continuation(c)[0]): 8 for c in ('"', "}")}
    body = {"model": "scripted", "messages": HI, "max_tokens": 400, "temperature": 1.0, "top_p": 1.0,
            "response_format": {"type": "json_object"}, "logit_bias": closing}
    client = random_server.client()
    whole = client.chat.completions.create(**body).choices[0]
    assert whole.finish_reason == "stop"
    assert isinstance(json.loads(whole.message.content), dict)
    streamed = "".join(chunk.choices[0].delta.content or ""
                       for chunk in client.chat.completions.create(**body, stream=True) if chunk.choices)
    assert isinstance(json.loads(streamed), dict)


class RandomEngine(ScriptedEngine):
    """A model that wants to say anything at all: normal random logits over the whole vocabulary
    (seeded), unless the test scripted an answer. Only the grammar makes its output a call."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rng = np.random.default_rng(0)
        self.chosen: list[int] = []

    def next_token(self, sampler, index: int = 0) -> int:
        if self.scripts or self.pending is not None:
            return super().next_token(sampler)
        token = sampler.sample((self.rng.standard_normal(self.tokenizer.vocab_size) * 3).astype(np.float32))
        self.chosen.append(token)
        return token


@pytest.fixture(scope="module", params=sorted(FLAVOURS))
def random_server(request, tokenizer_files):
    """The real application over a random 'model' with Qwen3's vocabulary and template (calls in
    <tool_call> special tokens) or Llama 3.2's (calls as bare JSON with "parameters")."""
    tokenizer, stop, _ = FLAVOURS[request.param]
    server = ScriptedServer(tokenizer_files[tokenizer], stop, name=request.param)
    server.engine = RandomEngine(server.tokenizer, server.tokenizer.token_to_id(stop))
    server.service._install(server.engine)
    yield server
    server.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_a_forced_tool_call_is_a_valid_call_then_the_round_trip_ends_in_text(random_server, stream, choice):
    client = random_server.client()
    messages = [{"role": "user", "content": "What is the weather in Paris, and the time?"}]
    kwargs = dict(model="scripted", messages=messages, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=300,
                  temperature=1.0, top_p=1.0, seed=5)
    if stream:
        calls: dict[int, dict] = {}
        finish = None
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            if not chunk.choices:
                continue
            for call in chunk.choices[0].delta.tool_calls or []:
                calls[call.index] = {"id": call.id, "name": call.function.name, "arguments": call.function.arguments}
            finish = chunk.choices[0].finish_reason or finish
        calls_made = [calls[i] for i in sorted(calls)]
    else:
        response = client.chat.completions.create(**kwargs)
        finish = response.choices[0].finish_reason
        calls_made = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                      for c in response.choices[0].message.tool_calls or []]
    assert finish == "tool_calls"
    assert calls_made
    tools = {"get_weather": WEATHER, "get_time": TIME}
    for call in calls_made:
        if choice != "required":
            assert call["name"] == "get_time"
        jsonschema.validate(json.loads(call["arguments"]), tools[call["name"]]["function"]["parameters"])
    # the round trip: the calls, their results (rendered by the model's own template), a final answer
    messages.append({"role": "assistant", "content": None, "tool_calls": [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in calls_made]})
    for c in calls_made:
        messages.append({"role": "tool", "tool_call_id": c["id"], "content": json.dumps({"result": "sunny, 21"})})
    random_server.answer(ANSWER)
    final = client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER, TIME])
    assert final.choices[0].message.content == ANSWER and not final.choices[0].message.tool_calls
    assert "sunny, 21" in random_server.last_prompt()


def test_the_call_is_in_the_models_own_form(random_server):
    """Qwen3 writes <tool_call> special tokens; Llama 3.2 a bare object with "parameters"."""
    random_server.engine.chosen.clear()
    response = random_server.client().chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "Time?"}], tools=[TIME],
        tool_choice="required", max_tokens=200, temperature=1.0, top_p=1.0, seed=1)
    first = random_server.tokenizer.id_to_piece(random_server.engine.chosen[0])
    if random_server.name == "qwen3":
        assert random_server.engine.chosen[0] == random_server.tokenizer.token_to_id("<tool_call>")
    else:
        assert first.strip().startswith(b"{")
    assert response.choices[0].message.tool_calls[0].function.name == "get_time"


def test_parallel_tool_calls_false_gives_one_call(random_server):
    response = random_server.client().chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER, TIME],
        tool_choice="required", parallel_tool_calls=False, max_tokens=300, temperature=1.0, top_p=1.0, seed=2)
    assert len(response.choices[0].message.tool_calls) == 1


def test_langchain_with_structured_output(server, random_server):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Forecast(BaseModel):
        city: str = Field(max_length=12)
        celsius: int = Field(ge=-40, le=50)
        sunny: bool

    llm = ChatOpenAI(model="stories260K", base_url=f"{server.url}/v1", api_key=server.api_key, temperature=0,
                     max_tokens=200, max_retries=0)
    forecast = llm.with_structured_output(Forecast, method="json_schema").invoke("The weather in Paris?")
    assert isinstance(forecast, Forecast) and -40 <= forecast.celsius <= 50
    # as a forced call of a 'Forecast' tool (LangChain's function_calling method)
    agent = ChatOpenAI(model="scripted", base_url=f"{random_server.url}/v1", api_key="none", temperature=1.0,
                       top_p=1.0, seed=4, max_tokens=300, max_retries=0)
    as_tool = agent.with_structured_output(Forecast, method="function_calling").invoke("The weather in Paris?")
    assert isinstance(as_tool, Forecast) and -40 <= as_tool.celsius <= 50


def test_a_schema_the_grammar_cannot_compile_is_a_400(server):
    response = server.post("/v1/chat/completions", json={
        "model": "stories260K", "messages": HI,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                                        "minProperties": "two"}}}})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "response_format"
