"""Transformers as the reference for the engine: random models, logits, greedy, dequantized weights.

Everything runs on PyTorch CPU in float32 with eager attention and one thread, like the compat
references in ../shared/testdata/compat. Used by test_engine_transformers.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dllama_py.converter.convert_hf import main as convert_hf_main
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from dllama_py.engine.engine import Engine
from dllama_py.engine.exchange import ALL_ROWS
from dllama_py.formats.model_file import read_model
from dllama_py.model import kernels

torch.set_num_threads(1)
QK_SCALE = 4.0


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - reference| / max |reference| over all elements."""
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def convert(hf_dir: Path, float_type: str, output: Path) -> Path:
    """Run our convert-hf on `hf_dir` and return the written `.m` path."""
    status = convert_hf_main([str(hf_dir), float_type, "model", "--output", str(output), "--quiet"])
    assert status == 0, f"convert-hf {hf_dir} {float_type} failed with status {status}"
    return output


def load_hf(hf_dir: Path) -> torch.nn.Module:
    """The transformers model of `hf_dir`: float32, eager attention, evaluation mode."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def hf_logits(model: torch.nn.Module, ids: Sequence[int]) -> np.ndarray:
    """Logits (len(ids), vocab) float32 of one full-sequence forward pass."""
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


def hf_greedy(model: torch.nn.Module, prompt: Sequence[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy continuation as argmax of the full-sequence logits at each step (no EOS stop).
    Returns (ids, top-1 minus top-2 logit margin at each step)."""
    ids, margins = list(prompt), []
    for _ in range(steps):
        last = hf_logits(model, ids)[-1]
        top2 = np.sort(last)[-2:]
        margins.append(float(top2[1] - top2[0]))
        ids.append(int(np.argmax(last)))
    return ids[len(prompt):], margins


def engine_logits(engine: Engine, ids: Sequence[int], batches: Sequence[int]) -> np.ndarray:
    """Logits (len(ids), vocab) of `ids` fed from position 0 in batches of the given sizes."""
    assert sum(batches) == len(ids)
    out, pos = [], 0
    for size in batches:
        engine.step(list(ids[pos:pos + size]), pos, ALL_ROWS)
        out.append(np.array(engine.logits(), dtype=np.float32).reshape(size, -1))
        pos += size
    return np.concatenate(out)


def engine_greedy(engine: Engine, prompt: Sequence[int], steps: int) -> list[int]:
    """Greedy continuation with the engine: the prompt in one batch, then one token per step."""
    engine.step(list(prompt), 0)
    ids = [engine.argmax()]
    while len(ids) < steps:
        engine.step([ids[-1]], len(prompt) + len(ids) - 1)
        ids.append(engine.argmax())
    return ids


def first_divergence(ours: Sequence[int], reference: Sequence[int]) -> int | None:
    """Index of the first differing id, or None when the sequences are equal."""
    for i, (a, b) in enumerate(zip(ours, reference)):
        if a != b:
            return i
    return None if len(ours) == len(reference) else min(len(ours), len(reference))


# ---- random models -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RandomModel:
    """A small random transformers model: what makes it different, and its config."""

    name: str
    arch: str  # "llama" or "qwen3"
    dim: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    rope_scaling: dict[str, Any] | None = None
    max_positions: int = 256
    seed: int = 0

    def config(self) -> LlamaConfig | Qwen3Config:
        rope: dict[str, Any] = {"rope_theta": 10000.0, "rope_type": "default"}
        if self.rope_scaling:
            rope = {"rope_theta": 10000.0, **self.rope_scaling}
        common = dict(
            vocab_size=256, hidden_size=self.dim, intermediate_size=2 * self.dim + 64, num_hidden_layers=2,
            num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
            max_position_embeddings=self.max_positions, rms_norm_eps=1e-6 if self.arch == "qwen3" else 1e-5,
            rope_parameters=rope, tie_word_embeddings=self.tied, bos_token_id=1, eos_token_id=2,
        )
        return LlamaConfig(**common) if self.arch == "llama" else Qwen3Config(**common)


