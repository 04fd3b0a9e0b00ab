"""Tool calls in text: the parser of a model's output (every form, whole and streamed piece by
piece), the templates' tool support, the fallback for templates without it, and the rendering of
tools, calls and results, equal to transformers' apply_chat_template on the real templates."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from dllama_py.text.chat import BUILTIN_TEMPLATES, render_chat, tool_support
from dllama_py.text.tool_calls import (
    ToolCall,
    ToolCallStream,
    parse_tool_calls,
    split_parallel_calls,
    tool_history_as_text,
    tools_system_prompt,
    with_tools_system_prompt,
)

NAMES = {"get_weather", "get_time"}
WEATHER = {"city": "Paris", "unit": "celsius"}


def calls_of(parsed) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


def streamed(text: str, names=NAMES, seed: int = 0) -> tuple[str, list[ToolCall], list]:
    """The text pushed in random pieces (1 to 6 characters): content, calls, and every event."""
    rng = random.Random(seed)
    stream = ToolCallStream(names)
    events, pos = [], 0
    while pos < len(text):
        size = rng.randint(1, 6)
        events += stream.push(text[pos : pos + size])
        pos += size
    events += stream.finish()
    content = "".join(e for e in events if isinstance(e, str))
    return content, [e for e in events if isinstance(e, ToolCall)], events


# ---- the parser -----------------------------------------------------------------------------

QWEN_ONE = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
QWEN_TWO = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
)

CASES = [
    # (output, expected content, expected calls)
    ("Hello there.", "Hello there.", []),
    ("  Two spaces first\n", "  Two spaces first\n", []),
    (QWEN_ONE, None, [("get_weather", WEATHER)]),
    (QWEN_TWO, None, [("get_weather", WEATHER), ("get_time", {"zone": "CET"})]),
    ("Let me look that up.\n" + QWEN_ONE, "Let me look that up.", [("get_weather", WEATHER)]),
    ("<think>\nThe user wants weather.\n</think>\n\n" + QWEN_ONE,
     "<think>\nThe user wants weather.\n</think>", [("get_weather", WEATHER)]),
    (QWEN_ONE + "\nI asked for the weather.", "I asked for the weather.", [("get_weather", WEATHER)]),
    # a tagged call may name any function, and give arguments as a JSON string
    ('<tool_call>{"name": "other", "arguments": "{\\"a\\": 1}"}</tool_call>', None, [("other", {"a": 1})]),
    # no closing tag: the end of the answer closes it
    ('<tool_call>\n{"name": "get_time", "arguments": {}}', None, [("get_time", {})]),
    # Llama 3.x JSON
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', None, [("get_weather", WEATHER)]),
    ('\n{"type": "function", "name": "get_time", "parameters": {"zone": "CET"}}', None, [("get_time", {"zone": "CET"})]),
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; {"name": "get_time", "parameters": {}}',
     None, [("get_weather", WEATHER), ("get_time", {})]),
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}\n{"name": "get_time", "parameters": {}}',
     None, [("get_weather", WEATHER), ("get_time", {})]),
    ('{"name": "get_time", "parameters": {"note": "a } and a { in a \\"string\\""}}', None,
     [("get_time", {"note": 'a } and a { in a "string"'})]),
    # Llama 3.x <|python_tag|>
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', None,
     [("get_weather", WEATHER)]),
    ('<|python_tag|>{"name": "get_time", "parameters": {}}; {"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
     None, [("get_time", {}), ("get_weather", WEATHER)]),
    ('<|python_tag|>brave_search.call(query="weather in Paris")', None, [("brave_search", {"query": "weather in Paris"})]),
    ('Searching.<|python_tag|>wolfram_alpha.call(query="2+2", n=3)', "Searching.", [("wolfram_alpha", {"query": "2+2", "n": 3})]),
]

MALFORMED = [
    # stays content, as written
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>',
    '<tool_call>\n{"arguments": {}}\n</tool_call>',
    '<tool_call>\n["get_weather"]\n</tool_call>',
    'Text, then <tool_call>\n{"name": "get_weather", "arguments": 5}\n</tool_call> and more',
    '{"name": "get_weather", "parameters": {"city": "Par',  # cut by max_tokens
    '{"name": "unknown_tool", "parameters": {}}',  # bare JSON must name an offered tool
    '{"answer": 42, "name": "get_weather"}',
    '{}',
    "{not json at all}",
    "<|python_tag|>print('hello')",
    "<|python_tag|>",
    "An unfinished <tool_ca",
    "<tool_call",
    "A < b and c > d, <tool> is not <tool_call>",
]


@pytest.mark.parametrize("output, content, calls", CASES)
def test_every_form_is_parsed(output, content, calls):
    parsed = parse_tool_calls(output, NAMES)
    assert calls_of(parsed) == calls
    assert parsed.content == content


@pytest.mark.parametrize("output, content, calls", CASES)
def test_streaming_in_any_pieces_says_the_same(output, content, calls):
    for seed in range(8):
        text, streamed_calls, _ = streamed(output, seed=seed)
        assert [(c.name, json.loads(c.arguments)) for c in streamed_calls] == calls
        assert text == (content or "")


@pytest.mark.parametrize("output", MALFORMED)
def test_malformed_calls_stay_content(output):
    parsed = parse_tool_calls(output, NAMES)
    assert parsed.calls == []
    assert parsed.content == output
    for seed in range(8):
        assert streamed(output, seed=seed)[:2] == (output, [])


def test_without_tool_names_a_bare_json_call_may_name_anything():
    assert calls_of(parse_tool_calls('{"name": "x", "parameters": {}}')) == [("x", {})]


def test_a_call_has_an_openai_id_and_shape():
    call = parse_tool_calls(QWEN_ONE, NAMES).calls[0]
    entry = call.openai()
    assert entry["id"].startswith("call_") and len(entry["id"]) == 29
    assert entry["type"] == "function"
    assert entry["function"] == {"name": "get_weather", "arguments": json.dumps(WEATHER)}
    assert len({c.id for c in parse_tool_calls(QWEN_TWO, NAMES).calls}) == 2


def test_content_streams_at_once_and_only_a_possible_call_waits():
    stream = ToolCallStream(NAMES)
    assert stream.push("The answer") == ["The answer"]
    assert stream.push(" is 4. <tool") == [" is 4."]  # ' <tool' may start a call
    assert stream.push("s> are fine") == [" <tools> are fine"]
    assert stream.push(" <tool_call>\n{\"name\": \"get_time\",") == []
    (call,) = stream.push(' "arguments": {}}\n</tool_call>')
    assert call.name == "get_time"
    assert stream.push("\n\n") == [] and stream.finish() == []  # white space after a call is dropped


def test_a_bare_json_answer_that_is_not_a_call_is_released_at_its_first_key():
    stream = ToolCallStream(NAMES)
    assert stream.push("{") == []
    assert stream.push('\n  "na') == []
    assert stream.push('me": "get_time"') == []  # may still be a call: held
    stream = ToolCallStream(NAMES)
    assert stream.push('{"answer"') == ['{"answer"']  # not a call's key: content at once
    assert stream.push(": 1}") == [": 1}"]


def test_a_long_streamed_json_answer_is_scanned_once():
    text = '{"name": "get_time", "parameters": {"list": [' + ", ".join(str(i) for i in range(20000)) + "]}}"
    stream = ToolCallStream(NAMES)
    events = []
    for i in range(0, len(text), 3):
        events += stream.push(text[i : i + 3])
    events += stream.finish()
    assert [e.name for e in events] == ["get_time"]


# ---- the templates' tool support and the fallback -------------------------------------------


def _template(testdata: Path, name: str) -> str:
    if name == "qwen3":
        return json.loads((testdata / "qwen3_tokenizer" / "tokenizer_config.json").read_text())["chat_template"]
    return (testdata / "chat_templates" / f"{name}.jinja").read_text()


REAL = ["qwen3", "meta-llama-Llama-3.2-3B-Instruct", "meta-llama-Llama-3.1-8B-Instruct", "Qwen-Qwen2.5-7B-Instruct"]


def test_real_templates_render_tools_calls_and_results(testdata):
    for name in REAL:
        support = tool_support(_template(testdata, name))
        assert (support.tools, support.tool_calls, support.tool_results) == (True, True, True), name


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_templates_have_no_place_for_tools(name):
    support = tool_support(name)
    assert not support.tools and not support.tool_calls


def test_the_fallback_prompt_lists_the_tools_and_the_reply_form():
    tools = [TOOLS[0], TOOLS[1]]
    prompt = tools_system_prompt(tools)
    lines = prompt.splitlines()
    assert json.loads(lines[lines.index("<tools>") + 1]) == TOOLS[0]
    assert json.loads(lines[lines.index("<tools>") + 2]) == TOOLS[1]
    assert '<tool_call>\n{"name": <function-name>, "arguments": <arguments-json-object>}\n</tool_call>' in prompt
    # the reply form it asks for is what the parser reads
    assert calls_of(parse_tool_calls('<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')) == [
        ("get_time", {})
    ]
    with_system = with_tools_system_prompt([{"role": "system", "content": "Be brief."}, USER], tools)
    assert with_system == [{"role": "system", "content": "Be brief.\n\n" + prompt}, USER]
    assert with_tools_system_prompt([USER], tools) == [{"role": "system", "content": prompt}, USER]


def test_history_as_text_for_templates_without_tool_calls():
    messages = [USER, PARALLEL_CALLS, RESULTS[0], RESULTS[1], {"role": "user", "content": "Thanks"}]
    out = tool_history_as_text(messages)
    assert out[0] == USER and out[-1] == {"role": "user", "content": "Thanks"}
    assert out[1] == {
        "role": "assistant",
        "content": 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
    }
    assert out[2] == {
        "role": "user",
        "content": "<tool_response>\n22 C, sunny\n</tool_response>\n<tool_response>\n14:05\n</tool_response>",
    }
    assert len(out) == 4
    # what the assistant wrote is what the parser reads back
    assert calls_of(parse_tool_calls(out[1]["content"])) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    # results only
    kept = tool_history_as_text(messages, calls=False)
    assert kept[1] == PARALLEL_CALLS and kept[2]["role"] == "user"


def test_split_parallel_calls():
    out = split_parallel_calls([USER, PARALLEL_CALLS])
    assert out[1] == {**PARALLEL_CALLS, "tool_calls": PARALLEL_CALLS["tool_calls"][:1]}
    assert out[2] == {**PARALLEL_CALLS, "content": "", "tool_calls": PARALLEL_CALLS["tool_calls"][1:]}


# ---- rendering equals transformers' ---------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. Paris"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a zone; non-ASCII: é 東京",
            "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
        },
    },
]
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
USER = {"role": "user", "content": "What is the weather in Paris, and the time?"}
ONE_CALL = {
    "role": "assistant",
    "content": "",
    "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    ],
}
PARALLEL_CALLS = {
    "role": "assistant",
    "content": "Checking.",
    "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {"zone": "CET"}}},
    ],
}
RESULTS = [
    {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
]
FINAL = {"role": "assistant", "content": "It is 22 C and sunny in Paris, and 14:05."}

CONVERSATIONS = {
    "tools, first turn": [SYSTEM, USER],
    "tools, no system message": [USER],
    "a call and its result": [SYSTEM, USER, ONE_CALL, RESULTS[0]],
    "a call, its result and the answer, next question": [
        SYSTEM, USER, ONE_CALL, RESULTS[0], FINAL, {"role": "user", "content": "And tomorrow?"}
    ],
}
PARALLEL = {"parallel calls and their results": [SYSTEM, USER, PARALLEL_CALLS, *RESULTS]}


def transformers_render(template: str, messages, tools, bos: str, **kwargs) -> str:
    """transformers' apply_chat_template, the reference (a tiny tokenizer: only its special tokens matter)."""
    from tokenizers import Tokenizer as HuggingFaceTokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=HuggingFaceTokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")),
        bos_token=bos or None,
        eos_token="<|eot_id|>",
    )
    return tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=template, tokenize=False, add_generation_prompt=True, **kwargs
    )


