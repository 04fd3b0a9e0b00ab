"""One node's forward pass over its slice of the model (the whole model on one node).

Every node of a cluster, the root included, runs this same code (SPMD). Per layer:
norm, q/k/v for the node's heads, (Qwen3 q/k norm), RoPE, KV cache, attention, the node's
columns of wo -> partial -> SYNC; norm, feed-forward rows -> partial -> SYNC. Each SYNC adds
the partials of all nodes to the replicated residual `x` (docs/architecture.md).

Shapes: B = rows in the batch (prompt tokens evaluated together, 1 when decoding),
D = dim, Q/K = the node's query/KV widths, F = the node's feed-forward rows.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Protocol

import numpy as np

from dllama_py.model import kernels
from dllama_py.model.config import ArchType, FloatType, HiddenAct, ModelConfig, RopeType
from dllama_py.model.kernels import WeightLayout
from dllama_py.model.plan import Plan
from dllama_py.model.structure import Role, tensor_name, tensor_specs


class Sync(Protocol):
    """How partial sums meet: x += the sum of every node's partial."""

    def reduce_add(self, partial: np.ndarray, x: np.ndarray, label: str) -> None:
        """x (B, D) += sum over nodes of partial (B, D); `label` names the step for errors."""
        ...


class Segment(Protocol):
    """The rows of one sequence in a step (engine/exchange.py's Segment is one): its KV slot,
    the position of its first row, how many rows, and how many of its last rows need logits."""

    @property
    def slot(self) -> int: ...

    @property
    def position(self) -> int: ...

    @property
    def rows(self) -> int: ...

    @property
    def logit_rows(self) -> int: ...


class KVCache:
    """Keys and values of the node's KV heads for every layer and every slot (one sequence each:
    continuous batching runs several at once), in RAM or in a memory-mapped temporary file
    (`storage="disk"`). Keys are stored transposed, (layers, slots, KV heads, head_dim, seq_len),
    so attention scores run along positions; values are (layers, slots, seq_len, K).
    The file (dllama-kv-*.bin in the temporary folder) is unlinked as soon as it is mapped: the
    mapping keeps its blocks until it goes, so nothing stays behind however the process ends."""

    def __init__(self, n_layers: int, seq_len: int, n_kv_heads: int, head_dim: int, storage: str = "ram",
                 slots: int = 1) -> None:
        keys_shape = (n_layers, slots, n_kv_heads, head_dim, seq_len)
        values_shape = (n_layers, slots, seq_len, n_kv_heads * head_dim)
        if storage == "disk":
            fd, path = tempfile.mkstemp(prefix="dllama-kv-", suffix=".bin")
            try:
                with os.fdopen(fd, "w+b") as file:
                    size = n_layers * slots * seq_len * n_kv_heads * head_dim
                    both = np.memmap(file, dtype=np.float32, mode="w+", shape=(2, size))
            finally:
                os.unlink(path)
            self.keys = both[0].reshape(keys_shape)
            self.values = both[1].reshape(values_shape)
        elif storage == "ram":
            # Touched now, at load: the memory is really there (no failure halfway through a long
            # answer), and the first prompt does not pay for the page faults (with huge pages the
            # kernel may compact memory on each one; measured up to 150 ms for a 1B model's cache).
            self.keys = np.empty(keys_shape, dtype=np.float32)
            self.values = np.empty(values_shape, dtype=np.float32)
            self.keys.fill(0.0)
            self.values.fill(0.0)
        else:
            raise ValueError(f"KV cache storage must be 'ram' or 'disk', got {storage!r}")
        self.seq_len, self.n_kv_heads, self.head_dim, self.slots = seq_len, n_kv_heads, head_dim, slots

    def store(self, layer: int, slot: int, pos0: int, k: np.ndarray, v: np.ndarray) -> None:
        """Write the keys k (B, K) and values v (B, K) of positions pos0..pos0+B-1 of `slot`."""
        B = k.shape[0]
        self.keys[layer, slot, :, :, pos0:pos0 + B] = k.reshape(B, self.n_kv_heads, self.head_dim).transpose(1, 2, 0)
        self.values[layer, slot, pos0:pos0 + B] = v

    def copy(self, source: int, target: int, length: int) -> None:
        """Slot `target` gets the keys and values of positions 0..length-1 of slot `source`."""
        self.keys[:, target, :, :, :length] = self.keys[:, source, :, :, :length]
        self.values[:, target, :length] = self.values[:, source, :length]

    def close(self) -> None:
        """Release the cache (for disk storage: the mapping, whose file is already unlinked)."""
        self.keys = self.values = np.zeros((0, 0, 0), dtype=np.float32)


