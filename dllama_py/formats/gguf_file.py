"""GGUF model files (llama.cpp's format), read as a model the engine runs as it is.

A GGUF file is a header (magic `GGUF`, version 2 or 3, tensor and key counts), typed metadata
key/value pairs, a table of tensors (name, dimensions, ggml type, offset), then the aligned
tensor data. This module parses the header itself, with every count and length checked against
the file before anything is built from it (the `gguf` package's reader builds a numpy view per
string: 16 s for a 150k-token vocabulary), and maps the file read-only.

`GGUFModel` looks like a `.m` file to the rest of the engine (formats/model_file.py's
ModelFile): a ModelConfig from the metadata, the tensors under this project's names in
`tensor_specs` order, `release`, `embed` and `close`. What each tensor becomes:

* F32, F16, Q4_0 and Q8_0 matrices are used as they are (ggml's block_q4_0 and block_q8_0 are
  byte for byte distributed-llama's Q40 and Q80): views of the mapped file;
* other matrix types are requantized while loading, tensor by tensor in row chunks: K-quants
  (dequantized in C++ for Q4_K, Q5_K and Q6_K; with the `gguf` package's numpy code for the
  rest) to q40 for 2-5 bit types and q80 for 6-8 bit ones (`weight_type` overrides), BF16 to
  f32, and float matrices beside quantized ones to q80; each conversion is reported once;
* norm vectors and the MoE router become f32; the embedding stays in the file, in its own type,
  and `embed` dequantizes the rows a step needs.

A model whose matrices end up in two types (a Q4_0 file keeps its classifier in Q6_K: q80 beside
q40) lists the odd ones in `ModelConfig.tensor_types`. Architectures: llama (Llama 1-3,
Mistral; Llama 3.1+ rope scaling from its `rope_freqs` tensor), qwen3 and qwen3moe. llama.cpp's
converter permutes Llama's q/k rows into the interleaved RoPE layout, the layout this engine's
`.m` files use too, so they need no change.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from dllama_py.formats.model_file import ModelFormatError, encode_rows
from dllama_py.model.config import ArchType, ConfigError, FloatType, ModelConfig
from dllama_py.model.structure import Role, TensorSpec, tensor_specs

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
CHUNK_VALUES = 1 << 20  # values dequantized at a time while requantizing (4 MiB of f32: stays in cache better)


class GGUFError(ModelFormatError):
    """A GGUF file is malformed or describes a model this engine cannot run."""


# ---- ggml tensor types: (name, values per block, bytes per block) ----------------------------
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
F32, F16, Q4_0, Q8_0, BF16 = 0, 1, 2, 8, 30
DIRECT = {F32: FloatType.F32, F16: FloatType.F16, Q4_0: FloatType.Q40, Q8_0: FloatType.Q80}
FLOAT_TYPES = (F32, F16, BF16)
HIGH_PRECISION = {"Q6_K", "Q8_1", "Q8_K"}  # 6-8 bits a value: requantized to q80 by default
NOT_WEIGHTS = {"I8", "I16", "I32", "I64", "F64"}

# ---- metadata value types ---------------------------------------------------------------------
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}


class _Reader:
    """Bounds-checked little-endian reads from the mapped file: every length and count a file
    claims is compared with the bytes left before anything is read or built from it."""

    def __init__(self, data: mmap.mmap, path: Path) -> None:
        self.data, self.pos, self.size, self.path = data, 0, len(data), path

    def fail(self, message: str) -> GGUFError:
        return GGUFError(f"{self.path}: {message}")

    def take(self, n: int, what: str) -> int:
        """Advance over n bytes; return where they start."""
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, the file has {self.size}")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, fmt: str, what: str) -> int | float | bool:
        return struct.unpack_from(fmt, self.data, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        start = self.take(n, what)
        try:
            return self.data[start:start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, vtype: int, what: str) -> object:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            etype = self.scalar("<I", what)
            count = self.scalar("<Q", what)
            if etype in _NUMPY:
                itemsize = np.dtype(_NUMPY[etype]).itemsize
                if count > (self.size - self.pos) // itemsize:
                    raise self.fail(f"{what}: an array of {count} values does not fit in the file")
                values = np.frombuffer(self.data, _NUMPY[etype], count, self.take(count * itemsize, what))
                return values.astype(bool).tolist() if etype == 7 else values.tolist()
            if etype == STRING:
                if count > (self.size - self.pos) // 8:
                    raise self.fail(f"{what}: an array of {count} strings does not fit in the file")
                return [self.string(what) for _ in range(count)]
            if etype == ARRAY:
                raise self.fail(f"{what}: nested arrays are not supported")
            raise self.fail(f"{what}: unknown array element type {etype}")
        raise self.fail(f"{what}: unknown value type {vtype}")


@dataclass(frozen=True)
class TensorInfo:
    """A tensor of the file's table: name, ggml type, dimensions (ne: row length first), where
    its bytes are and how many."""

    name: str
    ggml_type: int
    dims: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]

    @property
    def row_bytes(self) -> int:
        _, block, size = GGML_TYPES[self.ggml_type]
        return self.dims[0] // block * size


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, object]
    tensors: dict[str, TensorInfo]
    data_start: int


def parse_header(data: mmap.mmap, path: Path) -> GGUFHeader:
    """The metadata and the tensor table; GGUFError for anything malformed or out of range."""
    r = _Reader(data, path)
    if r.size < 4 or data[:4] != MAGIC:
        raise r.fail(f"not a GGUF file (magic {bytes(data[:4])!r}, expected {MAGIC!r})")
    r.take(4, "magic")
    version = r.scalar("<I", "version")
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise r.fail(f"GGUF version {version} is not supported (2 and 3 are){hint}")
    n_tensors = r.scalar("<Q", "tensor count")
    n_kv = r.scalar("<Q", "metadata count")
    if n_kv > (r.size - r.pos) // 12:  # a key is at least 8 + 4 bytes
        raise r.fail(f"{n_kv} metadata entries cannot fit in {r.size} bytes")
    if n_tensors > (r.size - r.pos) // 28:  # a tensor entry is at least 8 + 4 + 8 + 4 + 4 bytes
        raise r.fail(f"{n_tensors} tensors cannot fit in {r.size} bytes")
    metadata: dict[str, object] = {}
    for i in range(n_kv):
        key = r.string(f"metadata key {i}")
        vtype = r.scalar("<I", f"type of {key}")
        if key in metadata:
            raise r.fail(f"metadata key {key} appears twice")
        metadata[key] = r.value(vtype, key)
    infos = []
    for i in range(n_tensors):
        name = r.string(f"name of tensor {i}")
        n_dims = r.scalar("<I", f"dimensions of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise r.fail(f"tensor {name} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        dims = tuple(r.scalar("<Q", f"dimensions of {name}") for _ in range(n_dims))
        ggml_type = r.scalar("<I", f"type of {name}")
        offset = r.scalar("<Q", f"offset of {name}")
        infos.append((name, ggml_type, dims, offset))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1 \
            or alignment & (alignment - 1):
        raise r.fail(f"general.alignment {alignment!r} is not a power of two")
    data_start = -(-r.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, ggml_type, dims, offset in infos:
        if ggml_type not in GGML_TYPES:
            raise r.fail(f"tensor {name} has unknown ggml type {ggml_type}")
        _, block, size = GGML_TYPES[ggml_type]
        if dims[0] % block:
            raise r.fail(f"tensor {name}: rows of {dims[0]} values are not whole {GGML_TYPES[ggml_type][0]} "
                         f"blocks of {block}")
        if any(d < 1 for d in dims):
            raise r.fail(f"tensor {name} has an empty dimension {list(dims)}")
        nbytes = math.prod(dims) // block * size
        start = data_start + offset
        if offset % alignment or start + nbytes > r.size:
            raise r.fail(f"tensor {name}: data {start}..{start + nbytes} lies outside the file "
                         f"({r.size} bytes) or off the {alignment}-byte alignment")
        if name in tensors:
            raise r.fail(f"tensor {name} appears twice")
        tensors[name] = TensorInfo(name, ggml_type, dims, start, nbytes)
    return GGUFHeader(version, metadata, tensors, data_start)


# ---- dequantization --------------------------------------------------------------------------
def dequantize_rows(raw: np.ndarray, ggml_type: int, cols: int) -> np.ndarray:
    """float32 (rows, cols) from rows of a ggml type (uint8 (rows, row_bytes))."""
    from dllama_py import _core

    raw = np.ascontiguousarray(raw)
    if ggml_type == F32:
        return raw.view(np.float32)
    if ggml_type == F16:
        return _core.f16_to_f32(raw.view(np.uint16))
    if ggml_type == BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    fast = {Q4_0: _core.dequantize_q40, Q8_0: _core.dequantize_q80, 12: _core.dequantize_q4k,
            13: _core.dequantize_q5k, 14: _core.dequantize_q6k}.get(ggml_type)
    if fast is not None:
        return fast(raw)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(raw, GGMLQuantizationType(ggml_type)).astype(np.float32, copy=False).reshape(-1, cols)


def readable(ggml_type: int) -> bool:
    """Whether dequantize_rows can read this type (natively, or with gguf-py's numpy code)."""
    if ggml_type in (F32, F16, BF16, Q4_0, Q8_0, 12, 13, 14):
        return True
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits

    return GGMLQuantizationType(ggml_type) in _type_traits


# ---- the model ---------------------------------------------------------------------------------
ARCHS = {"llama": ArchType.LLAMA, "qwen3": ArchType.QWEN3, "qwen3moe": ArchType.QWEN3_MOE}
GGUF_NAMES = {  # this project's role -> llama.cpp's tensor name in block i
    Role.WQ: "attn_q", Role.WK: "attn_k", Role.WV: "attn_v", Role.WO: "attn_output", Role.W1: "ffn_gate",
    Role.W2: "ffn_down", Role.W3: "ffn_up", Role.ATTENTION_NORM: "attn_norm", Role.FFN_NORM: "ffn_norm",
    Role.Q_NORM: "attn_q_norm", Role.K_NORM: "attn_k_norm", Role.ROUTER: "ffn_gate_inp",
}
EXPERT_NAMES = {Role.W1: "ffn_gate_exps", Role.W2: "ffn_down_exps", Role.W3: "ffn_up_exps"}
LLAMA3_ROPE = (1, 4, 8192)  # low/high frequency factors and original context of Llama 3.1-3.3


@dataclass
class Source:
    """Where one of this project's tensors comes from: a file tensor (a slice of it for an expert)."""

    info: TensorInfo
    expert: int | None = None


class GGUFTensor:
    """One tensor under this project's name: spec (shape, the type the engine holds it in), the
    file bytes it comes from (`stored`), and `data` in `spec.float_type` storage (a view of the file
    when the types agree; requantized on each access otherwise)."""

    def __init__(self, spec: TensorSpec, model: GGUFModel, source: Source) -> None:
        self.spec, self.model, self.source = spec, model, source
        rows = spec.shape[0]
        info = source.info
        start = info.offset + (0 if source.expert is None else source.expert * rows * info.row_bytes)
        self.offset = start
        self.stored = np.frombuffer(model.mapping, np.uint8, rows * info.row_bytes, start).reshape(rows, -1)

    name = property(lambda self: self.spec.name)
    shape = property(lambda self: self.spec.shape)
    float_type = property(lambda self: self.spec.float_type)

    @property
    def data(self) -> np.ndarray:
        spec = self.spec
        if DIRECT.get(self.source.info.ggml_type) == spec.float_type:
            return self.stored.view(spec.float_type.storage_dtype)
        out = np.empty(spec.storage_shape, dtype=spec.float_type.storage_dtype)
        if spec.float_type == FloatType.Q80:  # quantized straight into place: no copy of each chunk
            from dllama_py import _core

            ggml_type, (rows, cols) = self.source.info.ggml_type, spec.shape
            step = max(1, CHUNK_VALUES // cols)
            for r in range(0, rows, step):
                values = dequantize_rows(self.stored[r:r + step], ggml_type, cols)
                _core.quantize_q80_into(np.ascontiguousarray(values, dtype=np.float32), out[r:r + step])
            return out
        r = 0
        for chunk in self.chunks(spec.float_type):
            out[r:r + chunk.shape[0]] = chunk
            r += chunk.shape[0]
        return out

    def chunks(self, float_type: FloatType) -> Iterator[np.ndarray]:
        """The tensor's rows in `float_type` storage, a few MiB at a time (views of the file when
        it holds them in that type)."""
        ggml_type = self.source.info.ggml_type
        rows, cols = self.spec.shape
        step = max(1, CHUNK_VALUES // cols)
        for r in range(0, rows, step):
            if DIRECT.get(ggml_type) == float_type:
                yield self.stored[r:r + step].view(float_type.storage_dtype)
            else:
                yield encode_rows(dequantize_rows(self.stored[r:r + step], ggml_type, cols), float_type)


class GGUFModel:
    """A GGUF file opened read-only and memory-mapped, as a model (see the module docstring).
    `weight_type` ("q40" or "q80") is what requantized matrices become (default: by their bits);
    `log` hears one line per kind of conversion."""

    def __init__(self, path: str | os.PathLike[str], weight_type: str | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.log = log or (lambda message: None)
        with open(self.path, "rb") as file:
            self.file_size = os.fstat(file.fileno()).st_size
            if self.file_size == 0:
                raise GGUFError(f"{self.path}: the file is empty")
            self.mapping: mmap.mmap | None = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self.header = parse_header(self.mapping, self.path)
            self.metadata = self.header.metadata
            self._build(weight_type)
        except ConfigError as error:
            self.close()
            raise GGUFError(f"{self.path}: {error}") from None
        except BaseException:
            self.close()
            raise

    # ---- metadata ------------------------------------------------------------------------------
    def _meta(self, key: str, kind: type | tuple[type, ...], default: object = None) -> object:
        value = self.metadata.get(key, default)
        if value is None:
            raise GGUFError(f"{self.path}: no {key} in the metadata")
        if not isinstance(value, kind) or isinstance(value, bool):
            what = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise GGUFError(f"{self.path}: {key} is {str(value)[:40]!r}, expected {what}")
        return value

    def _int(self, key: str, default: int | None = None) -> int:
        value = self._meta(key, int, default)
        if not 0 < value < 1 << 31:
            raise GGUFError(f"{self.path}: {key} {value} is out of range")
        return value

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.header.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: no tensor {name}") from None

    def _build(self, weight_type: str | None) -> None:
        arch_name = self._meta("general.architecture", str)
        if arch_name not in ARCHS:
            raise GGUFError(f"{self.path}: architecture {arch_name!r} is not supported "
                            f"(supported: {', '.join(ARCHS)})")
        a, arch = arch_name, ARCHS[arch_name]
        embd = self._info("token_embd.weight")
        if len(embd.dims) != 2:
            raise GGUFError(f"{self.path}: token_embd.weight has dimensions {list(embd.dims)}, expected 2")
        dim, vocab = embd.dims
        n_heads = self._int(f"{a}.attention.head_count")
        head_dim = self._int(f"{a}.attention.key_length", dim // n_heads if dim % n_heads == 0 else None)
        if self._int(f"{a}.attention.value_length", head_dim) != head_dim:
            raise GGUFError(f"{self.path}: value heads of another length than key heads are not supported")
        if self._int(f"{a}.rope.dimension_count", head_dim) != head_dim:
            raise GGUFError(f"{self.path}: rotary embedding over part of a head is not supported")
        scaling = self.metadata.get(f"{a}.rope.scaling.type", "none")
        if scaling not in ("none", None):
            raise GGUFError(f"{self.path}: rope scaling {scaling!r} is not supported")
        theta = float(self._meta(f"{a}.rope.freq_base", (int, float), 10000.0))
        if theta != round(theta) or theta < 1:
            raise GGUFError(f"{self.path}: rope.freq_base {theta} is not a whole number")
        eps = float(self._meta(f"{a}.attention.layer_norm_rms_epsilon", (int, float)))
        eps_code = next((e for e in (1e-5, 1e-6) if abs(eps - e) <= 1e-3 * e), None)
        if eps_code is None:
            raise GGUFError(f"{self.path}: RMS norm epsilon {eps:g} is not supported (1e-5 or 1e-6)")
        n_experts = self._int(f"{a}.expert_count") if arch == ArchType.QWEN3_MOE else 0
        fields = dict(
            arch=arch, dim=dim, hidden_dim=self._int(f"{a}.feed_forward_length", None if not n_experts else 1),
            n_layers=self._int(f"{a}.block_count"), n_heads=n_heads,
            n_kv_heads=self._int(f"{a}.attention.head_count_kv", n_heads), vocab_size=vocab,
            max_seq_len=self._int(f"{a}.context_length"), weight_float_type=FloatType.F32,
            rope_theta=int(theta), head_dim=head_dim, norm_epsilon=eps_code)
        if n_experts:
            fields.update(n_experts=n_experts, n_active_experts=self._int(f"{a}.expert_used_count"),
                          moe_hidden_dim=self._int(f"{a}.expert_feed_forward_length"))
        if "rope_freqs.weight" in self.header.tensors:
            fields.update(self._llama3_rope(head_dim, theta))
        base = ModelConfig(**fields)
        sources = self._sources(base)
        types, notes = self._choose_types(base, sources, weight_type)
        counts: dict[FloatType, int] = {}
        for name, t in types.items():
            counts[t] = counts.get(t, 0) + 1
        main = max(counts, key=lambda t: counts[t]) if counts else FloatType.F32  # the most common type
        self.config = ModelConfig(**fields | dict(weight_float_type=main, tensor_types=tuple(
            (name, t) for name, t in types.items() if t != main)))
        for note in notes:
            self.log(note)
        self.tensors = {spec.name: GGUFTensor(spec, self, sources[spec.name]) for spec in tensor_specs(self.config)}
        self._embedding = sources["embedding"].info
        if vocab != len(self.metadata.get("tokenizer.ggml.tokens", [None] * vocab)):
            self.log(f"note: {self.path.name} has {vocab} embedding rows and "
                     f"{len(self.metadata['tokenizer.ggml.tokens'])} tokens")  # type: ignore[arg-type]

    def _llama3_rope(self, head_dim: int, theta: float) -> dict[str, int]:
        """Llama 3.1+ frequency scaling: the file holds the per-frequency divisors; find the
        factor (their largest) and check they follow Llama 3's rule with its usual constants."""
        from dllama_py.model import kernels

        info = self._info("rope_freqs.weight")
        if info.ggml_type != F32 or info.dims != (head_dim // 2,):
            raise GGUFError(f"{self.path}: rope_freqs.weight is not {head_dim // 2} f32 values")
        divisors = np.frombuffer(self.mapping, np.float32, head_dim // 2, info.offset).astype(np.float64)
        factor = float(divisors.max())
        low, high, orig = LLAMA3_ROPE
        if factor != round(factor):
            raise GGUFError(f"{self.path}: rope_freqs.weight does not follow Llama 3's rope scaling")
        plain = kernels.rope_frequencies(head_dim, theta)
        scaled = kernels.rope_frequencies(head_dim, theta, factor, float(low), float(high), orig)
        if not np.allclose(plain / divisors, scaled, rtol=1e-4):
            raise GGUFError(f"{self.path}: rope_freqs.weight does not follow Llama 3's rope scaling "
                            f"(factor {factor:g}, low {low}, high {high}, original context {orig})")
        return dict(rope_scaling_factor=int(factor), rope_scaling_low_freq_factor=low,
                    rope_scaling_high_freq_factor=high, rope_scaling_orig_max_seq_len=orig)

    def _sources(self, config: ModelConfig) -> dict[str, Source]:
        """The file tensor behind each of this project's tensors, its dimensions checked."""
        out: dict[str, Source] = {}
        for spec in tensor_specs(config):
            role, name = spec.role, spec.name
            parts = name.split(".")
            layer = int(parts[1]) if parts[0] == "layers" else None
            expert = int(parts[3]) if len(parts) > 3 and parts[2] == "experts" else None
            if role is Role.EMBEDDING:
                file_name = "token_embd.weight"
            elif role is Role.CLASSIFIER:
                file_name = "output.weight" if "output.weight" in self.header.tensors else "token_embd.weight"
            elif role is Role.FINAL_NORM:
                file_name = "output_norm.weight"
            elif expert is not None:
                file_name = f"blk.{layer}.{EXPERT_NAMES[role]}.weight"
            else:
                file_name = f"blk.{layer}.{GGUF_NAMES[role]}.weight"
            info = self._info(file_name)
            rows, cols = spec.shape
            want = (cols,) if rows == 1 else (cols, rows) if expert is None else (cols, rows, config.n_experts)
            if info.dims != want:
                raise GGUFError(f"{self.path}: tensor {file_name} has dimensions {list(info.dims)}, the metadata "
                                f"implies {list(want)}")
            if info.type_name in NOT_WEIGHTS or not readable(info.ggml_type):
                raise GGUFError(f"{self.path}: tensor {file_name} has type {info.type_name}, which this engine "
                                "cannot read (supported: F32, F16, BF16, Q4_0..Q8_0, the K-quants, IQ types)")
            out[name] = Source(info, expert)
        return out

    def _choose_types(self, config: ModelConfig, sources: dict[str, Source],
                      weight_type: str | None) -> tuple[dict[str, FloatType], list[str]]:
        """The type every matrix is held in (norms, router and embedding are f32 specs), and a line
        for each kind of conversion."""
        if weight_type is not None and weight_type not in ("q40", "q80"):
            raise GGUFError(f"--weight-type must be q40 or q80, got {weight_type!r}")
        matrices = {s.name: sources[s.name].info for s in tensor_specs(config)
                    if s.float_type == FloatType.F32 and s.role not in
                    (Role.EMBEDDING, Role.ROUTER, Role.Q_NORM, Role.K_NORM, Role.ATTENTION_NORM, Role.FFN_NORM,
                     Role.FINAL_NORM)}
        quantized = any(info.ggml_type not in FLOAT_TYPES for info in matrices.values())
        types: dict[str, FloatType] = {}
        converted: dict[tuple[str, str], int] = {}
        for name, info in matrices.items():
            t = info.type_name
            if quantized and info.ggml_type in (Q4_0, Q8_0):
                target = DIRECT[info.ggml_type]
            elif not quantized:
                target = FloatType.F32 if info.ggml_type == BF16 else DIRECT[info.ggml_type]
            elif info.ggml_type in FLOAT_TYPES:
                target = FloatType.Q80
            elif weight_type is not None:
                target = FloatType.from_label(weight_type)
            else:
                target = FloatType.Q80 if t in HIGH_PRECISION else FloatType.Q40
            if DIRECT.get(info.ggml_type) != target:
                converted[(t, target.label)] = converted.get((t, target.label), 0) + 1
            types[name] = target
        notes = [f"requantizing {n} {t} matri{'x' if n == 1 else 'ces'} of {self.path.name} to {label} while loading"
                 + (" (numpy: slow)" if t not in ("Q4_K", "Q5_K", "Q6_K", "F16", "F32", "BF16") else "")
                 for (t, label), n in sorted(converted.items())]
        return types, notes

    # ---- the ModelFile interface ----------------------------------------------------------------
    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.tensors[name].data
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def __iter__(self) -> Iterator[GGUFTensor]:
        return iter(self.tensors.values())

    def embed(self, ids: Sequence[int] | np.ndarray, out: np.ndarray) -> None:
        """out[i] = the embedding of ids[i] (rows dequantized from the file as needed)."""
        info = self._embedding
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= info.dims[1]):
            raise ValueError(f"token id outside the vocabulary of {info.dims[1]}")
        table = np.frombuffer(self.mapping, np.uint8, info.nbytes, info.offset).reshape(info.dims[1], -1)
        out[: len(ids)] = dequantize_rows(table[ids], info.ggml_type, info.dims[0])

    def release(self, name: str | None = None) -> None:
        """Let go of the resident pages of tensor `name` (of every tensor when None)."""
        if self.mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        if name is None:
            start, end = 0, self.file_size
        else:
            tensor = self.tensors[name]
            start, end = tensor.offset, tensor.offset + tensor.stored.nbytes
        start -= start % mmap.PAGESIZE
        if end > start:
            self.mapping.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        self.tensors = {}
        if self.mapping is not None:
            try:
                self.mapping.close()
            except BufferError:  # views still exported: the mapping goes when they do
                pass
            self.mapping = None

    def __enter__(self) -> GGUFModel:  # noqa: PYI034 (typing.Self needs 3.11)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def read_metadata(path: str | os.PathLike[str]) -> dict[str, object]:
    """The metadata of a GGUF file (its header only; GGUFError when malformed)."""
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size == 0:
            raise GGUFError(f"{path}: the file is empty")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return parse_header(data, Path(path)).metadata


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether the file starts with GGUF's magic."""
    with open(path, "rb") as file:
        return file.read(4) == MAGIC
