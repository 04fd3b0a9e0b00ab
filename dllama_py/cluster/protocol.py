"""The wire protocol between a root and its workers: one versioned message set.

Every message is framed: u32 little-endian payload length, then the payload. A payload starts
with the magic b"DLPY", a u16 protocol version and a u8 message type, then the message's body.
Each message is a frozen dataclass below: `msg.encode()` gives its whole payload, and
`read(payload, *expected)` checks magic, version and type and gives back the message, refusing
anything malformed (a wrong length, a value of the wrong type or out of range) with a
ProtocolError that says what is wrong. Setup messages travel over plain sockets before the mesh
exists; session messages travel through the C++ Mesh.

Setup (root R, worker W, then worker i -> worker j for every i < j):
    W -> R  HelloWorker(nonce)         nonce_w (16 bytes)
    R -> W  HelloRoot(nonce, proof)    nonce_r, HMAC(secret, "root" | nonce_w)
    W -> R  Welcome(status, proof, speed_gbps, memory)
                                       u8 WelcomeStatus, HMAC(secret, "worker" | nonce_r), f32 matmul
                                       speed (GB/s), u64 available RAM (bytes, 0: unknown); a refusal
                                       (AUTH_FAILED, BUSY) carries zeros
    R -> W  Setup(...)                 JSON: session, node index, addresses, model header, buffer
                                       type, context, batch, KV storage, timeout, model id, shares
    i -> j  MeshHello(session, node, proof)
                                       session id, u32 i, HMAC(secret, "mesh" | session | i)
    W -> R  Ready(has_weights)         u8 flags: 1 when its slice cache holds this model's slices
          | Error(reason)              utf-8, at most 4000 bytes
then the root ships each worker without them its weight slices, one raw message per tensor; each
worker sends Loading() every second while it reads or prepares them (so that a frozen worker is
noticed within the usual timeout) and Loaded() once they are in place; then the root drives steps:
    R -> W  Step(mode, all_logits, position, temperature, vocab_limit, x)
                                       "<BBHIfI": flags (bit 0: all logits), LogitsMode, rows, first
                                       position, temperature, vocab limit; then x, rows x dim f32
    W -> R  its part of the logits as the mode asks (engine/exchange.py), by gather
    R -> W  SendLogits()               send the whole logits slice of the last step (when top
                                       tokens were not enough)
    R -> W  End()
With no secret the HMACs are of the empty key: the handshake still checks magic and version.
The traffic is authenticated, not encrypted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import operator
import os
import socket
import string
import struct
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Any, Callable, ClassVar, TypeVar, overload

import numpy as np

from dllama_py.engine.exchange import LogitsMode, Readout, Segment  # Step carries them

MAGIC = b"DLPY"
# 4: SETUP has per-matrix types (GGUF) and the sync algorithm, COPY;
# 3: SETUP has KV slots, a STEP carries segments (sequences);
# 2: SETUP names the model, READY says whether the worker has its slices, LOADED
VERSION = 4
HEADER = struct.Struct("<4sHB")  # magic, version, type
MAX_SETUP_BYTES = 1 << 20  # a handshake or setup message never needs more
NONCE_BYTES = 16
PROOF_BYTES = 32  # HMAC-SHA256
MAX_ERROR_BYTES = 4000  # the longest reason an ERROR carries
STEP = struct.Struct("<H")  # segments, then each SEGMENT, then the rows
SEGMENT = struct.Struct("<HBBHIfI")  # KV slot, flags, logits mode, rows, first position, temperature, vocab limit
MAX_SEGMENTS = 1024
HELLO_ROOT = struct.Struct(f"<{NONCE_BYTES}s{PROOF_BYTES}s")  # nonce, proof
WELCOME = struct.Struct(f"<B{PROOF_BYTES}sfQ")  # status, proof, matmul speed (GB/s), available RAM (bytes)
MESH_HELLO = struct.Struct(f"<{NONCE_BYTES}sI{PROOF_BYTES}s")  # session, node index, proof
_F32 = np.dtype("<f4")

STEP_ALL_LOGITS = 1  # SEGMENT flag: keep the logits of every row, not only the last
READY_HAS_WEIGHTS = 1  # READY flag: the worker read its slices from its cache; ship nothing


class ProtocolError(ConnectionError):
    """Bytes that are not our protocol, a version mismatch or a failed authentication."""


class MsgType(IntEnum):
    HELLO_WORKER = 1
    HELLO_ROOT = 2
    WELCOME = 3
    SETUP = 4
    MESH_HELLO = 5
    READY = 6
    ERROR = 7
    STEP = 8
    END = 9
    LOGITS = 10  # send the whole logits slice of the last step
    LOADED = 11  # the worker's weights are in place (received or read from its cache)
    LOADING = 12  # heartbeat, every second while a worker reads or prepares its weights
    COPY = 13  # copy the first positions of one KV slot to another (sequences sharing a prompt)


class WelcomeStatus(IntEnum):
    OK = 0
    AUTH_FAILED = 1
    BUSY = 2


def _head(kind: MsgType) -> bytes:
    return HEADER.pack(MAGIC, VERSION, int(kind))


def _check_header(payload: bytes | memoryview) -> MsgType:
    """The type of a payload whose magic and version are ours; ProtocolError otherwise."""
    if len(payload) < HEADER.size:
        raise ProtocolError(f"message of {len(payload)} bytes is too short to be ours")
    magic, version, kind = HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise ProtocolError(f"wrong magic {magic!r} (not a dllama-py peer)")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, this node speaks {VERSION} (update dllama-py)")
    try:
        return MsgType(kind)
    except ValueError:
        raise ProtocolError(f"unknown message type {kind}") from None


# ---- framing over plain sockets (setup only) --------------------------------------------------

def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack("<I", len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 16))
        if not chunk:
            raise ProtocolError("connection closed by peer")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket, max_bytes: int = MAX_SETUP_BYTES) -> bytes:
    """One framed payload; a length above max_bytes is refused before anything is allocated."""
    (length,) = struct.unpack("<I", _recv_exact(sock, 4))
    if length > max_bytes:
        raise ProtocolError(f"peer announced a message of {length} bytes (limit {max_bytes}): not our protocol")
    return _recv_exact(sock, length)


# ---- authentication ---------------------------------------------------------------------------

def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def proof(secret: str | None, role: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 over role and parts with the shared secret (empty key without one)."""
    key = (secret or "").encode("utf-8")
    return hmac.new(key, role + b"|" + b"|".join(parts), hashlib.sha256).digest()