def make_random_model(spec: RandomModel, folder: Path) -> Path:
    """Build `spec` with torch.manual_seed(spec.seed), give it peaked logits the way the compat models
    were made (testdata/compat/README.md), save it with save_pretrained and return the folder."""
    torch.manual_seed(spec.seed)
    cls = LlamaForCausalLM if spec.arch == "llama" else Qwen3ForCausalLM
    model = cls(spec.config()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.02)
        for layer in model.model.layers:  # sharper attention, so that positions (RoPE) matter more
            layer.self_attn.q_proj.weight.mul_(QK_SCALE)
            layer.self_attn.k_proj.weight.mul_(QK_SCALE)
        if spec.tied:
            model.model.norm.weight.mul_(10)
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.mul_(4)
                layer.mlp.down_proj.weight.mul_(4)
        else:
            model.lm_head.weight.mul_(10)
            model.model.embed_tokens.weight.mul_(5)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


# ---- dequantized weights into transformers --------------------------------------------------------------
def interleaved_to_rotate_half(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """Undo the converter's Llama q/k permutation: Meta's interleaved pairs back to HF rotate-half rows."""
    n_rows, cols = rows.shape
    return rows.reshape(n_rows // head_dim, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(n_rows, cols)


def dequantized_hf_model(hf_dir: Path, model_path: Path) -> torch.nn.Module:
    """The transformers model of `hf_dir` with every weight replaced by the value our `.m` file
    stores (dequantized q40/q80/f16), the classifier untied from the embedding."""
    model = load_hf(hf_dir)
    state = model.state_dict()
    with read_model(model_path) as m:
        c = m.config
        llama = c.arch.name == "LLAMA"

        def value(name: str) -> np.ndarray:
            tensor = m.tensors[name]
            rows, cols = tensor.shape
            return kernels.decode_weights(tensor.data, tensor.float_type.label).reshape(rows, cols)

        new: dict[str, np.ndarray] = {
            "model.embed_tokens.weight": value("embedding"),
            "model.norm.weight": value("final_norm")[0],
        }
        for layer in range(c.n_layers):
            ours, hf = f"layers.{layer}.", f"model.layers.{layer}."
            wq, wk = value(ours + "wq"), value(ours + "wk")
            if llama:
                wq = interleaved_to_rotate_half(wq, c.head_dim)
                wk = interleaved_to_rotate_half(wk, c.head_dim)
            new[hf + "self_attn.q_proj.weight"] = wq
            new[hf + "self_attn.k_proj.weight"] = wk
            new[hf + "self_attn.v_proj.weight"] = value(ours + "wv")
            new[hf + "self_attn.o_proj.weight"] = value(ours + "wo")
            new[hf + "input_layernorm.weight"] = value(ours + "attention_norm")[0]
            new[hf + "post_attention_layernorm.weight"] = value(ours + "ffn_norm")[0]
            if c.has_qk_norm:
                new[hf + "self_attn.q_norm.weight"] = value(ours + "q_norm")[0]
                new[hf + "self_attn.k_norm.weight"] = value(ours + "k_norm")[0]
            if c.is_moe:
                new[hf + "mlp.gate.weight"] = value(ours + "router")
                experts = range(c.n_experts)
                gate_up = [np.concatenate([value(f"{ours}experts.{e}.w1"), value(f"{ours}experts.{e}.w3")])
                           for e in experts]
                new[hf + "mlp.experts.gate_up_proj"] = np.stack(gate_up)
                down = [value(f"{ours}experts.{e}.w2") for e in experts]
                new[hf + "mlp.experts.down_proj"] = np.stack(down)
            else:
                new[hf + "mlp.gate_proj.weight"] = value(ours + "w1")
                new[hf + "mlp.down_proj.weight"] = value(ours + "w2")
                new[hf + "mlp.up_proj.weight"] = value(ours + "w3")
        classifier = torch.from_numpy(value("classifier").copy())
    missing = set(state) - set(new) - {"lm_head.weight"}
    assert not missing, f"no dequantized value for {sorted(missing)}"
    with torch.no_grad():
        for name, array in new.items():
            assert state[name].shape == array.shape, f"{name}: {tuple(state[name].shape)} vs {array.shape}"
            state[name].copy_(torch.from_numpy(np.array(array, dtype=np.float32)))
        model.lm_head.weight = torch.nn.Parameter(classifier)  # untied: the classifier may be quantized
    return model
