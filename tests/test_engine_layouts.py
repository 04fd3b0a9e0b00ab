"""The engine's two ways to hold Q40 weights give the same results: regrouped 16 rows at a time
in RAM (the default where the SIMD path has a kernel for it) and memory-mapped in the file's
layout (--mmap-weights)."""

from __future__ import annotations

import numpy as np
import pytest

from dllama_py.engine.engine import Engine
from dllama_py.engine.exchange import ALL_ROWS
from dllama_py.model import kernels
from dllama_py.model.kernels import WeightLayout


@pytest.mark.parametrize("model", ["llama-tiny", "qwen3moe-tiny"])
def test_regrouped_and_mapped_q40_weights_give_the_same_logits(testdata, model):
    path = testdata / "compat" / "dllama" / f"dllama_model_{model}_q40.m"
    tokens = [1, 82, 113, 102, 104, 35, 120, 115, 114, 113, 35, 100, 35, 119, 108, 112]
    logits = []
    for mapped in (False, True):
        engine = Engine(path, threads=2, max_seq_len=64, mmap_weights=mapped)
        expected_layout = WeightLayout.Q40 if mapped or not kernels.q40x16_fast() else WeightLayout.Q40X16
        assert engine.forward.layout == engine.layout == expected_layout
        engine.step(tokens, 0, ALL_ROWS)
        logits.append(engine.logits().copy())
        engine.close()
    # the same integer block products, summed in another order: float rounding only
    scale = float(np.abs(logits[1]).max())
    assert np.abs(logits[0] - logits[1]).max() <= 1e-5 * scale