def proofs_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


# ---- messages ---------------------------------------------------------------------------------

Body = bytes | bytearray | memoryview


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _need_size(kind: MsgType, body: Body, size: int) -> None:
    if len(body) != size:
        raise ProtocolError(f"malformed {kind.name}: {len(body)} bytes, expected {size}")


def _need_bytes(owner: str, name: str, value: Any, size: int) -> bytes:
    """A field about to be encoded: exactly `size` bytes (a caller's mistake raises ValueError)."""
    if not isinstance(value, (bytes, bytearray)) or len(value) != size:
        raise ValueError(f"{owner}.{name} must be {size} bytes, got {_short(value)}")
    return bytes(value)


class Message:
    """A typed protocol message: a frozen dataclass whose encode() is the whole payload."""

    kind: ClassVar[MsgType]

    def encode(self) -> bytes:
        """The payload: header and body (send_frame or Mesh.send_message add the framing)."""
        return _head(self.kind) + self._body()

    def _body(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode(cls, body: Body) -> Message:
        """The message from its body (the payload after the header); ProtocolError if malformed."""
        raise NotImplementedError


@dataclass(frozen=True)
class HelloWorker(Message):
    """A worker's first words to a root that connected: its challenge."""

    kind = MsgType.HELLO_WORKER
    nonce: bytes  # NONCE_BYTES

    def _body(self) -> bytes:
        return _need_bytes("HelloWorker", "nonce", self.nonce, NONCE_BYTES)

    @classmethod
    def decode(cls, body: Body) -> HelloWorker:
        _need_size(cls.kind, body, NONCE_BYTES)
        return cls(bytes(body))


@dataclass(frozen=True)
class HelloRoot(Message):
    """The root's challenge and its answer to the worker's: proof(secret, b"root", worker nonce)."""

    kind = MsgType.HELLO_ROOT
    nonce: bytes  # NONCE_BYTES
    proof: bytes  # PROOF_BYTES

    def _body(self) -> bytes:
        return HELLO_ROOT.pack(_need_bytes("HelloRoot", "nonce", self.nonce, NONCE_BYTES),
                               _need_bytes("HelloRoot", "proof", self.proof, PROOF_BYTES))

    @classmethod
    def decode(cls, body: Body) -> HelloRoot:
        _need_size(cls.kind, body, HELLO_ROOT.size)
        return cls(*HELLO_ROOT.unpack_from(body))


@dataclass(frozen=True)
class Welcome(Message):
    """The worker's answer: OK with proof(secret, b"worker", root nonce), its matmul speed (GB/s,
    kernels.measure_matmul_speed) and available RAM (bytes; 0 if unknown), which --shares auto
    plans with; or a refusal (AUTH_FAILED, BUSY), whose other fields are zero."""

    kind = MsgType.WELCOME

    status: WelcomeStatus
    proof: bytes = bytes(PROOF_BYTES)
    speed_gbps: float = 0.0
    memory: int = 0

    def _body(self) -> bytes:
        status = WelcomeStatus(self.status)
        proof = _need_bytes("Welcome", "proof", self.proof, PROOF_BYTES)
        if status != WelcomeStatus.OK and (proof != bytes(PROOF_BYTES) or self.speed_gbps or self.memory):
            raise ValueError(f"a {status.name} Welcome carries no proof, speed or memory")
        if not (math.isfinite(self.speed_gbps) and self.speed_gbps >= 0):
            raise ValueError(f"Welcome.speed_gbps must be finite and >= 0, got {self.speed_gbps}")
        return WELCOME.pack(int(status), proof, self.speed_gbps, self.memory)

    @classmethod
    def decode(cls, body: Body) -> Welcome:
        _need_size(cls.kind, body, WELCOME.size)
        code, proof, speed, memory = WELCOME.unpack_from(body)
        try:
            status = WelcomeStatus(code)
        except ValueError:
            raise ProtocolError(f"malformed WELCOME: unknown status {code}") from None
        if not (math.isfinite(speed) and speed >= 0):
            raise ProtocolError(f"malformed WELCOME: matmul speed {speed} GB/s")
        if status != WelcomeStatus.OK and (proof != bytes(PROOF_BYTES) or speed or memory):
            raise ProtocolError(f"malformed WELCOME: a {status.name} refusal carries a proof, speed or memory")
        return cls(status, proof, speed, memory)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_session(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 2 * NONCE_BYTES and all(c in string.hexdigits for c in value)


def _is_header(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, list) and len(item) == 2 and _is_int(item[0]) and _is_int(item[1]) for item in value)


def _is_shares(value: Any) -> bool:
    return value is None or (isinstance(value, list) and all(_is_number(item) for item in value))


_SETUP_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "session": (_is_session, f"a string of {2 * NONCE_BYTES} hex digits"),
    "node_index": (_is_int, "an integer"),
    "addresses": (_is_str_list, "a list of strings"),
    "header": (_is_header, "a list of [integer, integer] pairs"),
    "buffer_type": (lambda v: isinstance(v, str), "a string"),
    "seq_len": (_is_int, "an integer"),
    "max_batch": (_is_int, "an integer"),
    "kv_storage": (lambda v: isinstance(v, str), "a string"),
    "timeout_ms": (_is_int, "an integer"),
    "model_id": (lambda v: isinstance(v, str), "a string"),
    "shares": (_is_shares, "null or a list of finite numbers"),
    "slots": (_is_int, "an integer"),
    "tensor_types": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, str)
                                                           for k, t in v.items()),
                     "an object of strings"),
    "sync": (lambda v: v in ("allgather", "reducescatter"), "'allgather' or 'reducescatter'"),
}


