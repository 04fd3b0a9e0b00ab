"""Chat templates render exactly as transformers renders them."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
from tokenizer_references import converted_paths, tokenizers  # noqa: F401

from dllama_py.text.chat import (
    BUILTIN_TEMPLATES,
    end_of_turn_tokens,
    render_chat,
    resolve_template,
    template_family,
)
from dllama_py.text.tokenizer import Tokenizer

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
]


def _chat_cases(testdata: Path) -> list[dict]:
    reference = json.loads((testdata / "reference" / "tokenizers_reference.json").read_text(encoding="utf-8"))
    return reference["chat_cases"]


def _template(testdata: Path, name: str) -> str:
    path, _, key = name.partition(":")
    if key:
        return json.loads((testdata / path).read_text(encoding="utf-8"))[key]
    return (testdata / path).read_text(encoding="utf-8")


def test_reference_chat_cases_render_identically(testdata: Path) -> None:
    cases = _chat_cases(testdata)
    assert len(cases) >= 10
    for case in cases:
        variables = dict(case.get("extra_variables") or {})
        if "enable_thinking" in case:
            variables["enable_thinking"] = case["enable_thinking"]
        rendered = render_chat(
            _template(testdata, case["template"]), case["messages"], case["add_generation_prompt"], **variables
        )
        assert rendered == case["rendered"], case["template"]


def test_rendered_chat_encodes_to_reference_ids(testdata: Path, tokenizers: dict[str, Tokenizer]) -> None:
    for case in _chat_cases(testdata):
        for key, name in (("ids_qwen3_hf", "qwen3"), ("ids_llama3_tiktoken_specials_allowed", "llama3")):
            if key in case:
                assert tokenizers[name].encode(case["rendered"], add_bos=False) == case[key]


def test_end_of_turn_token_is_detected(testdata: Path) -> None:
    qwen3 = _template(testdata, "qwen3_tokenizer/tokenizer_config.json:chat_template")
    llama31 = _template(testdata, "chat_templates/meta-llama-Llama-3.1-8B-Instruct.jinja")
    assert end_of_turn_tokens(qwen3)[0] == "<|im_end|>"
    assert end_of_turn_tokens(llama31) == ["<|eot_id|>", "<|eom_id|>"]
    assert end_of_turn_tokens("llama2", eos_token="</s>") == ["</s>"]
    assert end_of_turn_tokens("deepseek3")[0] == "<｜end▁of▁sentence｜>"
    assert template_family(qwen3) == "chatml" and template_family(llama31) == "llama3"


def test_builtin_templates_render_by_name() -> None:
    assert render_chat("chatml", MESSAGES[:2]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_chat("llama3", MESSAGES[1:2], bos_token="<|begin_of_text|>") == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert render_chat("llama2", MESSAGES, bos_token="<s>", eos_token="</s>") == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] 2+2? [/INST]"
    )
    assert render_chat("deepseek3", MESSAGES[:2], bos_token="<bos>") == "<bos>Be brief.<｜User｜>Hi<｜Assistant｜>"
    assert render_chat("none", MESSAGES[1:2]) == "Hi"
    assert set(BUILTIN_TEMPLATES) == {"llama2", "llama3", "chatml", "deepseek3", "none"}


def test_chatml_generation_prompt_comes_once_at_the_end() -> None:
    rendered = render_chat("chatml", MESSAGES)
    assert rendered.count("<|im_start|>assistant\n") == 2  # the assistant turn and the prompt
    assert rendered.endswith("<|im_start|>assistant\n")


def test_template_helpers_behave_as_transformers() -> None:
    template = "{{ messages | tojson }}{% if x %}{{ raise_exception('bad ' + x) }}{% endif %}{{ strftime_now('%Y') }}"
    rendered = render_chat(template, [{"role": "user", "content": "é"}])
    assert rendered.startswith('[{"role": "user", "content": "é"}]') and rendered[-4:].isdigit()
    with pytest.raises(jinja2.exceptions.TemplateError, match="bad input"):
        render_chat(template, [], x="input")
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat("{{ messages.append(1) }}", [])


def test_resolve_template_picks_stored_or_builtin() -> None:
    assert resolve_template(None, "T") == "T"
    assert resolve_template("chatml", "T") == BUILTIN_TEMPLATES["chatml"]
    with pytest.raises(ValueError, match="no chat template"):
        resolve_template("auto", None)
    with pytest.raises(ValueError, match="unknown chat template 'mistral'"):
        resolve_template("mistral", None)
