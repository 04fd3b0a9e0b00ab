"""Model hyper-parameters as stored in a distributed-llama `.m` header.

`ModelConfig` is the one description of a model that every other module uses (the file
reader and writer, the converter, the slicing plan, the forward pass). Key ids, defaults and
the float types follow ../shared/dllama-format.md sections 1 and 2.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class FloatType(IntEnum):
    """How a tensor's values are encoded on disk (header key `weights_float_type`)."""

    F32 = 0
    F16 = 1
    Q40 = 2
    Q80 = 3

    @property
    def label(self) -> str:
        """The lowercase name used on command lines and in file names, e.g. `q40`."""
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> FloatType:
        """Parse `f32`, `f16`, `q40` or `q80` (case-insensitive); raises ValueError otherwise."""
        try:
            return cls[label.upper()]
        except KeyError:
            raise ValueError(f"unknown float type {label!r} (expected f32, f16, q40 or q80)") from None

    @property
    def block_values(self) -> int:
        """Values per block: 32 for the quantized types, 1 for f32/f16."""
        return 32 if self in (FloatType.Q40, FloatType.Q80) else 1

    @property
    def block_bytes(self) -> int:
        """Bytes per block: 18 (q40: fp16 scale + 16 nibble bytes), 34 (q80), 4 (f32), 2 (f16)."""
        return {FloatType.F32: 4, FloatType.F16: 2, FloatType.Q40: 18, FloatType.Q80: 34}[self]

    @property
    def storage_dtype(self) -> np.dtype:
        """The numpy dtype of a row as stored: float32, uint16 (fp16 bits) or uint8 (blocks)."""
        return np.dtype({FloatType.F32: "<f4", FloatType.F16: "<u2"}.get(self, "u1"))

    def row_elements(self, cols: int) -> int:
        """Number of `storage_dtype` elements that hold one row of `cols` values."""
        return self.row_bytes(cols) // self.storage_dtype.itemsize

    def row_bytes(self, cols: int) -> int:
        """Bytes of one row of `cols` values; raises ValueError if `cols` is not a whole number of blocks."""
        if cols % self.block_values:
            raise ValueError(f"{self.label} rows need a multiple of {self.block_values} values, got {cols}")
        return cols // self.block_values * self.block_bytes

    def tensor_bytes(self, rows: int, cols: int) -> int:
        """Bytes of a (rows, cols) tensor in this encoding."""
        return rows * self.row_bytes(cols)


class ArchType(IntEnum):
    """Model family (header key `arch_type`)."""

    LLAMA = 0xABCD00
    QWEN3 = 0xABCD01
    QWEN3_MOE = 0xABCD02


class HiddenAct(IntEnum):
    """Feed-forward activation (header key `hidden_act`)."""

    GELU = 0
    SILU = 1


class RopeType(IntEnum):
    """Rotary embedding variant (header key `rope_type`)."""

    LLAMA = 0  # rotate interleaved pairs (x[2i], x[2i+1])
    FALCON = 1  # rotate halves (x[j], x[j + head_dim/2]); Qwen3
    LLAMA3_1 = 2  # LLAMA pairs with Llama 3.1 frequency smoothing


class HeaderKey(IntEnum):
    """Key ids of the `.m` header (distributed-llama `LlmHeaderKey`)."""

    VERSION = 0
    ARCH_TYPE = 1
    DIM = 2
    HIDDEN_DIM = 3
    N_LAYERS = 4
    N_HEADS = 5
    N_KV_HEADS = 6
    N_EXPERTS = 7
    N_ACTIVE_EXPERTS = 8
    VOCAB_SIZE = 9
    MAX_SEQ_LEN = 10
    HIDDEN_ACT = 11
    ROPE_THETA = 12
    WEIGHT_FLOAT_TYPE = 13
    ROPE_SCALING_FACTOR = 14
    ROPE_SCALING_LOW_FREQ_FACTOR = 15
    ROPE_SCALING_HIGH_FREQ_FACTOR = 16
    ROPE_SCALING_ORIG_MAX_SEQ_LEN = 17
    ROPE_TYPE = 18
    HEAD_DIM = 19
    NORM_EPSILON = 20
    MOE_HIDDEN_DIM = 21


NORM_EPSILON_CODES: dict[int, float] = {5: 1e-5, 6: 1e-6}


