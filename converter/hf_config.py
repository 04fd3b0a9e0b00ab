"""Map a Hugging Face `config.json` onto a `ModelConfig`, rejecting what dllama-py cannot run.

Supported: model_type llama / mistral (Llama 2, 3, 3.1-3.3 with rope scaling type llama3),
qwen3 and qwen3_moe. Fields may sit at the top level or, as transformers 5 writes them, in
`rope_parameters`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dllama_py.model.config import ArchType, ConfigError, FloatType, HiddenAct, ModelConfig, RopeType

ARCHS: dict[str, ArchType] = {
    "llama": ArchType.LLAMA,
    "mistral": ArchType.LLAMA,
    "qwen3": ArchType.QWEN3,
    "qwen3_moe": ArchType.QWEN3_MOE,
}
HIDDEN_ACTS: dict[str, HiddenAct] = {"silu": HiddenAct.SILU, "gelu": HiddenAct.GELU}


class ConversionError(ValueError):
    """The input model cannot be converted; the message says what and why (a user-facing error)."""


@dataclass(frozen=True)
class HfModelConfig:
    """The target ModelConfig plus what the converter needs to know about the source."""

    config: ModelConfig
    tied_embeddings: bool
    warnings: list[str] = field(default_factory=list)


def _integer(name: str, value: Any) -> int:
    """A header value: the `.m` header holds int32, so refuse to truncate a fractional value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConversionError(f"config.json: {name} must be a number, got {value!r}")
    if value != int(value):
        raise ConversionError(
            f"config.json: {name} = {value} is not a whole number; the .m header stores "
            f"integers and truncating would change the model"
        )
    return int(value)


def _required(hf: dict[str, Any], key: str) -> int:
    if hf.get(key) is None:
        raise ConversionError(f"config.json has no {key}")
    return _integer(key, hf[key])


def _rope(hf: dict[str, Any], arch: ArchType) -> dict[str, int]:
    """Theta and Llama 3.1 scaling fields from `rope_theta`/`rope_scaling` or `rope_parameters`."""
    params = hf.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ConversionError("config.json: rope_parameters per layer type are not supported")
    theta = hf.get("rope_theta", params.get("rope_theta", 10000))
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    result = {"rope_theta": _integer("rope_theta", theta)}
    if kind in (None, "default"):
        return result
    if kind != "llama3":
        raise ConversionError(
            f"config.json: rope scaling type {kind!r} is not supported (only 'llama3', as in Llama 3.1-3.3)"
        )
    if arch != ArchType.LLAMA:
        raise ConversionError("config.json: rope scaling 'llama3' is only supported for llama models")
    keys = {
        "rope_scaling_factor": "factor",
        "rope_scaling_low_freq_factor": "low_freq_factor",
        "rope_scaling_high_freq_factor": "high_freq_factor",
        "rope_scaling_orig_max_seq_len": "original_max_position_embeddings",
    }
    for ours, theirs in keys.items():
        if scaling.get(theirs) is None:
            raise ConversionError(f"config.json: rope scaling 'llama3' needs {theirs}")
        result[ours] = _integer(f"rope scaling {theirs}", scaling[theirs])
    result["rope_type"] = RopeType.LLAMA3_1
    return result


def _norm_epsilon(hf: dict[str, Any], warnings: list[str]) -> float:
    eps = hf.get("rms_norm_eps")
    if eps is None:
        warnings.append("config.json has no rms_norm_eps; using 1e-6 (the transformers default)")
        return 1e-6
    for allowed in (1e-5, 1e-6):
        if math.isclose(eps, allowed, rel_tol=1e-6):
            return allowed
    raise ConversionError(
        f"config.json: rms_norm_eps {eps} is not supported (the .m header can only say 1e-5 or 1e-6)"
    )


def _experts(hf: dict[str, Any], arch: ArchType) -> dict[str, int]:
    if arch != ArchType.QWEN3_MOE:
        return {}
    n_experts = hf.get("num_experts", hf.get("num_local_experts"))
    if n_experts is None:
        raise ConversionError("config.json: a qwen3_moe model needs num_experts or num_local_experts")
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise ConversionError(
            "config.json: dense layers inside a MoE model (mlp_only_layers, "
            "decoder_sparse_step) are not supported: every layer must be MoE"
        )
    if hf.get("norm_topk_prob", True) is not True:
        raise ConversionError(
            "config.json: norm_topk_prob false is not supported (routing weights are "
            "always renormalised over the top-k experts)"
        )
    if hf.get("shared_expert_intermediate_size"):
        raise ConversionError("config.json: shared experts are not supported")
    return {
        "n_experts": _integer("num_experts", n_experts),
        "n_active_experts": _required(hf, "num_experts_per_tok"),
        "moe_hidden_dim": _required(hf, "moe_intermediate_size"),
    }


def parse_hf_config(hf: dict[str, Any], float_type: FloatType) -> HfModelConfig:
    """Build the ModelConfig for a parsed config.json dict and the chosen weight float type.

    Returns HfModelConfig (config, whether embeddings are tied as far as config.json says, warnings);
    raises ConversionError for anything unsupported.
    """
    warnings: list[str] = []
    model_type = hf.get("model_type")
    if model_type not in ARCHS:
        raise ConversionError(
            f"config.json: model_type {model_type!r} is not supported (supported: {', '.join(ARCHS)})"
        )
    arch = ARCHS[model_type]
    if hf.get("quantization_config"):
        raise ConversionError(
            "config.json: the model is already quantized (quantization_config); "
            "convert the original bf16/f16/f32 weights"
        )
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConversionError(f"config.json: {key} is true; biases are not supported")
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act not in HIDDEN_ACTS:
        raise ConversionError(f"config.json: hidden_act {act!r} is not supported (silu or gelu)")
    window = hf.get("sliding_window")
    if window and hf.get("use_sliding_window", True) and window < hf.get("max_position_embeddings", 0):
        warnings.append(
            f"config.json: sliding_window {window} is ignored: attention always spans the "
            f"whole context, so outputs beyond {window} tokens differ from transformers"
        )
    dim, n_heads = _required(hf, "hidden_size"), _required(hf, "num_attention_heads")
    head_dim = hf.get("head_dim")
    try:
        config = ModelConfig(
            arch=arch,
            dim=dim,
            hidden_dim=_required(hf, "intermediate_size"),
            n_layers=_required(hf, "num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=_integer("num_key_value_heads", hf.get("num_key_value_heads") or n_heads),
            vocab_size=_required(hf, "vocab_size"),
            max_seq_len=_required(hf, "max_position_embeddings"),
            weight_float_type=float_type,
            hidden_act=HIDDEN_ACTS[act],
            head_dim=_integer("head_dim", head_dim) if head_dim else dim // n_heads,
            norm_epsilon=_norm_epsilon(hf, warnings),
            **_rope(hf, arch),
            **_experts(hf, arch),
        )
    except ConfigError as error:
        raise ConversionError(f"config.json: {error}") from None
    if config.head_dim % 2:
        raise ConversionError(f"config.json: head_dim {config.head_dim} is odd; RoPE needs an even head_dim")
    return HfModelConfig(config, bool(hf.get("tie_word_embeddings", False)), warnings)
