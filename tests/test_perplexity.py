"""`dllama perplexity` and generation/perplexity.py against transformers on stories260K.

The reference is computed here from scratch: the same token windows (our tokenizer's ids cut
into windows of CTX, first token replaced by BOS), LlamaForCausalLM in float32, log-softmax in
float64, the positions CTX/2 .. CTX-2 scored, and llama.cpp's formulas for the running and final
estimates and the standard error.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cluster_helpers import REPO, WorkerProcess, quiet

from dllama_py.engine.engine import Engine
from dllama_py.generation import perplexity as ppl
from dllama_py.text.tokenizer import Tokenizer

STORY = Path(__file__).resolve().parent / "data" / "perplexity_story.txt"
CTX = 64
BOS = 1  # stories260K's tokenizer adds BOS, id 1
RTOL = 1e-4
SHORT = "Once upon a time, there was a cat."


def story_ids(tokenizer_path: Path) -> list[int]:
    text = STORY.read_text().removesuffix("\n")  # what --file reads
    return Tokenizer.load(tokenizer_path).encode(text, add_bos=True, parse_special=False)


@pytest.fixture(scope="module")
def reference(testdata: Path, stories: tuple[Path, Path]) -> dict:
    """Transformers' figures over the story: per-token negative log-likelihoods, running
    estimates, final perplexity and standard error (llama.cpp's sums of nll and nll^2)."""
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    model = LlamaForCausalLM.from_pretrained(testdata / "stories260K_hf", dtype=torch.float32,
                                             attn_implementation="eager").eval()
    ids = story_ids(stories[1])
    assert ids[0] == BOS and len(ids) >= 8 * CTX  # the story gives many windows
    nll, running = [], []
    for start in range(0, len(ids) - CTX + 1, CTX):
        window = [BOS] + ids[start + 1:start + CTX]
        with torch.no_grad():
            logits = model(torch.tensor([window])).logits[0].double()  # (CTX, vocab)
        log_probs = torch.log_softmax(logits, dim=-1)
        nll += [-float(log_probs[pos, window[pos + 1]]) for pos in range(CTX // 2, CTX - 1)]
        running.append(math.exp(sum(nll) / len(nll)))
    values = np.array(nll)
    count = len(values)
    mean, mean_square = values.sum() / count, (values * values).sum() / count
    perplexity = math.exp(mean)
    return {"token_nll": values, "running": running, "perplexity": perplexity,
            "standard_error": perplexity * math.sqrt((mean_square - mean * mean) / (count - 1))}


def assert_close(ours: float, theirs: float) -> None:
    assert abs(ours - theirs) <= RTOL * abs(theirs), (ours, theirs)


@pytest.mark.parametrize("nbatches", [7, 64])
def test_perplexity_equals_transformers_on_the_same_windows(stories, reference, nbatches):
    model, tok = stories
    ids = story_ids(tok)
    with Engine(model, threads=1, max_seq_len=CTX, max_batch=nbatches, progress=False) as engine:
        seen = []
        result = ppl.perplexity(engine, ids, CTX, BOS, nbatches, on_window=lambda k, value: seen.append((k, value)))
    windows = len(ids) // CTX
    assert result.windows == windows and result.text_tokens == len(ids)
    assert result.scored_tokens == windows * (CTX // 2 - 1) == len(reference["token_nll"])
    assert np.abs(result.token_nll - reference["token_nll"]).max() < 1e-4
    assert [k for k, _ in seen] == list(range(1, windows + 1))
    for ours, theirs in zip(result.running, reference["running"]):
        assert_close(ours, theirs)
    assert_close(result.perplexity, reference["perplexity"])
    assert_close(result.standard_error, reference["standard_error"])
    print(f"PPL ours {result.perplexity:.6f} +/- {result.standard_error:.6f}, transformers "
          f"{reference['perplexity']:.6f} +/- {reference['standard_error']:.6f}, relative difference "
          f"{abs(result.perplexity / reference['perplexity'] - 1):.2e}")


def run_perplexity(model: Path, tok: Path, file: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dllama_py.commands.cli", "perplexity", "--model", str(model),
                           "--tokenizer", str(tok), "--file", str(file), "--nthreads", "1", *extra],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def check_command_output(out: subprocess.CompletedProcess, figures_path: Path, reference: dict) -> None:
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stdout.splitlines()
    running = [(int(k), float(v)) for k, v in re.findall(r"\[(\d+)\]([\d.]+),", lines[0])]
    assert [k for k, _ in running] == list(range(1, len(reference["running"]) + 1))
    for (_, printed), theirs in zip(running, reference["running"]):
        assert abs(printed - theirs) <= 5e-5 + RTOL * theirs  # printed with 4 decimals
    final = re.fullmatch(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", lines[1])
    assert final, out.stdout
    assert abs(float(final[1]) - reference["perplexity"]) <= 5e-5 + RTOL * reference["perplexity"]
    assert abs(float(final[2]) - reference["standard_error"]) <= 5e-6 + RTOL * reference["standard_error"]
    figures = json.loads(figures_path.read_text())
    assert_close(figures["perplexity"], reference["perplexity"])
    assert_close(figures["standard_error"], reference["standard_error"])
    assert figures["windows"] == len(reference["running"]) and figures["ctx"] == CTX
    assert figures["scored_tokens"] == len(reference["token_nll"])
    print(f"nodes {figures['nodes']}: PPL {figures['perplexity']:.6f} +/- {figures['standard_error']:.6f}, "
          f"relative difference {abs(figures['perplexity'] / reference['perplexity'] - 1):.2e}")


def test_dllama_perplexity_command_on_one_node(stories, reference, tmp_path):
    model, tok = stories
    out = run_perplexity(model, tok, STORY, "--ctx", str(CTX), "--json", str(tmp_path / "ppl.json"))
    check_command_output(out, tmp_path / "ppl.json", reference)
    assert json.loads((tmp_path / "ppl.json").read_text())["nodes"] == 1
    assert "windows of 64" in out.stderr and "tokens/s" in out.stderr


def test_dllama_perplexity_command_on_root_and_one_worker(stories, reference, tmp_path):
    model, tok = stories
    worker = WorkerProcess()
    try:
        out = run_perplexity(model, tok, STORY, "--ctx", str(CTX), "--nbatches", "16", "--json",
                             str(tmp_path / "ppl.json"), "--workers", worker.address)
    finally:
        worker.stop()
    check_command_output(out, tmp_path / "ppl.json", reference)
    assert json.loads((tmp_path / "ppl.json").read_text())["nodes"] == 2
    assert "node 1 (worker" in out.stderr


@pytest.mark.parametrize("case", ["empty", "too short", "odd ctx", "ctx beyond the model", "missing"])
def test_user_mistakes_are_one_line_errors(stories, tmp_path, case):
    model, tok = stories
    file, ctx = STORY, CTX
    if case == "empty":
        file = tmp_path / "empty.txt"
        file.write_text("\n")
    elif case == "too short":
        file = tmp_path / "short.txt"
        file.write_text(SHORT + "\n")
    elif case == "odd ctx":
        ctx = 63
    elif case == "ctx beyond the model":
        ctx = 1024
    else:
        file = tmp_path / "nowhere.txt"
    out = run_perplexity(model, tok, file, "--ctx", str(ctx))
    short_tokens = len(Tokenizer.load(tok).encode(SHORT))
    assert 1 < short_tokens < CTX
    assert out.returncode == 1 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out.stderr, out.stderr
    expected = {
        "empty": f"{file} is empty",
        "too short": f"{file} has {short_tokens} tokens but one window of --ctx 64 needs 64",
        "odd ctx": "--ctx must be an even number of at least 8 tokens, got 63",
        "ctx beyond the model": "--ctx 1024 is larger than the model's context of 512 tokens",
        "missing": f"text file not found: {file}",
    }[case]
    assert expected in lines[0]


def test_estimate_follows_llama_cpp_formula():
    nll = np.array([0.5, 1.0, 2.0, 4.0])
    perplexity, error = ppl.estimate(nll)
    mean, mean_square = nll.mean(), (nll * nll).mean()
    assert perplexity == pytest.approx(math.exp(1.875))
    assert error == pytest.approx(math.exp(mean) * math.sqrt((mean_square - mean * mean) / 3))


def test_a_window_needs_ctx_tokens(stories):
    model, tok = stories
    with Engine(model, threads=1, max_seq_len=CTX, log=quiet, progress=False) as engine:
        with pytest.raises(ValueError, match="has 63 tokens but one window of --ctx 64 needs 64"):
            ppl.perplexity(engine, [BOS] * 63, CTX, BOS)
        with pytest.raises(ValueError, match="even number"):
            ppl.perplexity(engine, [BOS] * 200, 30 + 1, BOS)