def tensor_layouts(config: ModelConfig, layout: WeightLayout) -> dict[str, WeightLayout]:
    """The layout of every tensor: q40 matrices in `layout` (choose_layout's), the others as
    their type (a model may hold some matrices in another type: ModelConfig.tensor_types)."""
    q40 = layout if layout == WeightLayout.Q40X16 else WeightLayout.Q40
    return {spec.name: q40 if spec.float_type == FloatType.Q40 else WeightLayout(spec.float_type.label)
            for spec in tensor_specs(config)}


class NodeForward:
    """The forward pass of node `node` of `plan` over the weights it holds.

    `weights` maps tensor names (structure.tensor_name) to the node's slices, cut by `plan.cut`
    and held in `layout` (chosen by the loader, engine/loader.py). Buffers are allocated once for
    batches of up to `max_batch` rows.
    """

    def __init__(self, plan: Plan, node: int, weights: Mapping[str, np.ndarray], sync: Sync,
                 seq_len: int, max_batch: int, kv_storage: str, layout: WeightLayout, slots: int = 1) -> None:
        c = self.config = plan.config
        s = self.slice = plan.nodes[node]
        self.layout = layout
        self.layouts = tensor_layouts(c, layout)  # most matrices in `layout`; some models keep a few in another
        self.w = weights
        self.sync = sync
        self.seq_len = seq_len
        self.max_batch = max_batch
        self.quantized_input = layout.quantized_input
        self.q_width = s.n_heads * c.head_dim
        self.kv_width = s.n_kv_heads * c.head_dim
        self.slots = slots
        self.cache = KVCache(c.n_layers, seq_len, s.n_kv_heads, c.head_dim, kv_storage, slots)
        self.rope_style = "rotate_half" if c.rope_type == RopeType.FALCON else "interleaved"
        if c.has_rope_scaling:
            self.inv_freq = kernels.rope_frequencies(
                c.head_dim, float(c.rope_theta), float(c.rope_scaling_factor),
                float(c.rope_scaling_low_freq_factor), float(c.rope_scaling_high_freq_factor),
                c.rope_scaling_orig_max_seq_len)
        else:
            self.inv_freq = kernels.rope_frequencies(c.head_dim, float(c.rope_theta))
        self.activation = kernels.gelu if c.hidden_act == HiddenAct.GELU else kernels.silu

        def buf(width: int) -> np.ndarray:
            return np.zeros((max_batch, width), dtype=np.float32)

        d = c.dim
        self.h, self.partial = buf(d), buf(d)
        self.q, self.k, self.v, self.att = buf(self.q_width), buf(self.kv_width), buf(self.kv_width), buf(self.q_width)
        self.ff_a, self.ff_b = buf(s.ff_width), buf(s.ff_width)
        self.logits = buf(s.vocab_width)
        widest = max(d, self.q_width, s.ff_width)
        self.xq = np.zeros(max_batch * kernels.q80_row_bytes(widest), dtype=np.uint8)  # q80 input of a matmul
        if c.arch == ArchType.QWEN3_MOE:
            self.router_logits = buf(c.n_experts)
            self.expert_out = buf(d)
        # Per-layer weights and labels looked up once, not by name on every token.
        self.layers = [self._layer(i) for i in range(c.n_layers)]

    def _layer(self, i: int) -> SimpleNamespace:
        c = self.config

        def w(role: Role, expert: int | None = None) -> np.ndarray:
            return self.w[tensor_name(role, i, expert)]

        def lay(role: Role, expert: int | None = None) -> WeightLayout:
            return self.layouts[tensor_name(role, i, expert)]

        layer = SimpleNamespace(
            attention_norm=w(Role.ATTENTION_NORM).reshape(-1), ffn_norm=w(Role.FFN_NORM).reshape(-1),
            qkv=[w(Role.WQ), w(Role.WK), w(Role.WV)], wo=w(Role.WO),
            qkv_layouts=[lay(Role.WQ), lay(Role.WK), lay(Role.WV)], wo_layout=lay(Role.WO),
            attention_label=f"layer {i} attention sync", ffn_label=f"layer {i} feed-forward sync")
        if c.has_qk_norm:
            layer.q_norm, layer.k_norm = w(Role.Q_NORM).reshape(-1), w(Role.K_NORM).reshape(-1)
        if c.is_moe:
            layer.router = w(Role.ROUTER)
            layer.experts = [(w(Role.W1, e), w(Role.W3, e), w(Role.W2, e)) for e in range(c.n_experts)]
            layer.expert_layouts = [(lay(Role.W1, e), lay(Role.W3, e), lay(Role.W2, e)) for e in range(c.n_experts)]
        else:
            layer.ffn = (w(Role.W1), w(Role.W3), w(Role.W2))
            layer.ffn_layouts = (lay(Role.W1), lay(Role.W3), lay(Role.W2))
        return layer

    # ---- helpers ---------------------------------------------------------------------------
    def _input(self, x: np.ndarray) -> np.ndarray:
        """The input a matmul over this model's weights takes: q80 blocks of x, or x itself."""
        if not self.quantized_input:
            return x
        rows, width = x.shape
        q = self.xq[: rows * kernels.q80_row_bytes(width)].reshape(rows, kernels.q80_row_bytes(width))
        kernels.quantize_q80_into(x, q)
        return q


    # ---- the pass --------------------------------------------------------------------------
    def forward(self, x: np.ndarray, segments: Sequence[Segment]) -> np.ndarray:
        """Run every layer on x (B, D) float32 in place: the rows of every segment in order, each
        segment a sequence's rows in its KV slot from its position on (their keys and values go
        to the cache). Returns this node's classifier slice of the logits of the rows the
        segments keep (`Segment.logit_rows`: none, the last, or all of each), stacked in order:
        (rows, V_node)."""
        c, B = self.config, x.shape[0]
        if B > self.max_batch:
            raise ValueError(f"batch of {B} rows is larger than the {self.max_batch} this node was built for")
        if sum(seg.rows for seg in segments) != B or not segments:
            raise ValueError(f"the segments hold {sum(seg.rows for seg in segments)} rows, the batch {B}")
        spans, start = [], 0
        for seg in segments:
            if not 0 <= seg.slot < self.slots:
                raise ValueError(f"KV slot {seg.slot} is not one of this session's {self.slots}")
            if seg.rows < 1 or seg.position < 0 or seg.position + seg.rows > self.seq_len:
                raise ValueError(f"positions {seg.position}..{seg.position + seg.rows - 1} do not fit the context "
                                 f"of {self.seq_len} tokens")
            spans.append((seg, start, start + seg.rows))
            start += seg.rows
        positions = np.concatenate([np.arange(seg.position, seg.position + seg.rows, dtype=np.int32)
                                    for seg in segments]) if len(segments) > 1 else \
            np.arange(segments[0].position, segments[0].position + B, dtype=np.int32)
        h, partial = self.h[:B], self.partial[:B]
        for index, layer in enumerate(self.layers):
            # attention: (B, D) -> q (B, Q), k/v (B, K) -> att (B, Q) -> partial (B, D)
            kernels.rms_norm(x, layer.attention_norm, h, c.norm_epsilon)
            q, k, v = self.q[:B], self.k[:B], self.v[:B]
            kernels.matmul_many(self._input(h), layer.qkv, layer.qkv_layouts, [q, k, v])
            if c.has_qk_norm:
                q_heads, k_heads = q.reshape(-1, c.head_dim), k.reshape(-1, c.head_dim)  # per-head norm
                kernels.rms_norm(q_heads, layer.q_norm, q_heads, c.norm_epsilon)
                kernels.rms_norm(k_heads, layer.k_norm, k_heads, c.norm_epsilon)
            kernels.rope(q, positions, self.inv_freq, self.slice.n_heads, c.head_dim, self.rope_style)
            kernels.rope(k, positions, self.inv_freq, self.slice.n_kv_heads, c.head_dim, self.rope_style)
            att = self.att[:B]
            for seg, r0, r1 in spans:  # each sequence attends to its own slot
                self.cache.store(index, seg.slot, seg.position, k[r0:r1], v[r0:r1])
                kernels.attention(q[r0:r1], self.cache.keys[index, seg.slot], self.cache.values[index, seg.slot],
                                  positions[r0:r1], att[r0:r1], self.slice.n_heads, self.slice.n_kv_heads,
                                  c.head_dim)
            kernels.matmul(self._input(att), layer.wo, layer.wo_layout, partial)
            self.sync.reduce_add(partial, x, layer.attention_label)

            # feed-forward: (B, D) -> (B, F) -> partial (B, D)
            kernels.rms_norm(x, layer.ffn_norm, h, c.norm_epsilon)
            if c.is_moe:
                self._moe(layer, h, partial)
            else:
                self._ffn(layer.ffn, layer.ffn_layouts, self._input(h), partial)
            self.sync.reduce_add(partial, x, layer.ffn_label)

        keep = [r for seg, r0, r1 in spans for r in range(r1 - seg.logit_rows, r1)]
        if not keep:
            return self.logits[:0]
        rows = x[keep[0]:keep[-1] + 1] if keep == list(range(keep[0], keep[-1] + 1)) else x[keep]
        out_h = self.h[: rows.shape[0]]
        kernels.rms_norm(np.ascontiguousarray(rows), self.w[tensor_name(Role.FINAL_NORM)].reshape(-1), out_h,
                         c.norm_epsilon)
        logits = self.logits[: rows.shape[0]]
        kernels.matmul(self._input(out_h), self.w[tensor_name(Role.CLASSIFIER)],
                       self.layouts[tensor_name(Role.CLASSIFIER)], logits)
        return logits

    def _ffn(self, weights: tuple[np.ndarray, np.ndarray, np.ndarray],
             layouts: tuple[WeightLayout, WeightLayout, WeightLayout], hq: np.ndarray, out: np.ndarray) -> None:
        """out (n, D) = w2 (activation(w1 h) * w3 h) over this node's rows of one FFN (w1, w3, w2)."""
        w1, w3, w2 = weights
        n = out.shape[0]
        a, b = self.ff_a[:n], self.ff_b[:n]
        kernels.matmul_many(hq, [w1, w3], [layouts[0], layouts[1]], [a, b])
        self.activation(a)
        kernels.mul(a, b)
        kernels.matmul(self._input(a), w2, layouts[2], out)

    def _moe(self, layer: SimpleNamespace, h: np.ndarray, out: np.ndarray) -> None:
        """Mixture of experts: the router runs on every node; each routed expert's FFN runs on
        the rows sent to it, weighted by the renormalised router probability."""
        c, B = self.config, h.shape[0]
        router_logits = self.router_logits[:B]
        kernels.matmul_f32_f32_f32(h, layer.router, router_logits)
        experts, weights = kernels.moe_gate(router_logits, c.n_active_experts, True)
        out[:] = 0.0
        hq = self._input(h).copy() if self.quantized_input else h.copy()
        for expert in np.unique(experts):
            rows, slots = np.nonzero(experts == expert)
            x_in = np.ascontiguousarray(hq[rows])
            y = self.expert_out[: len(rows)]
            self._ffn(layer.experts[expert], layer.expert_layouts[expert], x_in, y)
            out[rows] += weights[rows, slots, None] * y

    def close(self) -> None:
        """Free the KV cache."""
        self.cache.close()