@dataclass(frozen=True)
class Setup(Message):
    """What a worker learns from the root before loading anything (JSON). decode checks the type
    of every field; the ranges, which need the model, are the worker's to check."""

    kind = MsgType.SETUP
    session: str  # hex id of this root session (NONCE_BYTES)
    node_index: int
    addresses: list[str]  # host:port of every node; index 0 is the root (unused)
    header: list[tuple[int, int]]  # the model's .m header items
    buffer_type: str
    seq_len: int
    max_batch: int
    kv_storage: str
    timeout_ms: int
    model_id: str  # the model's fingerprint (cluster/slice_cache.py)
    shares: list[float] | None = None  # every node's relative share of the work (plan.py); None: equal
    slots: int = 1  # KV-cache slots (sequences at once)
    tensor_types: dict[str, str] = field(default_factory=dict)  # ModelConfig.tensor_types: name -> label
    sync: str = "allgather"  # how the nodes add their partials (cluster/mesh.py)

    def _body(self) -> bytes:
        return json.dumps(self.__dict__).encode("utf-8")

    @classmethod
    def decode(cls, body: Body) -> Setup:
        try:
            data = json.loads(bytes(body).decode("utf-8"))
        except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ProtocolError(f"malformed SETUP: not UTF-8 JSON ({error})") from None
        if not isinstance(data, dict):
            raise ProtocolError(f"malformed SETUP: a JSON {type(data).__name__}, not an object")
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in data]
        if missing:
            raise ProtocolError(f"malformed SETUP: no {', '.join(missing)}")
        unknown = [name for name in data if name not in _SETUP_TYPES]
        if unknown:
            raise ProtocolError(f"malformed SETUP: unknown field {', '.join(_short(name) for name in unknown)}")
        for name in names:
            check, what = _SETUP_TYPES[name]
            if not check(data[name]):
                raise ProtocolError(f"malformed SETUP: {name} must be {what}, got {_short(data[name])}")
        data["header"] = [(key, value) for key, value in data["header"]]
        if data["shares"] is not None:
            data["shares"] = [float(share) for share in data["shares"]]
        return cls(**data)


