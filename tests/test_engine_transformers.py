"""The engine against references nobody here wrote: Hugging Face transformers and distributed-llama.

f32: the compat models (Llama, Qwen3, Qwen3-MoE) and freshly made random models of other shapes
(GQA ratios 1, 2, 4; head_dim != dim/heads; Llama 3.1 RoPE scaling; tied and untied embeddings)
give transformers' logits at every position of a 64-token sequence within F32_TOLERANCE and
its greedy ids. Measured: relative error 2.9e-7 to 6.3e-7 on every model.

q40/q80: compared with transformers running the dequantized weights, the remaining error is the
q80 rounding of activations; see test_quantized_logits_match_dequantized_transformers_within_q80_rounding.
distributed-llama's own q40 files, fed exactly the tokens it fed (its wrong last prompt token
included), give its greedy ids and its logits within the same q80 error.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TESTDATA
from hf_reference import (
    RandomModel,
    convert,
    dequantized_hf_model,
    engine_greedy,
    engine_logits,
    first_divergence,
    hf_greedy,
    hf_logits,
    load_hf,
    make_random_model,
    relative_error,
)

from dllama_py.engine.engine import Engine

F32_TOLERANCE = 1e-4  # max |ours - transformers| / max |transformers|, float32 weights and activations
# q80 activation rounding: each block of 32 is rounded to steps of amax/127, an error of up to amax/254
# per value (RMS about 0.5% of the block's RMS for Gaussian-like values). Every layer rounds 6 times
# (q/k/v input, wo input, w1/w3 input, w2 input, both partial sums), plus the classifier input: 13-19
# independent roundings over 2-3 layers add up to ~1-2% of the residual stream. Measured: max error
# over max logit 0.59%-1.6% against dequantized transformers (tied models at the top: final norm x10),
# 0.64%-1.4% against distributed-llama's logits. The bound has about 2x margin.
Q80_TOLERANCE = 3e-2
NEAR_TIE = 0.02  # a top-2 logit margin this small can flip under q80 noise (max abs logit diff ~0.1)
GREEDY_F32_NEAR_TIE = 1e-3
ROUTER_TIE = 5e-3  # k-th vs (k+1)-th router logit: q80 noise in the router input can swap the experts
SEQUENCE_LENGTH, GREEDY_PROMPT, GREEDY_STEPS = 64, 8, 32
COMPAT = ["llama-tiny", "qwen3-tiny", "qwen3moe-tiny"]

LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
RANDOM = {spec.name: spec for spec in [
    RandomModel("llama-mha-untied", "llama", 64, heads=4, kv_heads=4, head_dim=16, tied=False),
    RandomModel("llama-gqa2-headdim32-tied", "llama", 64, heads=4, kv_heads=2, head_dim=32, tied=True),
    RandomModel("llama-gqa4-rope31-factor8", "llama", 128, heads=8, kv_heads=2, head_dim=16, tied=False,
                rope_scaling=LLAMA31, max_positions=16384),
    RandomModel("llama-gqa4-rope31-factor32-tied", "llama", 64, heads=4, kv_heads=1, head_dim=16, tied=True,
                rope_scaling={**LLAMA31, "factor": 32.0}, max_positions=131072),
    RandomModel("qwen3-gqa2-headdim32-tied", "qwen3", 64, heads=4, kv_heads=2, head_dim=32, tied=True),
    RandomModel("qwen3-mha-untied", "qwen3", 128, heads=8, kv_heads=8, head_dim=16, tied=False),
]}
ALL_MODELS = COMPAT + list(RANDOM)


# ---- models, made and converted once per session ------------------------------------------------------
class Models:
    """HF folders, transformers models and our `.m` conversions, each made once."""

    def __init__(self, testdata: Path, folder: Path) -> None:
        self.testdata, self.folder = testdata, folder

    @cache  # noqa: B019 (one instance per session)
    def hf_dir(self, name: str) -> Path:
        if name in RANDOM:
            return make_random_model(RANDOM[name], self.folder / name)
        return self.testdata / "compat" / "hf" / name

    @cache  # noqa: B019
    def hf(self, name: str) -> torch.nn.Module:
        return load_hf(self.hf_dir(name))

    @cache  # noqa: B019
    def converted(self, name: str, float_type: str) -> Path:
        return convert(self.hf_dir(name), float_type, self.folder / f"{name}_{float_type}.m")

    def engine(self, name: str, float_type: str = "f32") -> Engine:
        return Engine(self.converted(name, float_type), threads=1, max_seq_len=128)

    def sequence(self, name: str) -> list[int]:
        """64 ids: BOS, then random ids (fixed seed) from the model's vocabulary."""
        vocab = self.hf(name).config.vocab_size
        rng = np.random.default_rng(2024)
        return [1] + [int(i) for i in rng.integers(3, vocab, SEQUENCE_LENGTH - 1)]


