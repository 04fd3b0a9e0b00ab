"""The engine on a real pretrained model: stories260K (llama2.c) converted with our own converters.

llama2.c's `run.c` produced the expected greedy ids and text (testdata/reference/stories260K_greedy.json).
Its `-n 64` counts forward passes, prompt included, and it stops when BOS (id 1) is sampled; so
a prompt of P ids (BOS included) is followed by at most 65 - P generated ids.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TESTDATA
from dllama_py.converter.convert_hf import main as convert_hf_main
from dllama_py.converter.convert_tokenizer import main as convert_tokenizer_main

from dllama_py.engine.engine import Engine
from dllama_py.engine.exchange import ALL_ROWS
from dllama_py.engine.sampler import Sampler
from dllama_py.generation.generator import Generator
from dllama_py.text.tokenizer import Tokenizer

BOS = 1
F32_LOGIT_TOLERANCE = 1e-4  # max |ours - reference| / max |reference|


@dataclass(frozen=True)
class StoriesFiles:
    """Our conversions of stories260K: `.m` per weight type, the `.t` tokenizer, and the references."""

    models: dict[str, Path]
    tokenizer: Path
    reference: dict[str, Any]
    big_tokenizer: Path  # Llama 2's 32000-token tokenizer: does not fit this 512-token model


@pytest.fixture(scope="session")
def stories(testdata: Path, tmp_path_factory: pytest.TempPathFactory) -> StoriesFiles:
    folder = tmp_path_factory.mktemp("stories260K")
    models = {}
    for float_type in ("f32", "f16"):
        models[float_type] = folder / f"stories260K_{float_type}.m"
        status = convert_hf_main([str(testdata / "stories260K_hf"), float_type, "stories260K",
                                  "--output", str(models[float_type]), "--quiet"])
        assert status == 0
    tokenizer = folder / "tok512.t"
    assert convert_tokenizer_main([str(testdata / "stories260K" / "tok512.model"), "tok512",
                                   "--output", str(tokenizer)]) == 0
    big_tokenizer = folder / "llama2.t"
    llama2 = testdata / "llama2_tokenizer"
    assert convert_tokenizer_main([str(llama2), "llama2", "--output", str(big_tokenizer)]) == 0
    reference = json.loads((testdata / "reference" / "stories260K_greedy.json").read_text())
    return StoriesFiles(models, tokenizer, reference, big_tokenizer)


def reference_cases() -> list[dict[str, Any]]:
    """The llama2.c cases, read at collection time; a placeholder when the data is missing, so that
    the tests fail on the `testdata` fixture instead of silently collecting nothing."""
    path = TESTDATA / "reference" / "stories260K_greedy.json"
    if not path.is_file():
        return [{"prompt": "reference data missing"}]
    return json.loads(path.read_text())["results"]


CASES = reference_cases()
CASE_IDS = [case["prompt"] for case in CASES]


def generation_budget(case: dict[str, Any]) -> int:
    """Tokens run.c generates at most: its -n counts forward passes, prompt positions included."""
    return case["steps"] + 1 - len(case["prompt_ids_with_bos"])


def run_dllama(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed `dllama` command (or `python -m dllama_py.commands.cli`) and capture its output."""
    script = Path(sys.executable).with_name("dllama")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "dllama_py.commands.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120, check=False)