@dataclass(frozen=True)
class MeshHello(Message):
    """Worker i's greeting to worker j > i: the session, i and proof(secret, b"mesh", session, str(i))."""

    kind = MsgType.MESH_HELLO
    session: bytes  # NONCE_BYTES
    node: int
    proof: bytes  # PROOF_BYTES

    def _body(self) -> bytes:
        return MESH_HELLO.pack(_need_bytes("MeshHello", "session", self.session, NONCE_BYTES), self.node,
                               _need_bytes("MeshHello", "proof", self.proof, PROOF_BYTES))

    @classmethod
    def decode(cls, body: Body) -> MeshHello:
        _need_size(cls.kind, body, MESH_HELLO.size)
        return cls(*MESH_HELLO.unpack_from(body))


@dataclass(frozen=True)
class Ready(Message):
    """The worker accepted the setup; has_weights: its slice cache holds them, ship nothing."""

    kind = MsgType.READY
    has_weights: bool

    def _body(self) -> bytes:
        return bytes([READY_HAS_WEIGHTS if self.has_weights else 0])

    @classmethod
    def decode(cls, body: Body) -> Ready:
        _need_size(cls.kind, body, 1)
        flags = body[0]
        if flags & ~READY_HAS_WEIGHTS:
            raise ProtocolError(f"malformed READY: unknown flags {flags:#04x}")
        return cls(bool(flags & READY_HAS_WEIGHTS))


COPY = struct.Struct("<HHI")  # source slot, destination slot, positions


@dataclass(frozen=True)
class CopySlot(Message):
    """Copy the keys and values of positions 0..length-1 of KV slot `source` to slot `target`:
    sequences with one prompt evaluate it once. The worker checks the slots and length."""

    kind = MsgType.COPY
    source: int
    target: int
    length: int

    def _body(self) -> bytes:
        return COPY.pack(self.source, self.target, self.length)

    @classmethod
    def decode(cls, body: Body) -> CopySlot:
        _need_size(cls.kind, body, COPY.size)
        return cls(*COPY.unpack_from(body))


