"""Tool calling on /v1/chat/completions, spoken to with the official `openai` client and LangChain.

A small random model never calls a tool by itself, so the round trips (call, tool result, final
answer) run on the real application (create_app over a real GenerationService, served by uvicorn
on a port) whose engine is scripted: it answers each request with the next text of a script,
token by token, through the real tokenizer (Qwen3's, or Llama 3's with the Llama 3.2 template).
Every prompt it is given is compared with transformers' apply_chat_template of the same
conversation. The real `dllama-api` process, on stories260K with the llama2 template (which has
no place for tools), shows that a request with tools gets an answer.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from api_support import free_port
from dllama_py.converter.convert_tokenizer import convert
from test_tool_calls import TOOLS, transformers_render

from dllama_py.api.app import create_app
from dllama_py.api.service import GenerationService
from dllama_py.engine.engine import EngineInfo, StepStats
from dllama_py.engine.exchange import FULL
from dllama_py.formats.tokenizer_file import write_tokenizer_file
from dllama_py.generation.chat_session import ChatFormat
from dllama_py.text.tokenizer import Tokenizer
from dllama_py.text.tool_calls import tools_system_prompt

CHAT = "/v1/chat/completions"
WEATHER_TOOL, TIME_TOOL = TOOLS
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}
QWEN_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
LLAMA_CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
ANSWER = "It is 22 C and sunny in Paris."


# ---- a scripted engine behind the real service and application ------------------------------


class ScriptedEngine:
    """Stands in for Engine: answers each prompt with the tokens of the next scripted text, then
    an end-of-turn token, and keeps every prompt it was given."""

    def __init__(self, tokenizer: Tokenizer, stop_id: int, seq_len: int = 8192) -> None:
        self.tokenizer, self.stop_id = tokenizer, stop_id
        self.seq_len = seq_len
        self.max_batch = 512
        self.slots = 1  # one sequence at a time (dllama-api's batcher sees a one-slot engine)
        self.config = SimpleNamespace(vocab_size=tokenizer.vocab_size)
        self.info = EngineInfo(1, "scripted", "f32", "f32", seq_len, 1)
        self.scripts: list[str] = []
        self.prompts: list[list[int]] = []
        self.context: list[int] = []
        self.pending: list[int] | None = None
        self.last: int | None = None

    def readout_for(self, sampler, vocab_limit):
        return FULL

    def step(self, tokens, start_pos, readout=FULL):
        if self.pending is not None and list(tokens) != [self.last]:
            self.pending = None  # a new prompt while an answer was cut short
        del self.context[start_pos:]
        self.context.extend(tokens)
        return StepStats(len(tokens), 0.01)

    def step_batch(self, sequences):
        (slot, start_pos, tokens, readout), = sequences
        return self.step(tokens, start_pos, readout)

    def next_token(self, sampler, index: int = 0) -> int:
        if self.pending is None:
            assert self.scripts, "the test gave no scripted answer for this request"
            self.prompts.append(list(self.context))
            text = self.scripts.pop(0)
            self.pending = self.tokenizer.encode(text, add_bos=False, parse_special=True) + [self.stop_id]
        token = self.pending.pop(0)
        if not self.pending:
            self.pending = None
        self.last = token
        return token

    def check_alive(self) -> None:
        pass

    def close(self) -> None:
        pass


class ScriptedServer:
    """The real application on 127.0.0.1 (uvicorn in a thread) over a scripted engine."""

    def __init__(
        self, tokenizer_path: Path, stop_token: str, chat_template: str | None = None, name: str = "qwen3"
    ) -> None:
        import uvicorn

        self.tokenizer = Tokenizer.load(tokenizer_path)
        self.engine = ScriptedEngine(self.tokenizer, self.tokenizer.token_to_id(stop_token))
        self.model = "scripted"
        self.service = GenerationService(
            self.tokenizer, lambda: self.engine, model_id=self.model, chat_template=chat_template, log=lambda _: None
        )
        self.name = name
        self.template = self.service.chat_format.template
        self.bos = self.service.chat_format.bos_text
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(self.service), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the scripted server did not start"
            time.sleep(0.02)

    def answer(self, *texts: str) -> None:
        """The texts the model 'generates' for the next requests, in order."""
        self.engine.scripts.extend(texts)

    def last_prompt(self) -> str:
        return self.tokenizer.decode(self.engine.prompts[-1])

    def client(self):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=30)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.service.close()


@pytest.fixture(scope="module")
def tokenizer_files(testdata: Path, tmp_path_factory) -> dict[str, Path]:
    """Qwen3's tokenizer (its own template) and Llama 3's with the Llama 3.2 template, as .t files."""
    folder = tmp_path_factory.mktemp("tool_tokenizers")
    llama32 = (testdata / "chat_templates" / "meta-llama-Llama-3.2-3B-Instruct.jinja").read_text()
    paths = {}
    for name, source, template in (("qwen3", "qwen3_tokenizer", None), ("llama32", "llama3_tokenizer", llama32)):
        tokenizer_file, _ = convert(testdata / source)
        if template is not None:
            tokenizer_file = dataclasses.replace(tokenizer_file, chat_template=template)
        paths[name] = folder / f"{name}.t"
        write_tokenizer_file(paths[name], tokenizer_file)
    return paths


FLAVOURS = {
    # name: (tokenizer, stop token, how the model calls get_weather)
    "qwen3": ("qwen3", "<|im_end|>", QWEN_CALL),
    "llama3.2": ("llama32", "<|eot_id|>", LLAMA_CALL),
}


@pytest.fixture(scope="module", params=sorted(FLAVOURS))
def scripted(request, tokenizer_files):
    tokenizer, stop, call = FLAVOURS[request.param]
    server = ScriptedServer(tokenizer_files[tokenizer], stop, name=request.param)
    server.call = call
    yield server
    server.stop()


@pytest.fixture(scope="module")
def qwen(tokenizer_files):
    server = ScriptedServer(tokenizer_files["qwen3"], "<|im_end|>")
    yield server
    server.stop()


def reference_prompt(server: ScriptedServer, messages: list[dict], tools) -> str:
    """transformers' rendering of the conversation, arguments given as objects as it expects them."""
    plain = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            message["content"] = message.get("content") or ""
            message["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in message["tool_calls"]
            ]
        plain.append(message)
    return transformers_render(server.template, plain, tools, server.bos)


