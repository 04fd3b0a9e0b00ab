"""Typed stubs for the private C++ extension `dllama_py._core` (built from csrc/).

Naming follows distributed-llama's grammar: `matmul_<input>_<weight>_<output>`.
Arrays are numpy, C-contiguous; outputs are written in place into preallocated arrays.
Every function releases the GIL for its whole run.
"""

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]
U16 = npt.NDArray[np.uint16]
I32 = npt.NDArray[np.int32]

Q40_BLOCK_SIZE: int  # 32 values per block
Q40_BLOCK_BYTES: int  # 18 bytes: fp16 scale + 16 bytes of nibbles
Q80_BLOCK_SIZE: int  # 32
Q80_BLOCK_BYTES: int  # 34 bytes: fp16 scale + 32 int8

# ---- CPU features, SIMD path, threads -------------------------------------------------
def compiled_isas() -> list[str]: ...  # paths compiled into this build, e.g. ["scalar", "avx2", ...]
def supported_isas() -> list[str]: ...  # compiled paths this CPU can run
def best_isa() -> str: ...  # the path chosen automatically
def get_isa() -> str: ...  # the path in use now
def set_isa(name: str) -> None: ...  # force a path ("scalar", "avx2", "avx512", "avx512vnni", "neon"); env DLLAMA_ISA
def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...  # resize the persistent thread pool
def hardware_threads() -> int: ...

# ---- quantization (byte-compatible with distributed-llama) ----------------------------
def quantize_q40(x: F32) -> U8: ...  # (..., n) f32, n % 32 == 0 -> (..., n/32*18) u8
def dequantize_q40(q: U8) -> F32: ...  # (..., nb*18) -> (..., nb*32)
def quantize_q80(x: F32) -> U8: ...  # (..., n) -> (..., n/32*34)
def dequantize_q80(q: U8) -> F32: ...
def quantize_q80_into(x: F32, out: U8) -> None: ...  # activation cast, no allocation
def f32_to_f16(x: F32) -> U16: ...
def f16_to_f32(h: U16) -> F32: ...

# ---- matmul y[b, r] = sum_c W[r, c] * x[b, c] ------------------------------------------
def matmul_f32_f32_f32(x: F32, w: F32, y: F32) -> None: ...  # x (B, cols), w (rows, cols), y (B, rows)
def matmul_f32_f16_f32(x: F32, w: U16, y: F32) -> None: ...  # w (rows, cols) fp16 bits
def matmul_q80_q40_f32(x: U8, w: U8, y: F32) -> None: ...  # x (B, cols/32*34), w (rows, cols/32*18)
def matmul_q80_q80_f32(x: U8, w: U8, y: F32) -> None: ...  # x (B, cols/32*34), w (rows, cols/32*34)

# ---- forward-pass ops (in place where the output is the input) ---------------------------
def rms_norm(x: F32, w: F32, out: F32, eps: float) -> None: ...  # over the last dim; out may be x
def silu(x: F32) -> None: ...
def gelu(x: F32) -> None: ...  # exact (erf)
def mul(x: F32, y: F32) -> None: ...  # x *= y
def add(x: F32, y: F32) -> None: ...  # x += y
def add_q80(x: F32, q: U8) -> None: ...  # x += dequantize_q80(q), q holds x.size values
def softmax(x: F32) -> None: ...  # over the last dim
def embedding(table: F32, ids: I32, out: F32) -> None: ...  # table (vocab, dim), out (B, dim)
def rope_frequencies(
    head_dim: int,
    theta: float,
    scaling_factor: float = 1.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_seq_len: int = 8192,
) -> F32: ...  # (head_dim/2,)
def rope(x: F32, positions: I32, inv_freq: F32, n_heads: int, head_dim: int, style: str) -> None: ...
def attention(
    q: F32, k_cache: F32, v_cache: F32, positions: I32, out: F32, n_heads: int, n_kv_heads: int, head_dim: int
) -> None: ...  # q/out (B, n_heads*head_dim), caches (seq_len, n_kv_heads*head_dim)
def moe_gate(logits: F32, k: int, normalize: bool = True) -> tuple[I32, F32]: ...
def stream_read(data: U8) -> int: ...  # bandwidth probe
