"""The model's structure, declared once: every tensor, its shape and type, and how a plan cuts it.

Three things must agree on tensor names and on how each tensor is split between nodes: the
order of tensors in a `.m` file (formats/model_file.py), the slices a plan gives every node
(plan.py), and the weights the forward pass looks up (forward.py). All three read this module:
`tensor_specs` lists the tensors in file order, each with its `Role`, and a role says how a plan
splits it (`Split`) and along which dimension of the model (`Axis`). `tensor_name` is the one
place a name is spelled.

Megatron-style tensor parallelism (docs/architecture.md):
- attention: whole KV heads per node with the query heads that share them: rows of wq, wk,
  wv; the matching columns of wo;
- feed-forward (every expert alike): rows of w1/w3 and columns of w2 over the hidden dimension;
- classifier: rows (vocabulary) split over nodes;
- embedding: the root only; norms, q/k norms and the MoE router: every node holds them whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from dllama_py.model.config import ConfigError, FloatType, ModelConfig


class Split(Enum):
    """How a plan cuts a tensor between nodes."""

    ROWS = "rows"  # each node holds a range of output rows
    COLS = "cols"  # each node holds a range of input columns (its partial sums are added by a sync)
    FULL = "full"  # every node holds all of it
    ROOT = "root"  # only the root holds it


class Axis(Enum):
    """The dimension of the model a split range runs along (NodeSlice gives each node's range)."""

    Q = "q"  # query heads: rows of wq, columns of wo (head_dim values per head)
    KV = "kv"  # KV heads: rows of wk and wv
    FF = "ff"  # the feed-forward hidden dimension
    VOCAB = "vocab"  # the vocabulary


class Role(Enum):
    """What a tensor is in the model; the value is (file name part, split, axis)."""

    EMBEDDING = ("embedding", Split.ROOT, None)
    WQ = ("wq", Split.ROWS, Axis.Q)
    WK = ("wk", Split.ROWS, Axis.KV)
    WV = ("wv", Split.ROWS, Axis.KV)
    WO = ("wo", Split.COLS, Axis.Q)
    ROUTER = ("router", Split.FULL, None)
    W1 = ("w1", Split.ROWS, Axis.FF)  # gate
    W2 = ("w2", Split.COLS, Axis.FF)  # down
    W3 = ("w3", Split.ROWS, Axis.FF)  # up
    Q_NORM = ("q_norm", Split.FULL, None)
    K_NORM = ("k_norm", Split.FULL, None)
    ATTENTION_NORM = ("attention_norm", Split.FULL, None)
    FFN_NORM = ("ffn_norm", Split.FULL, None)
    FINAL_NORM = ("final_norm", Split.FULL, None)
    CLASSIFIER = ("classifier", Split.ROWS, Axis.VOCAB)

    @property
    def part(self) -> str:
        return self.value[0]

    @property
    def split(self) -> Split:
        return self.value[1]

    @property
    def axis(self) -> Axis | None:
        return self.value[2]


def tensor_name(role: Role, layer: int | None = None, expert: int | None = None) -> str:
    """The name of a tensor: `embedding`, `layers.3.wq`, `layers.3.experts.7.w1`, `classifier`."""
    if layer is None:
        return role.part
    if expert is None:
        return f"layers.{layer}.{role.part}"
    return f"layers.{layer}.experts.{expert}.{role.part}"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the model: its name (e.g. `layers.3.wq`), shape (rows, cols), encoding and
    role (which says how a plan splits it). Vectors (norm weights) have shape (1, n)."""

    name: str
    shape: tuple[int, int]
    float_type: FloatType
    role: Role | None = None

    @property
    def nbytes(self) -> int:
        """Bytes on disk."""
        return self.float_type.tensor_bytes(*self.shape)

    @property
    def storage_shape(self) -> tuple[int, int]:
        """Shape of the stored array: (rows, cols) for f32/f16, (rows, cols/32*block_bytes) for q40/q80."""
        rows, cols = self.shape
        return rows, self.float_type.row_elements(cols)


def tensor_specs(config: ModelConfig) -> list[TensorSpec]:
    """The tensors of a model in file order, as distributed-llama's converter writes them.

    Embedding, norms, q/k norms and the MoE router are f32; every other matrix uses
    `config.weight_float_type`, or its own type from `config.tensor_types`. Raises ConfigError
    when a matrix row is not a whole number of quantization blocks.
    """
    wt, f32 = config.weight_float_type, FloatType.F32
    dim, ff = config.dim, config.ff_dim

    def spec(role: Role, shape: tuple[int, int], float_type: FloatType, layer: int | None = None,
             expert: int | None = None) -> TensorSpec:
        return TensorSpec(tensor_name(role, layer, expert), shape, float_type, role)

    specs = [spec(Role.EMBEDDING, (config.vocab_size, dim), f32)]
    for layer in range(config.n_layers):
        specs += [
            spec(Role.WQ, (config.q_dim, dim), wt, layer),
            spec(Role.WK, (config.kv_dim, dim), wt, layer),
            spec(Role.WV, (config.kv_dim, dim), wt, layer),
            spec(Role.WO, (dim, config.q_dim), wt, layer),
        ]
        experts: list[int | None] = [None]
        if config.is_moe:
            specs.append(spec(Role.ROUTER, (config.n_experts, dim), f32, layer))
            experts = list(range(config.n_experts))
        for expert in experts:  # gate, down, up: distributed-llama's order
            specs += [
                spec(Role.W1, (ff, dim), wt, layer, expert),
                spec(Role.W2, (dim, ff), wt, layer, expert),
                spec(Role.W3, (ff, dim), wt, layer, expert),
            ]
        if config.has_qk_norm:
            specs += [spec(Role.Q_NORM, (1, config.head_dim), f32, layer),
                      spec(Role.K_NORM, (1, config.head_dim), f32, layer)]
        specs += [spec(Role.ATTENTION_NORM, (1, dim), f32, layer), spec(Role.FFN_NORM, (1, dim), f32, layer)]
    specs += [spec(Role.FINAL_NORM, (1, dim), f32), spec(Role.CLASSIFIER, (config.vocab_size, dim), wt)]
    if config.tensor_types:
        overrides = dict(config.tensor_types)
        matrices = {s.name for s in specs if s.float_type == wt and s.role is not Role.EMBEDDING}
        unknown = sorted(set(overrides) - matrices)
        if unknown:
            raise ConfigError(f"no weight matrix named {unknown[0]} in this model (a tensor type names one)")
        specs = [TensorSpec(s.name, s.shape, overrides[s.name], s.role) if s.name in overrides else s for s in specs]
    for s in specs:
        _rows, cols = s.shape
        if cols % s.float_type.block_values:
            raise ConfigError(
                f"tensor {s.name} has rows of {cols} values, not a multiple of "
                f"{s.float_type.block_values}: {s.float_type.label} cannot store it (use f32 or f16)"
            )
    return specs