def stream_chat(client, **kwargs) -> tuple[str, list[dict], str, list]:
    """A streamed chat: its content, its calls rebuilt from the deltas, its finish_reason, the chunks."""
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    content, calls, finish = "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "type": None, "function": {"name": "", "arguments": ""}})
            call["id"] = delta.id or call["id"]
            call["type"] = delta.type or call["type"]
            call["function"]["name"] += delta.function.name or ""
            call["function"]["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish, chunks


# ---- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_call_round_trip(scripted, stream):
    """The model calls a tool, gets its result, answers: as the openai client sees it, and as the
    model sees it (prompts equal to transformers' renderings)."""
    client = scripted.client()
    messages = [SYSTEM, QUESTION]
    scripted.answer(scripted.call)
    if stream:
        content, calls, finish, chunks = stream_chat(client, model=scripted.model, messages=messages, tools=TOOLS)
        assert content == ""
        (call,) = calls
        first = next(c for c in chunks if c.choices and c.choices[0].delta.tool_calls)
        delta = first.choices[0].delta.tool_calls[0]  # one chunk carries the whole call
        assert delta.id and delta.type == "function" and delta.function.name == "get_weather"
        assert json.loads(delta.function.arguments) == {"city": "Paris"}
        assistant = {"role": "assistant", "content": None, "tool_calls": calls}
    else:
        response = client.chat.completions.create(model=scripted.model, messages=messages, tools=TOOLS)
        choice = response.choices[0]
        finish = choice.finish_reason
        assert choice.message.content is None
        (call,) = [c.model_dump() for c in choice.message.tool_calls]
        assistant = choice.message  # sent back as the client returned it
    assert finish == "tool_calls"
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert scripted.last_prompt() == reference_prompt(scripted, messages, TOOLS)

    result = {"role": "tool", "tool_call_id": call["id"], "content": "22 C, sunny"}
    messages = [*messages, assistant, result]
    scripted.answer(ANSWER)
    if stream:
        content, calls, finish, _ = stream_chat(client, model=scripted.model, messages=messages, tools=TOOLS)
    else:
        response = client.chat.completions.create(model=scripted.model, messages=messages, tools=TOOLS)
        content, calls, finish = response.choices[0].message.content, response.choices[0].message.tool_calls, (
            response.choices[0].finish_reason
        )
    assert (content, calls or [], finish) == (ANSWER, [], "stop")
    plain_assistant = {"role": "assistant", "content": None, "tool_calls": [call]}
    expected = reference_prompt(scripted, [SYSTEM, QUESTION, plain_assistant, result], TOOLS)
    assert scripted.last_prompt() == expected
    assert "22 C, sunny" in expected and "get_weather" in expected


def test_parallel_calls(scripted):
    client = scripted.client()
    if scripted.name == "qwen3":
        output = QWEN_CALL + '\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    else:
        output = LLAMA_CALL + '; {"name": "get_time", "parameters": {"zone": "CET"}}'
    scripted.answer(output, output)
    response = client.chat.completions.create(model=scripted.model, messages=[QUESTION], tools=TOOLS)
    assert response.choices[0].finish_reason == "tool_calls"
    calls = response.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "CET"}),
    ]
    assert len({c.id for c in calls}) == 2
    _, streamed_calls, finish, _ = stream_chat(client, model=scripted.model, messages=[QUESTION], tools=TOOLS)
    assert finish == "tool_calls" and [c["function"]["name"] for c in streamed_calls] == ["get_weather", "get_time"]

    # both results go back; the Llama 3.2 template takes one call per message, so the calls are
    # rendered as consecutive assistant messages (transformers would refuse the conversation)
    messages = [
        QUESTION,
        response.choices[0].message,
        {"role": "tool", "tool_call_id": calls[0].id, "content": "22 C, sunny"},
        {"role": "tool", "tool_call_id": calls[1].id, "content": "14:05"},
    ]
    scripted.answer(ANSWER)
    final = client.chat.completions.create(model=scripted.model, messages=messages, tools=TOOLS)
    assert final.choices[0].message.content == ANSWER
    prompt = scripted.last_prompt()
    assert "22 C, sunny" in prompt and "14:05" in prompt and '"zone": "CET"' in prompt
    if scripted.name == "qwen3":
        dumped = [m if isinstance(m, dict) else m.model_dump() for m in messages]
        assert prompt == reference_prompt(scripted, dumped, TOOLS)