def run_inference(stories: StoriesFiles, *args: str, float_type: str = "f32",
                  tokenizer: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`dllama inference` on one thread with a stories model and (by default) its tokenizer."""
    return run_dllama("inference", "--model", str(stories.models[float_type]),
                      "--tokenizer", str(tokenizer or stories.tokenizer), "--nthreads", "1", *args)


def inference_json(stories: StoriesFiles, *args: str) -> list[dict[str, Any]]:
    """`dllama inference --json` with the f32 stories model; its JSON lines (exit status must be 0)."""
    result = run_inference(stories, "--json", *args)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def generated_ids(lines: list[dict[str, Any]]) -> list[int]:
    return [line["id"] for line in lines if "id" in line]


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# ---- greedy generation against llama2.c -----------------------------------------------------------------
@pytest.mark.parametrize("float_type", ["f32", "f16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_greedy_generation_reproduces_llama2c_token_for_token(
    stories: StoriesFiles, case: dict[str, Any], float_type: str
) -> None:
    tokenizer = Tokenizer.load(stories.tokenizer)
    engine = Engine(stories.models[float_type], threads=1)
    try:
        prompt = tokenizer.encode(case["prompt"], add_bos=True)
        assert prompt == case["prompt_ids_with_bos"]
        generator = Generator(engine, tokenizer)
        result = generator.generate(prompt, generation_budget(case), Sampler(0.0), stop_ids=[BOS])
    finally:
        engine.close()
    assert result.generated_ids == case["generated_ids"]
    assert result.finish_reason == ("stop" if case["stopped_on_bos"] else "length")
    assert case["prompt"] + result.text == case["text"]
    assert tokenizer.decode(prompt + result.generated_ids) == case["text"]


def test_first_step_logits_match_llama2c_and_torch(stories: StoriesFiles) -> None:
    """Logits at the last prompt position (all 512) against run.c's float32 and PyTorch's float64."""
    case = next(c for c in CASES if "first_step_logits" in c)
    expected = case["first_step_logits"]
    engine = Engine(stories.models["f32"], threads=1)
    try:
        engine.step(case["prompt_ids_with_bos"], 0)
        logits = np.array(engine.logits())
    finally:
        engine.close()
    for key in ("logits_runc", "logits_torch_fp64"):
        reference = np.array(expected[key])
        error = np.abs(logits - reference).max() / np.abs(reference).max()
        print(f"stories260K f32 first-step logits vs {key}: relative error {error:.2e}")
        assert error <= F32_LOGIT_TOLERANCE
    assert list(np.argsort(-logits)[:10]) == expected["top10_ids"]


def test_every_prompt_position_has_torchs_top5(stories: StoriesFiles) -> None:
    """all_logits: the top-5 ids and logits at each prompt position, against PyTorch float64."""
    case = next(c for c in CASES if "all_prompt_position_top5_torch_fp64" in c)
    engine = Engine(stories.models["f32"], threads=1)
    try:
        engine.step(case["prompt_ids_with_bos"], 0, ALL_ROWS)
        logits = np.array(engine.logits())
    finally:
        engine.close()
    for row in case["all_prompt_position_top5_torch_fp64"]:
        ours = logits[row["position"]]
        assert list(np.argsort(-ours)[:5]) == row["top5_ids"]
        np.testing.assert_allclose(ours[row["top5_ids"]], row["top5_logits"], rtol=0, atol=1e-3)


# ---- the dllama inference command -----------------------------------------------------------------------
def test_inference_command_prints_prompt_ids_tokens_and_stats_as_json(stories: StoriesFiles) -> None:
    case = CASES[0]
    steps = len(case["generated_ids"])
    result = run_inference(stories, "--prompt", case["prompt"], "--steps", str(steps), "--temperature", "0",
                           "--json", "--verbose")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0] == {"prompt_ids": case["prompt_ids_with_bos"]}
    tokens, stats = lines[1:-1], lines[-1]["stats"]
    assert [t["id"] for t in tokens] == case["generated_ids"]
    assert case["prompt"] + "".join(t["text"] for t in tokens) == case["text"]
    assert stats["prompt_tokens"] == len(case["prompt_ids_with_bos"])
    assert stats["prompt_batches"] == 1
    assert stats["generated_tokens"] == steps
    assert stats["finish_reason"] == "length"
    assert stats["prompt_tokens_per_s"] > 0 and stats["gen_tokens_per_s"] > 0
    assert "Evaluation" in result.stderr and "Prediction" in result.stderr
    assert result.stderr.count("🔶 Pred") == steps - 1  # the last token is printed, never evaluated


def test_inference_command_text_mode_prints_llama2c_text(stories: StoriesFiles) -> None:
    case = CASES[1]
    result = run_inference(stories, "--prompt", case["prompt"], "--steps", str(generation_budget(case)),
                           "--temperature", "0", float_type="f16")
    assert result.returncode == 0, result.stderr
    assert result.stdout == case["text"] + "\n"
    # without --verbose no per-token line interrupts the text in a terminal; the summary follows it
    assert "🔶 Pred" not in result.stderr and "🔷" not in result.stderr
    summary = result.stderr[result.stderr.index("Evaluation"):]
    assert "Prediction" in summary and "tokens/s" in summary


def test_prompt_ids_flag_gives_the_same_tokens(stories: StoriesFiles) -> None:
    case = CASES[0]
    ids = ",".join(str(i) for i in case["prompt_ids_with_bos"])
    lines = inference_json(stories, "--prompt-ids", ids, "--steps", "20", "--temperature", "0")
    assert lines[0] == {"prompt_ids": case["prompt_ids_with_bos"]}
    assert generated_ids(lines) == case["generated_ids"][:20]


def test_kv_cache_on_disk_gives_identical_ids(stories: StoriesFiles) -> None:
    case = CASES[2]
    lines = inference_json(stories, "--prompt", case["prompt"], "--steps", str(generation_budget(case)),
                           "--temperature", "0", "--kv-cache-storage", "disk")
    assert generated_ids(lines) == case["generated_ids"]


def test_memory_mapped_weights_give_identical_ids(stories: StoriesFiles) -> None:
    case = CASES[1]
    lines = inference_json(stories, "--prompt", case["prompt"], "--steps", str(generation_budget(case)),
                           "--temperature", "0", "--mmap-weights")
    assert generated_ids(lines) == case["generated_ids"]


def test_prompt_in_batches_of_three_gives_identical_ids(stories: StoriesFiles) -> None:
    case = CASES[0]
    lines = inference_json(stories, "--prompt", case["prompt"], "--steps", str(generation_budget(case)),
                           "--temperature", "0", "--nbatches", "3")
    assert generated_ids(lines) == case["generated_ids"]
    assert lines[-1]["stats"]["prompt_batches"] == 2  # 5 prompt ids: 3 + 2


def test_generation_stops_when_the_context_is_full(stories: StoriesFiles) -> None:
    case = CASES[0]
    lines = inference_json(stories, "--prompt", case["prompt"], "--steps", "60", "--temperature", "0",
                           "--max-seq-len", "10")
    ids = generated_ids(lines)
    assert 5 <= len(ids) <= 6  # positions 5..9 hold generated tokens; the 6th needs no position
    assert ids == case["generated_ids"][: len(ids)]
    assert lines[-1]["stats"]["finish_reason"] == "length"


def test_prompt_longer_than_the_context_is_a_one_line_error(stories: StoriesFiles) -> None:
    result = run_inference(stories, "--prompt", CASES[0]["prompt"], "--steps", "8", "--max-seq-len", "4")
    assert_one_line_error(result, "5 tokens", "4")
    assert result.stdout == ""  # nothing printed before the error


def test_missing_model_file_is_named(stories: StoriesFiles, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model.m"
    result = run_dllama("inference", "--model", str(missing), "--tokenizer", str(stories.tokenizer),
                        "--prompt", "Hello", "--steps", "4")
    assert_one_line_error(result, "not found", str(missing))


def test_tokenizer_larger_than_the_model_vocabulary_is_rejected(stories: StoriesFiles) -> None:
    result = run_inference(stories, "--prompt", "Hello", "--steps", "4", tokenizer=stories.big_tokenizer)
    assert_one_line_error(result, "32000", "512")


# ---- sampling -------------------------------------------------------------------------------------------
def sampled_ids(stories: StoriesFiles, seed: int) -> list[int]:
    lines = inference_json(stories, "--prompt", "Once upon a time", "--steps", "40", "--temperature", "0.8",
                           "--seed", str(seed), "--ignore-eos")
    return generated_ids(lines)


def test_sampling_with_a_seed_is_reproducible(stories: StoriesFiles) -> None:
    first, again, other = sampled_ids(stories, 42), sampled_ids(stories, 42), sampled_ids(stories, 43)
    assert len(first) == 40
    assert first == again
    assert first != other  # 40 tokens at temperature 0.8: equal only by an astronomically unlikely chance


def test_command_and_library_sample_the_same_tokens(stories: StoriesFiles) -> None:
    tokenizer = Tokenizer.load(stories.tokenizer)
    engine = Engine(stories.models["f32"], threads=1)
    try:
        result = Generator(engine, tokenizer).generate(tokenizer.encode("Once upon a time"), 40,
                                                       Sampler(0.8, 0.9, seed=42), stop_ids=[])
    finally:
        engine.close()
    assert result.generated_ids == sampled_ids(stories, 42)