@dataclass(frozen=True)
class Error(Message):
    """The worker refused the setup, and why (utf-8, cut to MAX_ERROR_BYTES when encoded)."""

    kind = MsgType.ERROR
    reason: str

    def _body(self) -> bytes:
        data = self.reason.encode("utf-8", "backslashreplace")
        if len(data) > MAX_ERROR_BYTES:  # cut at a character boundary
            data = data[:MAX_ERROR_BYTES].decode("utf-8", "ignore").encode("utf-8")
        return data

    @classmethod
    def decode(cls, body: Body) -> Error:
        if len(body) > MAX_ERROR_BYTES:
            raise ProtocolError(f"malformed ERROR: {len(body)} bytes, at most {MAX_ERROR_BYTES}")
        return cls(bytes(body).decode("utf-8", "replace"))


@dataclass(frozen=True, eq=False)
class Step(Message):
    """One step for every node: x (batch rows of the model width, float32), and the segments
    those rows belong to, in order: each a sequence's KV slot, first position, row count and what
    of its logits the workers send back (mode; all rows or the last; temperature and vocab_limit
    for TOPK and ARGMAX)."""

    kind = MsgType.STEP
    segments: list[Segment]
    x: np.ndarray  # (batch, dim) float32; decode gives a read-only view of the received bytes

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])

    def encode(self) -> bytes:
        """The payload, with x copied once (into the payload) when it is C-contiguous float32."""
        x = np.ascontiguousarray(self.x, dtype=_F32)
        if x.ndim != 2 or not 0 < x.shape[0] <= 0xFFFF or x.shape[1] == 0:
            raise ValueError(f"Step.x must be (batch, dim) with 1 to 65535 rows, got shape {x.shape}")
        if not 0 < len(self.segments) <= MAX_SEGMENTS or sum(seg.rows for seg in self.segments) != x.shape[0]:
            raise ValueError(f"Step.segments must be 1 to {MAX_SEGMENTS} holding the {x.shape[0]} rows of x")
        parts = [_head(self.kind), STEP.pack(len(self.segments))]
        for seg in self.segments:
            r = seg.readout
            if not (math.isfinite(r.temperature) and r.temperature > 0):
                raise ValueError(f"Step temperature must be finite and > 0, got {r.temperature}")
            parts.append(SEGMENT.pack(seg.slot, STEP_ALL_LOGITS if r.all_rows else 0, int(LogitsMode(r.mode)),
                                      seg.rows, seg.position, r.temperature, r.vocab_limit))
        parts.append(memoryview(x).cast("B"))
        return b"".join(parts)

    @classmethod
    def decode(cls, body: Body, dim: int) -> Step:  # type: ignore[override]
        """The step from its body, for a model of width dim; x is a read-only view of body."""
        dim = operator.index(dim)
        if dim <= 0:
            raise ValueError(f"model width must be positive, got {dim}")
        if len(body) < STEP.size:
            raise ProtocolError(f"malformed STEP: {len(body)} bytes, shorter than its {STEP.size}-byte header")
        (count,) = STEP.unpack_from(body)
        if not 0 < count <= MAX_SEGMENTS:
            raise ProtocolError(f"malformed STEP: {count} segments (1 to {MAX_SEGMENTS})")
        head = STEP.size + count * SEGMENT.size
        if len(body) < head:
            raise ProtocolError(f"malformed STEP: {len(body)} bytes, shorter than its {count} segments")
        segments, batch = [], 0
        for i in range(count):
            slot, flags, code, rows, position, temperature, vocab_limit = SEGMENT.unpack_from(
                body, STEP.size + i * SEGMENT.size)
            if flags & ~STEP_ALL_LOGITS:
                raise ProtocolError(f"malformed STEP: unknown flags {flags:#04x}")
            try:
                mode = LogitsMode(code)
            except ValueError:
                raise ProtocolError(f"malformed STEP: unknown logits mode {code}") from None
            if rows == 0:
                raise ProtocolError("malformed STEP: a segment without rows")
            if not (math.isfinite(temperature) and temperature > 0):
                raise ProtocolError(f"malformed STEP: temperature {temperature}")
            try:
                readout = Readout(mode, bool(flags & STEP_ALL_LOGITS), temperature, vocab_limit)
            except ValueError as error:
                raise ProtocolError(f"malformed STEP: {error}") from None
            segments.append(Segment(slot, position, rows, readout))
            batch += rows
        size = head + batch * dim * _F32.itemsize
        if len(body) != size:
            raise ProtocolError(f"malformed STEP: {len(body)} bytes, expected {size} for {batch} rows of {dim}")
        x = np.frombuffer(body, dtype=_F32, count=batch * dim, offset=head).reshape(batch, dim)
        x.flags.writeable = False
        return cls(segments, x)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Step):
            return NotImplemented
        return self.segments == other.segments and np.array_equal(self.x, other.x)

    __hash__ = None  # type: ignore[assignment]  # x is mutable