def test_parallel_tool_calls_false_keeps_the_first_call(qwen):
    output = QWEN_CALL + '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    qwen.answer(output, output)
    kwargs = dict(model=qwen.model, messages=[QUESTION], tools=TOOLS, parallel_tool_calls=False)
    response = qwen.client().chat.completions.create(**kwargs)
    assert [c.function.name for c in response.choices[0].message.tool_calls] == ["get_weather"]
    _, calls, finish, _ = stream_chat(qwen.client(), **kwargs)
    assert [c["function"]["name"] for c in calls] == ["get_weather"] and finish == "tool_calls"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_text_before_a_call_stays_content(qwen, stream):
    qwen.answer("Let me look that up.\n" + QWEN_CALL)
    kwargs = dict(model=qwen.model, messages=[QUESTION], tools=TOOLS)
    if stream:
        content, calls, finish, chunks = stream_chat(qwen.client(), **kwargs)
        names = [c["function"]["name"] for c in calls]
        # the content came first, then the call
        kinds = [
            "call" if c.choices[0].delta.tool_calls else "content"
            for c in chunks
            if c.choices and (c.choices[0].delta.tool_calls or c.choices[0].delta.content)
        ]
        assert kinds[-1] == "call" and set(kinds[:-1]) == {"content"}
    else:
        message = qwen.client().chat.completions.create(**kwargs).choices[0]
        content, names, finish = message.message.content, [c.function.name for c in message.message.tool_calls], (
            message.finish_reason
        )
    assert (content, names, finish) == ("Let me look that up.", ["get_weather"], "tool_calls")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_malformed_call_stays_content(qwen, stream):
    output = 'Here: <tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>'
    qwen.answer(output)
    kwargs = dict(model=qwen.model, messages=[QUESTION], tools=TOOLS)
    if stream:
        content, calls, finish, _ = stream_chat(qwen.client(), **kwargs)
    else:
        choice = qwen.client().chat.completions.create(**kwargs).choices[0]
        content, calls, finish = choice.message.content, choice.message.tool_calls or [], choice.finish_reason
    assert (content, calls, finish) == (output, [], "stop")