@pytest.fixture(scope="session")
def models(testdata: Path, tmp_path_factory: pytest.TempPathFactory) -> Models:
    return Models(testdata, tmp_path_factory.mktemp("engine_models"))


def compat_cases() -> list[dict[str, Any]]:
    """distributed-llama's one-node runs from compat/manifest.json (placeholder when data is missing)."""
    path = TESTDATA / "compat" / "manifest.json"
    if not path.is_file():
        return [{"model": "missing", "prompt": "reference data missing", "weights": "f32"}]
    return [case for case in json.loads(path.read_text())["cases"]
            if case["nodes"] == 1 and case.get("dllama_generated_ids")]


CASES = compat_cases()


def cases_with(weights: str) -> pytest.MarkDecorator:
    chosen = [case for case in CASES if case["weights"] == weights] or CASES[:1]
    return pytest.mark.parametrize("case", chosen, ids=[f"{c['model']}-{c['prompt']}" for c in chosen])


def margins(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit per row."""
    top2 = np.sort(logits, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


# ---- f32 against transformers -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_MODELS)
def test_f32_logits_match_transformers_at_every_position(models: Models, name: str) -> None:
    ids = models.sequence(name)
    reference = hf_logits(models.hf(name), ids)
    engine = models.engine(name)
    try:
        ours = engine_logits(engine, ids, [32, 32])
    finally:
        engine.close()
    error = relative_error(ours, reference)
    print(f"{name} f32: relative logit error {error:.2e} over {len(ids)} positions")
    assert error <= F32_TOLERANCE


@pytest.mark.parametrize("name", ["llama-tiny", "qwen3moe-tiny"])
def test_logits_do_not_depend_on_how_the_sequence_is_batched(models: Models, name: str) -> None:
    ids = models.sequence(name)
    reference = hf_logits(models.hf(name), ids)
    for batches in ([1] * SEQUENCE_LENGTH, [5, 27, 1, 31]):
        engine = models.engine(name)
        try:
            ours = engine_logits(engine, ids, batches)
        finally:
            engine.close()
        error = relative_error(ours, reference)
        print(f"{name} f32 in batches {batches[:4]}...: relative logit error {error:.2e}")
        assert error <= F32_TOLERANCE


@pytest.mark.parametrize("name", ALL_MODELS)
def test_f32_greedy_generation_matches_transformers(models: Models, name: str) -> None:
    prompt = models.sequence(name)[:GREEDY_PROMPT]
    expected, hf_margins = hf_greedy(models.hf(name), prompt, GREEDY_STEPS)
    engine = models.engine(name)
    try:
        ours = engine_greedy(engine, prompt, GREEDY_STEPS)
    finally:
        engine.close()
    step = first_divergence(ours, expected)
    if step is not None:  # only a genuine tie may go either way
        assert hf_margins[step] < GREEDY_F32_NEAR_TIE, (
            f"greedy ids differ at step {step} where transformers' top-2 margin is {hf_margins[step]:.4f}:\n"
            f"ours {ours}\ntransformers {expected}")
    print(f"{name} greedy: {GREEDY_STEPS} ids, smallest top-2 margin {min(hf_margins):.4f}")


@pytest.mark.parametrize("name", [n for n, spec in RANDOM.items() if spec.rope_scaling])
def test_llama31_rope_scaling_is_applied(models: Models, name: str) -> None:
    """Our logits sit far closer to transformers with the scaling than without it, and leaving the
    scaling out would break the f32 tolerance: the logits test above can see the difference."""
    ids = models.sequence(name)
    scaled = models.hf(name)
    config = RANDOM[name].config()
    config.rope_parameters = {"rope_theta": 10000.0, "rope_type": "default"}
    unscaled = type(scaled)(config).eval()
    unscaled.load_state_dict(scaled.state_dict())
    reference, without = hf_logits(scaled, ids), hf_logits(unscaled, ids)
    engine = models.engine(name)
    try:
        ours = engine_logits(engine, ids, [32, 32])
    finally:
        engine.close()
    scaling_effect = relative_error(without, reference)
    error = relative_error(ours, reference)
    print(f"{name}: the scaling changes logits by {scaling_effect:.2e}; ours differ by {error:.2e}")
    assert scaling_effect > 5 * F32_TOLERANCE
    assert error < scaling_effect / 100


# ---- q40 and q80 against transformers with the dequantized weights ------------------------------------
@pytest.mark.parametrize("name", ["llama-tiny", "qwen3moe-tiny", "llama-gqa2-headdim32-tied"])
def test_dequantizing_an_f32_file_gives_back_the_transformers_weights(models: Models, name: str) -> None:
    """The reference below is only as good as this: our `.m` back into transformers' state dict
    (q/k permutation undone, experts fused) reproduces every original weight exactly."""
    original = models.hf(name).state_dict()
    restored = dequantized_hf_model(models.hf_dir(name), models.converted(name, "f32")).state_dict()
    for key, value in original.items():
        assert torch.equal(restored[key], value), key


@pytest.mark.parametrize("float_type", ["q40", "q80"])
@pytest.mark.parametrize(
    "name", ["llama-tiny", "qwen3-tiny", "llama-gqa2-headdim32-tied", "llama-gqa4-rope31-factor8"]
)
def test_quantized_logits_match_dequantized_transformers_within_q80_rounding(
    models: Models, name: str, float_type: str
) -> None:
    """Measured max |ours - dequantized transformers| / max |logit| (q40, q80): llama-tiny 6.2e-3,
    7.8e-3; qwen3-tiny 1.4e-2, 1.5e-2; random Llamas 5.9e-3 to 1.6e-2 (abs 0.06-0.14). Against
    the original float weights the q40 error is 1.0e-1 to 2.6e-1: the comparison is with the
    weights the file holds, so only activation rounding remains (bound: Q80_TOLERANCE)."""
    ids = models.sequence(name)
    path = models.converted(name, float_type)
    reference = hf_logits(dequantized_hf_model(models.hf_dir(name), path), ids)
    engine = models.engine(name, float_type)
    try:
        ours = engine_logits(engine, ids, [32, 32])
    finally:
        engine.close()
    error = relative_error(ours, reference)
    print(f"{name} {float_type}: relative logit error vs dequantized transformers {error:.2e} "
          f"(abs {np.abs(ours - reference).max():.3f}; vs original weights "
          f"{relative_error(ours, hf_logits(models.hf(name), ids)):.2e})")
    assert error <= Q80_TOLERANCE


def router_gaps(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    """Per position, the smallest gap over layers between the k-th and (k+1)-th router logit."""
    gaps: list[np.ndarray] = []

    def record(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        ordered = torch.sort(output[0], dim=-1, descending=True).values
        k = module.top_k
        gaps.append((ordered[:, k - 1] - ordered[:, k]).numpy())

    hooks = [layer.mlp.gate.register_forward_hook(record) for layer in model.model.layers]
    try:
        hf_logits(model, ids)
    finally:
        for hook in hooks:
            hook.remove()
    return np.min(np.stack(gaps), axis=0)


@pytest.mark.parametrize("float_type", ["q40", "q80"])
def test_moe_quantized_logits_match_dequantized_transformers_except_at_routing_ties(
    models: Models, float_type: str
) -> None:
    """Where two experts score almost the same, q80 noise in the router input can pick the other
    one: a discrete jump (seen with another random sequence: two positions with router gaps 7.5e-5
    and 4.9e-4 had abs logit errors 0.27-0.29). Such positions are left out; every other position
    stays within Q80_TOLERANCE (measured 8.6e-3 for q40 and q80, 3 of 64 positions left out)."""
    name = "qwen3moe-tiny"
    ids = models.sequence(name)
    path = models.converted(name, float_type)
    dequantized = dequantized_hf_model(models.hf_dir(name), path)
    reference = hf_logits(dequantized, ids)
    engine = models.engine(name, float_type)
    try:
        ours = engine_logits(engine, ids, [32, 32])
    finally:
        engine.close()
    clear = router_gaps(dequantized, ids) >= ROUTER_TIE
    error = np.abs(ours - reference)[clear].max() / np.abs(reference).max()
    print(f"{name} {float_type}: relative logit error {error:.2e} at {clear.sum()} positions without "
          f"routing ties; {relative_error(ours, reference):.2e} at all {len(ids)}")
    assert clear.sum() >= 0.75 * len(ids)
    assert error <= Q80_TOLERANCE


# ---- distributed-llama's own files, fed what it fed -----------------------------------------------------
def run_like_dllama(case: dict[str, Any]) -> tuple[list[int], np.ndarray]:
    """Feed what `dllama inference` fed: prompt ids but the last at positions 0..N-2 in one batch,
    then at each generation step the token it fed (token 0 first, then its own previous token).
    Returns (our argmax per step, our logits per step (steps, vocab))."""
    engine = Engine(TESTDATA / "compat" / case["model_file"], threads=1,
                         buffer_type=case["buffer_float_type"], max_seq_len=64)
    try:
        prompt = case["prompt_ids_dllama"]
        engine.step(prompt[:-1], 0)
        assert case["dllama_positions"][0] == len(prompt) - 1
        logits = []
        for position, token in zip(case["dllama_positions"], case["dllama_fed_tokens"]):
            engine.step([token], position)
            logits.append(np.array(engine.logits(), dtype=np.float32))
    finally:
        engine.close()
    stacked = np.stack(logits)
    return [int(i) for i in np.argmax(stacked, axis=1)], stacked


@cases_with("f32")
def test_distributed_llama_f32_files_give_its_ids_and_logits(testdata: Path, case: dict[str, Any]) -> None:
    """Same tokens fed, float32 throughout: identical ids, logits within 1.4e-6 to 7.2e-6 relative."""
    ours, logits = run_like_dllama(case)
    theirs = np.load(testdata / "compat" / case["dllama_logits_file"])
    error = relative_error(logits, theirs)
    print(f"{case['model']} f32 '{case['prompt']}': relative logit error vs distributed-llama {error:.2e}")
    assert ours == case["dllama_generated_ids"]
    assert error <= F32_TOLERANCE


@cases_with("q40")
def test_distributed_llama_q40_files_give_its_greedy_ids(testdata: Path, case: dict[str, Any]) -> None:
    """Teacher-forced with dllama's fed tokens, our argmax equals its generated id at every step but
    at near ties (measured: one, qwen3-tiny 'Once upon a time' step 11, dllama's margin 0.0016),
    and our logits are within the q80 error of its logits (measured 6.4e-3 to 1.4e-2, abs <= 0.12;
    dllama itself moves by up to 0.18 when only its node count changes)."""
    ours, logits = run_like_dllama(case)
    theirs = np.load(testdata / "compat" / case["dllama_logits_file"])
    expected = case["dllama_generated_ids"]
    their_margins = margins(theirs)
    flips = [(step, float(their_margins[step])) for step, (a, b) in enumerate(zip(ours, expected)) if a != b]
    error = relative_error(logits, theirs)
    print(f"{case['model']} q40 '{case['prompt']}': relative logit error vs distributed-llama {error:.2e} "
          f"(abs {np.abs(logits - theirs).max():.3f}); steps that differ (step, dllama margin): {flips}")
    assert all(margin < NEAR_TIE for _, margin in flips), f"ids differ beyond near ties: {flips}"
    assert len(flips) <= 2
    assert error <= Q80_TOLERANCE
