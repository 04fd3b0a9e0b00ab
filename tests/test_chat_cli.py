"""`dllama chat` as a user runs it: answers stream, turns keep the KV cache."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dllama_py.generation.chat_session import ChatFormat
from dllama_py.text.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stories(stories_f32: tuple[Path, Path]) -> tuple[Path, Path]:
    return stories_f32


def run_chat(model: Path, tok: Path, lines: list[str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dllama_py.commands.cli", "chat", "--model", str(model), "--tokenizer", str(tok),
         "--temperature", "0", "--max-tokens", "16", "--nthreads", "1", *extra],
        input="\n".join(lines) + "\n\n", capture_output=True, text=True, cwd=REPO, timeout=120)


def test_second_turn_evaluates_only_what_the_cache_lacks(stories):
    model, tok = stories
    out = run_chat(model, tok, ["Once upon a time", "The cat"], "--chat-template", "llama2")
    assert out.returncode == 0, out.stderr
    answers = re.findall(r"🤖 Assistant: (.*)", out.stdout)
    assert len(answers) == 2 and all(a.strip() for a in answers)
    evaluated = [int(n) for n in re.findall(r"\((\d+) prompt tokens evaluated", out.stderr)]
    fmt = ChatFormat(Tokenizer.load(tok), "llama2")
    first = fmt.encode([{"role": "user", "content": "Once upon a time"}])
    second = fmt.encode([{"role": "user", "content": "Once upon a time"},
                         {"role": "assistant", "content": answers[0]},
                         {"role": "user", "content": "The cat"}])
    assert evaluated[0] == len(first)
    # the first turn (its prompt and the answer's tokens) stays in the KV cache
    assert evaluated[1] <= len(second) - len(first)


def test_a_tokenizer_without_template_needs_one_named(stories):
    model, tok = stories
    out = run_chat(model, tok, ["Hello"])
    assert out.returncode == 1
    assert "no chat template" in out.stderr and "--chat-template" in out.stderr and "Traceback" not in out.stderr