class ConfigError(ValueError):
    """A header or config describes a model that cannot exist or is not supported."""


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one model, as a `.m` header stores them (all values are integers on disk)."""

    arch: ArchType
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    max_seq_len: int
    weight_float_type: FloatType
    n_experts: int = 0
    n_active_experts: int = 0
    hidden_act: HiddenAct = HiddenAct.SILU
    rope_theta: int = 10000
    rope_scaling_factor: int = 1
    rope_scaling_low_freq_factor: int = 0
    rope_scaling_high_freq_factor: int = 0
    rope_scaling_orig_max_seq_len: int = 0
    rope_type: RopeType = RopeType.LLAMA
    head_dim: int = 0  # 0 means dim // n_heads; __post_init__ fills it in
    norm_epsilon: float = 1e-5
    moe_hidden_dim: int = 0
    version: int = 0
    # Matrices stored in another type than weight_float_type, as (tensor name, type) pairs: a GGUF
    # file keeps some matrices at higher precision (e.g. the classifier in Q6_K, held as q80 beside
    # q40 layers). Each must take the same input as weight_float_type (q40 with q80, f32 with f16).
    # A `.m` header cannot store these (one type for every matrix); a cluster's SETUP carries them.
    tensor_types: tuple[tuple[str, FloatType], ...] = ()

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise through object.__setattr__
        set_(self, "arch", ArchType(self.arch))
        set_(self, "weight_float_type", FloatType(self.weight_float_type))
        set_(self, "hidden_act", HiddenAct(self.hidden_act))
        set_(self, "rope_type", RopeType(self.rope_type))
        set_(self, "tensor_types", tuple(sorted((str(name), FloatType(t)) for name, t in self.tensor_types)))
        if self.head_dim == 0 and self.n_heads > 0:
            set_(self, "head_dim", self.dim // self.n_heads)
        if self.arch in (ArchType.QWEN3, ArchType.QWEN3_MOE):
            set_(self, "rope_type", RopeType.FALCON)  # distributed-llama forces this at load
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first field that makes the model impossible."""
        positive = (
            "dim",
            "hidden_dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "vocab_size",
            "max_seq_len",
            "head_dim",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.n_experts < 0 or self.n_active_experts < 0:
            raise ConfigError("n_experts and n_active_experts must not be negative")
        if self.n_experts > 0:
            if not 1 <= self.n_active_experts <= self.n_experts:
                raise ConfigError(f"n_active_experts {self.n_active_experts} must be in 1..{self.n_experts}")
            if self.moe_hidden_dim <= 0:
                raise ConfigError("a mixture-of-experts model needs moe_hidden_dim > 0")
        if self.arch == ArchType.QWEN3_MOE and self.n_experts == 0:
            raise ConfigError("a qwen3_moe model needs n_experts > 0")
        if self.norm_epsilon not in NORM_EPSILON_CODES.values():
            raise ConfigError(f"norm_epsilon must be 1e-5 or 1e-6, got {self.norm_epsilon}")
        for name, float_type in self.tensor_types:
            if float_type.block_values != self.weight_float_type.block_values:
                raise ConfigError(f"tensor {name} in {float_type.label} cannot sit beside "
                                  f"{self.weight_float_type.label} weights (their matmuls take different inputs)")

    # ---- derived sizes ------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        """Width of the query projection: head_dim * n_heads."""
        return self.head_dim * self.n_heads

    @property
    def kv_dim(self) -> int:
        """Width of the key and value projections: head_dim * n_kv_heads."""
        return self.head_dim * self.n_kv_heads

    @property
    def matrix_types(self) -> set[FloatType]:
        """Every type a matrix of this model is stored in."""
        return {self.weight_float_type} | {t for _, t in self.tensor_types}

    @property
    def is_moe(self) -> bool:
        """True when the feed-forward is a mixture of experts."""
        return self.n_experts > 0

    @property
    def ff_dim(self) -> int:
        """Feed-forward width of one FFN (one expert for MoE): moe_hidden_dim for MoE, else hidden_dim."""
        return self.moe_hidden_dim if self.is_moe else self.hidden_dim

    @property
    def has_qk_norm(self) -> bool:
        """True for Qwen3 families, which RMS-normalise q and k per head."""
        return self.arch in (ArchType.QWEN3, ArchType.QWEN3_MOE)

    @property
    def n_kv_groups(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def has_rope_scaling(self) -> bool:
        """True when Llama 3.1 frequency smoothing applies (distributed-llama: factor != 1)."""
        return self.rope_scaling_factor != 1

    # ---- header conversion ---------------------------------------------------------------
    @classmethod
    def from_header(cls, items: Iterable[tuple[int, int]]) -> ModelConfig:
        """Build a config from the header's (key, value) int32 pairs; raises ConfigError on unknown
        keys, a missing weight type, an unknown architecture or impossible values."""
        values: dict[HeaderKey, int] = {}
        for key, value in items:
            try:
                header_key = HeaderKey(key)
            except ValueError:
                raise ConfigError(f"unknown header key {key} (value {value})") from None
            if header_key in values:
                raise ConfigError(f"header key {header_key.name.lower()} ({key}) appears twice")
            values[header_key] = value
        if HeaderKey.WEIGHT_FLOAT_TYPE not in values:
            raise ConfigError("header has no weights_float_type (key 13)")
        for required in (
            HeaderKey.ARCH_TYPE,
            HeaderKey.DIM,
            HeaderKey.HIDDEN_DIM,
            HeaderKey.N_LAYERS,
            HeaderKey.N_HEADS,
            HeaderKey.N_KV_HEADS,
            HeaderKey.VOCAB_SIZE,
            HeaderKey.MAX_SEQ_LEN,
        ):
            if required not in values:
                raise ConfigError(f"header has no {required.name.lower()} (key {int(required)})")
        arch = values[HeaderKey.ARCH_TYPE]
        if arch not in ArchType._value2member_map_:
            raise ConfigError(
                f"unknown architecture 0x{arch & 0xFFFFFFFF:X} (known: llama, qwen3, qwen3_moe)"
            )
        checks = (
            (HeaderKey.WEIGHT_FLOAT_TYPE, FloatType),
            (HeaderKey.HIDDEN_ACT, HiddenAct),
            (HeaderKey.ROPE_TYPE, RopeType),
        )
        for key, enum in checks:
            if key in values and values[key] not in enum._value2member_map_:
                raise ConfigError(f"unknown {key.name.lower()} {values[key]}")
        eps_code = values.get(HeaderKey.NORM_EPSILON, 5)
        if eps_code not in NORM_EPSILON_CODES:
            raise ConfigError(f"unknown norm_epsilon code {eps_code} (expected 5 for 1e-5 or 6 for 1e-6)")

        def get(key: HeaderKey, default: int) -> int:
            return values.get(key, default)

        return cls(
            arch=ArchType(arch),
            dim=values[HeaderKey.DIM],
            hidden_dim=values[HeaderKey.HIDDEN_DIM],
            n_layers=values[HeaderKey.N_LAYERS],
            n_heads=values[HeaderKey.N_HEADS],
            n_kv_heads=values[HeaderKey.N_KV_HEADS],
            vocab_size=values[HeaderKey.VOCAB_SIZE],
            max_seq_len=values[HeaderKey.MAX_SEQ_LEN],
            weight_float_type=FloatType(values[HeaderKey.WEIGHT_FLOAT_TYPE]),
            n_experts=get(HeaderKey.N_EXPERTS, 0),
            n_active_experts=get(HeaderKey.N_ACTIVE_EXPERTS, 0),
            hidden_act=HiddenAct(get(HeaderKey.HIDDEN_ACT, HiddenAct.SILU)),
            rope_theta=get(HeaderKey.ROPE_THETA, 10000),
            rope_scaling_factor=get(HeaderKey.ROPE_SCALING_FACTOR, 1),
            rope_scaling_low_freq_factor=get(HeaderKey.ROPE_SCALING_LOW_FREQ_FACTOR, 0),
            rope_scaling_high_freq_factor=get(HeaderKey.ROPE_SCALING_HIGH_FREQ_FACTOR, 0),
            rope_scaling_orig_max_seq_len=get(HeaderKey.ROPE_SCALING_ORIG_MAX_SEQ_LEN, 0),
            rope_type=RopeType(get(HeaderKey.ROPE_TYPE, RopeType.LLAMA)),
            head_dim=get(HeaderKey.HEAD_DIM, 0),
            norm_epsilon=NORM_EPSILON_CODES[eps_code],
            moe_hidden_dim=get(HeaderKey.MOE_HIDDEN_DIM, 0),
            version=get(HeaderKey.VERSION, 0),
        )

    def header_items(self) -> list[tuple[HeaderKey, int]]:
        """The (key, value) pairs to write, in the order distributed-llama's converter writes them.

        Rope scaling keys are written only when scaling is on (Llama 3.1 style); moe_hidden_dim only
        for MoE models. Everything else is always explicit.
        """
        k = HeaderKey
        items: list[tuple[HeaderKey, int]] = [
            (k.VERSION, self.version),
            (k.ARCH_TYPE, int(self.arch)),
            (k.HIDDEN_ACT, int(self.hidden_act)),
            (k.DIM, self.dim),
            (k.HIDDEN_DIM, self.hidden_dim),
            (k.N_LAYERS, self.n_layers),
            (k.N_HEADS, self.n_heads),
            (k.N_KV_HEADS, self.n_kv_heads),
            (k.WEIGHT_FLOAT_TYPE, int(self.weight_float_type)),
            (k.MAX_SEQ_LEN, self.max_seq_len),
            (k.VOCAB_SIZE, self.vocab_size),
            (k.N_EXPERTS, self.n_experts),
            (k.N_ACTIVE_EXPERTS, self.n_active_experts),
            (k.ROPE_THETA, self.rope_theta),
        ]
        implied_rope = RopeType.FALCON if self.has_qk_norm else RopeType.LLAMA  # what a reader assumes
        if self.has_rope_scaling or self.rope_type != implied_rope:
            items += [
                (k.ROPE_SCALING_FACTOR, self.rope_scaling_factor),
                (k.ROPE_SCALING_LOW_FREQ_FACTOR, self.rope_scaling_low_freq_factor),
                (k.ROPE_SCALING_HIGH_FREQ_FACTOR, self.rope_scaling_high_freq_factor),
                (k.ROPE_SCALING_ORIG_MAX_SEQ_LEN, self.rope_scaling_orig_max_seq_len),
                (k.ROPE_TYPE, int(self.rope_type)),
            ]
        eps_code = {v: c for c, v in NORM_EPSILON_CODES.items()}[self.norm_epsilon]
        items += [(k.HEAD_DIM, self.head_dim), (k.NORM_EPSILON, eps_code)]
        if self.is_moe:
            items.append((k.MOE_HIDDEN_DIM, self.moe_hidden_dim))
        return items