def test_plain_answers_stream_as_they_come_with_tools_offered(qwen):
    qwen.answer("Paris is a city in France. It is often sunny there in summer.")
    content, calls, finish, chunks = stream_chat(qwen.client(), model=qwen.model, messages=[QUESTION], tools=TOOLS)
    assert content == "Paris is a city in France. It is often sunny there in summer." and calls == []
    assert finish == "stop"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 5  # not held back to the end


def test_tool_choice_none_offers_no_tools_and_reads_no_calls(qwen):
    qwen.answer(QWEN_CALL)
    response = qwen.client().chat.completions.create(
        model=qwen.model, messages=[QUESTION], tools=TOOLS, tool_choice="none"
    )
    assert response.choices[0].message.content == QWEN_CALL
    assert response.choices[0].message.tool_calls is None and response.choices[0].finish_reason == "stop"
    assert qwen.last_prompt() == reference_prompt(qwen, [QUESTION], None)
    assert "get_weather" not in qwen.last_prompt()


def test_tools_on_a_template_without_a_place_for_them(tokenizer_files):
    """chatml has no place for tools: they are offered in the system message, the model's
    <tool_call> is read the same way, and calls and results go back as text."""
    server = ScriptedServer(tokenizer_files["qwen3"], "<|im_end|>", chat_template="chatml")
    try:
        client = server.client()
        server.answer(QWEN_CALL, ANSWER)
        first = client.chat.completions.create(model=server.model, messages=[SYSTEM, QUESTION], tools=TOOLS)
        assert first.choices[0].finish_reason == "tool_calls"
        (call,) = first.choices[0].message.tool_calls
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
        system = SYSTEM["content"] + "\n\n" + tools_system_prompt(TOOLS)
        assert server.last_prompt() == (
            f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{QUESTION['content']}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
        messages = [SYSTEM, QUESTION, first.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "22 C"}]
        final = client.chat.completions.create(model=server.model, messages=messages, tools=TOOLS)
        assert final.choices[0].message.content == ANSWER
        assert server.last_prompt().endswith(
            '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n22 C\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n"
        )
    finally:
        server.stop()


def test_langchain_bind_tools_round_trip(qwen):
    """LangChain's ChatOpenAI(...).bind_tools(...), driven as its users do: a call, its result, the answer."""
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{qwen.url}/v1", api_key="none", model=qwen.model, max_retries=0, timeout=30)
    bound = llm.bind_tools([WEATHER_TOOL, TIME_TOOL])
    qwen.answer(QWEN_CALL)
    message = bound.invoke([HumanMessage(QUESTION["content"])])
    assert isinstance(message, AIMessage)
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert message.response_metadata["finish_reason"] == "tool_calls"
    qwen.answer(ANSWER)
    history = [HumanMessage(QUESTION["content"]), message, ToolMessage("22 C", tool_call_id=message.tool_calls[0]["id"])]
    final = bound.invoke(history)
    assert isinstance(final, AIMessage) and final.content == ANSWER and final.tool_calls == []
    assert "<tool_response>\n22 C\n</tool_response>" in qwen.last_prompt()
    # streaming: LangChain merges the chunks into the same call
    qwen.answer(QWEN_CALL)
    merged = None
    for chunk in bound.stream([HumanMessage(QUESTION["content"])]):
        merged = chunk if merged is None else merged + chunk
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [("get_weather", {"city": "Paris"})]


