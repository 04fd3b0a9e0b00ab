"""The wire protocol between a root and its workers: one versioned message set.

Every message is framed: u32 little-endian payload length, then the payload. A payload starts
with the magic b"DLPY", a u16 protocol version and a u8 message type. Setup messages travel
over plain sockets before the mesh exists; session messages travel through the C++ Mesh.

Setup (root R, worker W, then worker i -> worker j for every i < j):
    W -> R  HELLO_WORKER  nonce_w
    R -> W  HELLO_ROOT    nonce_r, HMAC(secret, "root" | nonce_w)
    W -> R  WELCOME       status, HMAC(secret, "worker" | nonce_r), matmul speed, available RAM
    R -> W  SETUP         JSON: node index, addresses, model header, buffer type, context
    i -> j  MESH_HELLO    session id, i, HMAC(secret, "mesh" | session | i)
    W -> R  READY (flags: HAS_WEIGHTS when its slice cache holds this model's slices) | ERROR
then the root ships each worker without them its weight slices, one message per tensor; each
worker sends LOADING every second while it reads or prepares them (so that a frozen worker is
noticed within the usual timeout) and LOADED once they are in place; then the root drives steps:
    R -> W  STEP  (flags, mode, batch, position, temperature, vocab limit, x)
    W -> R  its part of the logits as the mode asks (cluster/logits.py), by gather
    R -> W  LOGITS (the whole slice of the last step, when top tokens were not enough)
    R -> W  END
With no secret the HMACs are of the empty key: the handshake still checks magic and version.
The traffic is authenticated, not encrypted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

MAGIC = b"DLPY"
VERSION = 2  # 2: SETUP names the model, READY says whether the worker has its slices, LOADED
HEADER = struct.Struct("<4sHB")  # magic, version, type
MAX_SETUP_BYTES = 1 << 20  # a handshake or setup message never needs more
NONCE_BYTES = 16
STEP = struct.Struct("<BBHIfI")  # flags, logits mode, batch rows, first position, temperature, vocab limit
STEP_ALL_LOGITS = 1  # flag: keep the logits of every row, not only the last
# At the end of WELCOME: the worker's matmul speed (kernels.measure_matmul_speed, GB/s) and the
# RAM it has available (bytes; 0 if unknown), which --shares auto plans with.
SPEED = struct.Struct("<fQ")


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


READY_HAS_WEIGHTS = 1  # READY flag: the worker read its slices from its cache; ship nothing


class Welcome(IntEnum):
    OK = 0
    AUTH_FAILED = 1
    BUSY = 2


class LogitsMode(IntEnum):
    """What a worker sends back after a step."""

    NONE = 0  # nothing (a prompt batch whose logits nobody needs)
    ARGMAX = 1  # (max value f32, index i32) of its classifier slice for the last row
    FULL = 2  # its whole classifier slice, f32, for the rows the step asked for
    TOPK = 3  # its most likely tokens and softmax normaliser (see cluster/logits.py)


def pack(kind: MsgType, body: bytes = b"") -> bytes:
    """A payload: header + body (framing is added by the transport)."""
    return HEADER.pack(MAGIC, VERSION, int(kind)) + body


def unpack(payload: bytes, expected: MsgType | tuple[MsgType, ...] | None = None) -> tuple[MsgType, bytes]:
    """Check magic, version and type; returns (type, body). Raises ProtocolError otherwise."""
    if len(payload) < HEADER.size:
        raise ProtocolError(f"message of {len(payload)} bytes is too short to be ours")
    magic, version, kind = HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise ProtocolError(f"wrong magic {magic!r} (not a dllama-py peer)")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, this node speaks {VERSION} (update dllama-py)")
    try:
        kind = MsgType(kind)
    except ValueError:
        raise ProtocolError(f"unknown message type {kind}") from None
    if expected is not None:
        allowed = expected if isinstance(expected, tuple) else (expected,)
        if kind not in allowed:
            raise ProtocolError(f"expected {'/'.join(a.name for a in allowed)}, got {kind.name}")
    return kind, payload[HEADER.size:]


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


# ---- setup ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    """What a worker learns from the root before loading anything."""

    session: str  # hex id of this root session
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

    def encode(self) -> bytes:
        return json.dumps(self.__dict__).encode("utf-8")

    @staticmethod
    def decode(body: bytes) -> Setup:
        try:
            data: dict[str, Any] = json.loads(body.decode("utf-8"))
            data["header"] = [tuple(item) for item in data["header"]]
            return Setup(**data)
        except (ValueError, TypeError, KeyError) as error:
            raise ProtocolError(f"malformed setup message: {error}") from None


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