class _Empty(Message):
    """A message that is only its type."""

    def _body(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, body: Body) -> Message:
        if len(body):
            raise ProtocolError(f"malformed {cls.kind.name}: {len(body)} bytes, expected none")
        return cls()


@dataclass(frozen=True)
class End(_Empty):
    """The root ends the session; the worker waits for the next root."""

    kind = MsgType.END


@dataclass(frozen=True)
class SendLogits(_Empty):
    """Send the whole logits slice of the last step (the top tokens were not enough)."""

    kind = MsgType.LOGITS


@dataclass(frozen=True)
class Loaded(_Empty):
    """The worker's weights are in place (received or read from its cache)."""

    kind = MsgType.LOADED


@dataclass(frozen=True)
class Loading(_Empty):
    """Heartbeat, every second while a worker reads or prepares its weights."""

    kind = MsgType.LOADING


MESSAGES: dict[MsgType, type[Message]] = {cls.kind: cls for cls in (
    HelloWorker, HelloRoot, Welcome, Setup, MeshHello, Ready, Error, Step, End, SendLogits, Loaded, Loading,
    CopySlot)}
assert set(MESSAGES) == set(MsgType)

M = TypeVar("M", bound=Message)
M2 = TypeVar("M2", bound=Message)
M3 = TypeVar("M3", bound=Message)


@overload
def read(payload: Body, expected: type[M], /, *, dim: int | None = None) -> M: ...
@overload
def read(payload: Body, expected: type[M], other: type[M2], /, *, dim: int | None = None) -> M | M2: ...
@overload
def read(payload: Body, expected: type[M], other: type[M2], third: type[M3], /, *,
         dim: int | None = None) -> M | M2 | M3: ...
@overload
def read(payload: Body, *expected: type[Message], dim: int | None = None) -> Message: ...


def read(payload: Body, *expected: type[Message], dim: int | None = None) -> Message:
    """The message in a payload, after checking magic, version and type (one of `expected`; any
    with none given). A Step needs dim, the model width. Anything malformed raises ProtocolError.
    The payload is not copied: a Step's x is a read-only view of it."""
    for cls in expected:
        if MESSAGES.get(getattr(cls, "kind", None)) is not cls:  # type: ignore[arg-type]
            raise TypeError(f"read() expects message classes, got {cls!r}")
    if Step in expected and dim is None:
        raise TypeError("read() needs dim= (the model width) to decode a Step")
    view = memoryview(payload).cast("B")
    kind = _check_header(view)
    if expected and kind not in [cls.kind for cls in expected]:
        raise ProtocolError(f"expected {'/'.join(cls.kind.name for cls in expected)}, got {kind.name}")
    body = view[HEADER.size:]
    if kind == MsgType.STEP:
        if dim is None:
            raise ProtocolError("got STEP, but no model width (dim=) to decode it with")
        return Step.decode(body, dim)
    return MESSAGES[kind].decode(body)


def parse_address(text: str) -> tuple[str, int]:
    """'host:port' or '[ipv6]:port' -> (host, port); raises ValueError with the bad text."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # a bare IPv6 address: the port would be ambiguous
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"worker address {text!r} must look like HOST:PORT, e.g. 10.0.0.2:9998 "
                         "(an IPv6 address in brackets: [fd00::2]:9998)")
    return host, int(port)