# ---- the real dllama-api process ------------------------------------------------------------




OPEN_WEBUI_STYLE = [
    {
        "type": "function",
        "function": {
            "name": "get_current_timestamp",
            "description": "Get the current Unix timestamp in seconds",
            "parameters": {"type": "object", "properties": {}, "required": []},
        },
    }
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_real_server_answers_tools_on_a_template_without_them(server, stories_files, stream):
    """stories260K with the llama2 template: the tools go into a system prompt, and the answer is a 200."""
    client = server.client()
    messages = [{"role": "user", "content": "Once upon a time"}]
    kwargs = dict(model="stories260K", messages=messages, tools=OPEN_WEBUI_STYLE, max_tokens=6, temperature=0)
    expected_prompt = ChatFormat(Tokenizer.load(stories_files[1]), "llama2").encode(messages, tools=OPEN_WEBUI_STYLE)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        assert chunks[-1].usage.prompt_tokens == len(expected_prompt)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop", "tool_calls")
    else:
        response = client.chat.completions.create(**kwargs)
        assert response.object == "chat.completion"
        assert response.choices[0].finish_reason in ("length", "stop", "tool_calls")
        assert response.usage.prompt_tokens == len(expected_prompt)
        plain = client.chat.completions.create(**{**kwargs, "tools": None})
        assert plain.usage.prompt_tokens < response.usage.prompt_tokens  # the tools were offered


def test_real_server_takes_a_history_of_calls_and_results(server):
    """Calls and results written as text for the llama2 template, parallel calls and text parts included."""
    messages = [
        {"role": "user", "content": "Once upon a time"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_current_timestamp", "arguments": "{}"}},
                {"id": "call_2", "type": "function", "function": {"name": "get_current_timestamp", "arguments": ""}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "1700000000"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "1700000001"}]},
    ]
    # (no tools this turn: with them, the prompt would not fit in stories260K's 512 positions)
    response = server.post(CHAT, json={"messages": messages, "max_tokens": 4})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


def test_real_server_with_langchain_bind_tools(server):
    from langchain_core.messages import AIMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"{server.url}/v1", api_key=server.api_key, model="stories260K", max_tokens=8, temperature=0,
        max_retries=0, timeout=30,
    )
    message = llm.bind_tools([WEATHER_TOOL]).invoke("Once upon a time")
    assert isinstance(message, AIMessage)
    assert isinstance(message.content, str) and message.response_metadata["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize(
    "extra, param, code",
    [
        ({"tool_choice": {"type": "function", "function": {"name": "no_such_tool"}}}, "tool_choice", None),
        ({"tool_choice": {"type": "function"}}, "tool_choice", None),
        ({"tool_choice": "sometimes"}, "tool_choice", None),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name", None),
        ({"tools": [{"type": "function"}]}, "tools[0].function", None),
        ({"tools": ["get_weather"]}, "tools[0]", None),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type", "unsupported_parameter"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}, {"role": "user", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}], "content": "y"}]},
         "messages[1].tool_calls", None),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]},
         "messages[0].tool_calls[0].function.name", None),
        ({"messages": [{"role": "tool", "tool_call_id": "1"}]}, "messages[0].content", None),
    ],
)
def test_tool_requests_the_server_cannot_serve_are_400(server, extra, param, code):
    body = {"messages": [QUESTION], "tools": [WEATHER_TOOL], **extra}
    response = server.post(CHAT, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    if code:
        assert error["code"] == code
    if param == "tool_choice" and code:
        assert "constrained decoding" in error["message"] and "'auto' or 'none'" in error["message"]


def test_empty_tools_and_tool_choice_alone_are_plain_chat(server):
    for extra in ({"tools": []}, {"tool_choice": "auto"}, {"tools": [], "tool_choice": "none"}):
        response = server.post(CHAT, json={"messages": [QUESTION], "max_tokens": 2, **extra})
        assert response.status_code == 200, response.text
        assert "tool_calls" not in response.json()["choices"][0]["message"]

