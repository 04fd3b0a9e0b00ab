"""Typed stubs for the private C++ extension `dllama_py._core` (built from csrc/).

Naming follows distributed-llama's grammar: `matmul_<input>_<weight>_<output>`.
Arrays are numpy, C-contiguous; outputs are written in place into preallocated arrays.
Every function releases the GIL for its whole run.
"""

import numpy as np
import numpy.typing as npt
from typing_extensions import Self

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
def repack_q40x16(w: U8) -> U8: ...  # Q40 (rows, cols/32*18) -> (ceil(rows/16), cols/32*288), 16 rows per group
def matmul_q80_q40x16_f32(x: U8, w: U8, y: F32) -> None: ...  # y (B, rows); w from repack_q40x16
def q40x16_fast() -> bool: ...  # the active SIMD path has a fast Q40x16 kernel
def matmul_q80_many(x: U8, ws: list[U8], ys: list[F32], q80_weights: bool) -> None: ...  # one input, several W

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
) -> None: ...  # q/out (B, n_heads*head_dim), k_cache (n_kv_heads, head_dim, seq_len), v_cache (seq_len, kv_dim)
def moe_gate(logits: F32, k: int, normalize: bool = True) -> tuple[I32, F32]: ...
def stream_read(data: U8) -> int: ...  # bandwidth probe

# ---- network: the per-token sync layer (csrc/net/net.hpp) -------------------------------
# Python connects and handshakes with `socket`, then hands the sockets over (sock.detach()).
# Buffers are any C-contiguous, writable numpy array, used in place as raw bytes (no copies).

class NetError(ConnectionError):
    """A network operation failed; the message names the operation, its label, the peer and the cause."""

    peer: int | None  # the node index the failure concerns, None when it concerns no single peer
    peer_name: str  # e.g. "10.0.0.2:9998", "" when peer is None
    label: str  # the label passed to the failed call

class Mesh:
    """A full mesh of connected stream sockets and the collective operations over it.

    Owns `fds` from the call on: closes them on close(), on destruction, on any failure, and
    when the constructor itself raises ValueError. fds[node_index] must be -1.
    Every operation waits at most timeout_ms for each peer without progress from that peer,
    then raises NetError. Any NetError closes every connection (peers learn of it at once)
    and leaves the Mesh unusable: later calls raise NetError. Argument errors (ValueError,
    TypeError) leave it usable. One operation runs at a time; close() may be called from
    another thread and wakes an operation that is waiting. Ctrl-C aborts a waiting operation
    in the main thread (KeyboardInterrupt; the Mesh is then unusable).
    """

    def __init__(
        self, node_index: int, n_nodes: int, fds: list[int], peer_names: list[str], timeout_ms: int
    ) -> None: ...
    @property
    def node_index(self) -> int: ...
    @property
    def n_nodes(self) -> int: ...
    @property
    def timeout_ms(self) -> int: ...
    @timeout_ms.setter
    def timeout_ms(self, value: int) -> None: ...  # for the operations that start afterwards
    @property
    def closed(self) -> bool: ...  # closed, or failed
    @property
    def bytes_sent(self) -> int: ...  # on the wire since creation or reset, message headers included
    @property
    def bytes_received(self) -> int: ...
    def reset_counters(self) -> None: ...
    def all_gather(self, buf: np.ndarray, slice_bytes: int, label: str = "") -> None: ...
    # buf: n_nodes * slice_bytes bytes; slice node_index is sent, every peer's slice lands in place
    def all_gather_v(
        self, buf: np.ndarray, offsets: list[int], sizes: list[int], label: str = ""
    ) -> None: ...
    # slice i is buf's bytes [offsets[i], offsets[i] + sizes[i]); slices may be unequal or empty
    def broadcast(self, root: int, buf: np.ndarray, label: str = "") -> None: ...
    # root sends all of buf's bytes; every other node receives them into buf (same size)
    def gather(
        self, root: int, buf: np.ndarray, offsets: list[int], sizes: list[int], label: str = ""
    ) -> None: ...
    # every non-root sends its slice to root; root receives every slice in place
    def send_message(
        self, peer: int, data: bytes | bytearray | memoryview | np.ndarray, label: str = ""
    ) -> None: ...
    # framed: u32 little-endian length, then the payload (any contiguous buffer)
    def broadcast_message(self, data: bytes | bytearray | memoryview | np.ndarray, label: str = "") -> None: ...
    # root (node 0) only, ValueError elsewhere: one framed message to every peer, all progressing at
    # once; each peer reads it with recv_message(0, ...) or recv_message_into(0, ...)
    def recv_message(self, peer: int, max_bytes: int, label: str = "") -> bytes: ...
    # a length above max_bytes is refused (NetError) before anything is allocated
    def recv_message_into(self, peer: int, buf: np.ndarray, label: str = "") -> int: ...
    # receives into buf's bytes (refused above buf.nbytes); returns the message length
    def wait_readable(self, peer: int, timeout_ms: int | None = None, label: str = "") -> bool: ...
    # waits (None: forever) until peer has bytes to read or closed; False on timeout, which is
    # not a failure: an idle worker waits for its next command this way. Consumes nothing.
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...