TEMPLATES = [("qwen3", ""), ("meta-llama-Llama-3.2-3B-Instruct", "<|begin_of_text|>"),
             ("meta-llama-Llama-3.1-8B-Instruct", "<|begin_of_text|>")]


@pytest.mark.parametrize("name, bos", TEMPLATES)
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_rendering_equals_transformers(testdata, name, bos, conversation):
    template = _template(testdata, name)
    messages = CONVERSATIONS[conversation]
    for tools in (TOOLS, None):
        expected = transformers_render(template, messages, tools, bos, date_string="26 Jul 2024")
        ours = render_chat(template, messages, True, bos_token=bos, tools=tools, date_string="26 Jul 2024")
        assert ours == expected
        if tools:
            assert "get_weather" in ours and "The current weather in a city." in ours
        if len(messages) > 2:
            assert "22 C, sunny" in ours


@pytest.mark.parametrize("name", ["qwen3", "Qwen-Qwen2.5-7B-Instruct"])
def test_parallel_calls_render_as_transformers_does(testdata, name):
    template = _template(testdata, name)
    messages = PARALLEL["parallel calls and their results"]
    expected = transformers_render(template, messages, TOOLS, "")
    assert render_chat(template, messages, True, tools=TOOLS) == expected
    assert expected.count('<tool_call>\n{"name": "get_') == 2
    assert expected.count("<tool_response>") == 2
