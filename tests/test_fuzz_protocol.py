"""Protocol fuzzer: generated and mutated messages sent to a live `dllama worker` over real sockets.

Every message type at every stage: as the first message (before any authentication), as the
SETUP (after a HELLO_ROOT with the right proof), as a weights message and as a step (after a
valid SETUP, through the session's mesh framing); Setup JSON with fields of wrong types, missing
or extra; wrong lengths, truncation, random bytes, valid prefixes followed by garbage, announced
lengths far bigger than what follows and then a close. Every case ends with this side shutting
its writing half and reading until the worker closes, so nothing here waits on a clock: the
worker must answer (with well-formed messages only) or close. Afterwards the worker process is
still alive, still serves a real root, logged no traceback and did not grow its memory.

DLLAMA_FUZZ_CASES sets the number of cases (default 5000, CI); DLLAMA_FUZZ_SEED replays a run
(the seed is printed on failure, with the case that failed).
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cluster_helpers import WorkerProcess, assert_serves_a_real_root

from dllama_py.cluster import protocol as p
from dllama_py.formats.model_file import read_model
from dllama_py.model.config import HeaderKey, ModelConfig
from dllama_py.model.plan import Plan, cut_tensor
from dllama_py.model.structure import Split

CASES = int(os.environ.get("DLLAMA_FUZZ_CASES", "5000"))
SEED = int(os.environ.get("DLLAMA_FUZZ_SEED", str(random.SystemRandom().randrange(1 << 32))))
PARALLEL = 6  # unauthenticated connections at once: well under the worker's 32 pending handshakes
SAFETY_S = 120.0  # only a hung worker ever reaches this: every case ends with our side closing
# How much the worker's RSS may grow over the cases (measured after a warm-up of every stage, so
# that the allocator's arenas, numpy's caches and the threads' stacks exist before it). Seen: +2
# to +3.5 MiB over 5,000 and 20,000 cases; glibc may keep freed memory of the main thread's
# arena, up to about one session's working set (~2 MiB here), and the handshake threads allocate
# a few KiB each. 32 MiB is ten times that noise, and still caught: a session that kept its
# weights (0.5 MiB x the ~110 sessions of the default run: ~55 MiB), or a case that kept
# more than ~7 KiB (32 MiB over 5,000 cases), e.g. a frame, a thread or a socket buffer each.
RSS_SLACK = 32 << 20

U32 = struct.Struct("<I")
TYPES = list(range(0, 15)) + [255]  # every message type, a few unknown ones


def frame(payload: bytes) -> bytes:
    return U32.pack(len(payload)) + payload


def head(kind: int, magic: bytes = p.MAGIC, version: int = p.VERSION) -> bytes:
    return p.HEADER.pack(magic, version, kind)


# ---- generators -----------------------------------------------------------------------------

WRONG_VALUES = [None, True, False, 0, -1, 1, 2**31, 2**64, 10**400, 1.5, -0.0, 1e308, "", "x", "127.0.0.1:1",
                "ab" * 16, [], [1], ["a"], [[1, 2]], [["a", 1]], [None], {}, {"a": 1}, [1e308, -1], [0, 0],
                [[0, 1], [1, 2, 3]], "\u0000\udfff"]


SLOTS = 3  # KV-cache slots of the fuzzer's valid sessions


@dataclass
class Ctx:
    """What the generators need: the real model's header and width, the worker's address."""

    header: list[tuple[int, int]]
    dim: int
    address: str
    closed: str  # 127.0.0.1:port where nothing listens
    worker: WorkerProcess
    parts: list[bytes] = field(default_factory=list)  # node 1's weight slices, in shipping order


def valid_setup(ctx: Ctx, rng: random.Random, **changes) -> dict:
    data = dict(session=rng.randbytes(16).hex(), node_index=1, addresses=["root", ctx.address],
                header=[list(item) for item in ctx.header], buffer_type="f32", seq_len=64, max_batch=4,
                kv_storage="ram", timeout_ms=120_000, model_id="", shares=None, slots=SLOTS,
                tensor_types={}, sync=rng.choice(["allgather", "reducescatter"]))
    data.update(changes)
    return data


def setup_json(ctx: Ctx, rng: random.Random) -> bytes:
    """A SETUP body: typed right but out of range, wrong-typed, missing, extra, or not JSON."""
    data = valid_setup(ctx, rng)
    how = rng.randrange(12)
    name = rng.choice(list(data))
    if how <= 3:  # a field of a wrong type (sometimes of the right type)
        data[name] = rng.choice(WRONG_VALUES)
    elif how == 4:
        del data[name]
    elif how == 5:
        data[rng.choice(["extra", name.upper(), "", "__class__"])] = rng.choice(WRONG_VALUES)
    elif how == 6:  # right types, values out of range
        data.update(rng.choice([
            dict(node_index=rng.choice([-1, 0, 2, 99, 2**40])), dict(seq_len=rng.choice([-5, 0, 1, 65, 513, 2**62])),
            dict(max_batch=rng.choice([-1, 0, 1025, 2**40])), dict(timeout_ms=rng.choice([-1, 0, 3_600_001])),
            dict(slots=rng.choice([-1, 0, 257, 2**40])),
            dict(buffer_type=rng.choice(["q80", "q4", "", "F32"])), dict(kv_storage=rng.choice(["disk", "", "tape"])),
            dict(shares=rng.choice([[], [1.0], [1.0, 0.0], [1, -1], [1e308, 1e308], [0.5, 0.5, 0.5]])),
            dict(addresses=rng.choice([["root"], [], ["root", ctx.address, ctx.closed], ["root", "nohost"],
                                       ["root", "127.0.0.1:99999"], ["root", "[::1]"], ["root", ctx.closed]])),
            dict(session=rng.choice(["", "zz" * 16, "ab" * 15, "ab" * 17])),
            dict(model_id=rng.choice(["x" * 200, "../../etc", "\u0000"])),
            dict(sync=rng.choice(["", "ring", "ALLGATHER"])),
            dict(tensor_types=rng.choice([{"layers.0.wq": "q4"}, {"nope": "f16"}, {"layers.0.wq": "q40"},
                                          {"embedding": "f16"}, {"layers.0.attention_norm": "f16"}])),
        ]))
    elif how == 7:  # the model header: an item changed, missing, doubled or unknown
        header = data["header"]
        i = rng.randrange(len(header))
        if rng.random() < 0.6:
            header[i] = [header[i][0], rng.choice([0, 1, -1, 2, 3, 7, 2**31 - 1, 2**31, 2**32, 2**63 - 1, -2**63,
                                                   10**30, header[i][1] + 1, header[i][1] * 2])]
        elif rng.random() < 0.5:
            del header[i]
        else:
            header.append([rng.choice([header[i][0], 99, -1, 2**40]), rng.randrange(-2, 1 << 20)])
    elif how == 8:
        return json.dumps(rng.choice([[], 1, "setup", None, [data]])).encode()
    elif how == 9:  # deep nesting where a list goes
        depth = rng.choice([50, 1000, 100_000])
        text = json.dumps(data)
        return text.replace('"addresses": [', '"addresses": ' + "[" * depth, 1).replace("]", "]" * depth, 1).encode()
    elif how == 10:  # not UTF-8, or NaN/Infinity
        text = json.dumps(data).encode()
        if rng.random() < 0.5:
            return text.replace(b'"f32"', b'"f\xff\xfe"')
        return text.replace(b'"seq_len": 64', rng.choice([b'"seq_len": NaN', b'"seq_len": Infinity', b'"seq_len": 1e999']))
    return json.dumps(data, allow_nan=True).encode()


def step_body(ctx: Ctx, rng: random.Random, valid: bool) -> bytes:
    """A STEP body; with valid, one the worker's session (max_batch 4, seq_len 64, SLOTS slots) can
    run: one to three segments in distinct slots."""
    if valid:
        slots = list(range(SLOTS))
        rng.shuffle(slots)
        total = rng.randint(1, 4)
        count = rng.randint(1, min(total, len(slots), 3))
        sizes = [1] * count
        for _ in range(total - count):
            sizes[rng.randrange(count)] += 1
        head = p.STEP.pack(count)
        for slot, rows in zip(slots, sizes):
            mode = rng.choice([0, 1, 2, 3])
            all_logits = 1 if mode == 2 and rng.random() < 0.5 else 0
            position = rng.randint(0, 64 - rows)
            head += p.SEGMENT.pack(slot, all_logits, mode, rows, position, rng.choice([0.1, 1.0, 7.5]),
                                   rng.choice([0, 1, 100, 512]))
        return head + np.asarray(np.random.default_rng(rng.randrange(1 << 32)).standard_normal((total, ctx.dim)),
                                 dtype="<f4").tobytes()
    count = rng.choice([0, 1, 1, 2, 3, 1025, 65535])
    head = p.STEP.pack(count)
    rows_total = 0
    for _ in range(min(count, 3)):
        flags = rng.choice([0, 1, 2, 255])
        mode = rng.choice([0, 1, 2, 3, 4, 255])
        rows = rng.choice([0, 1, 4, 5, 1024, 65535])
        slot = rng.choice([0, 0, 1, SLOTS, 65535])
        position = rng.choice([0, 63, 64, 2**31 - 1, 2**31, 2**32 - 1])
        temperature = rng.choice([1.0, 0.0, -1.0, float("nan"), float("inf"), 1e-45])
        vocab = rng.choice([0, 512, 513, 2**32 - 1])
        head += p.SEGMENT.pack(slot, flags, mode, rows, position, temperature, vocab)
        rows_total += rows
    x_rows = rng.choice([rows_total, max(rows_total - 1, 0), rows_total + 1, 0])
    return head + rng.randbytes(min(x_rows, 8) * ctx.dim * 4 + rng.choice([0, 0, 1, 3]))


def message(ctx: Ctx, rng: random.Random, kind: int | None = None) -> bytes:
    """A payload of any message type (or an unknown one), shaped like that type or not."""
    if kind is None:
        kind = rng.choice(TYPES)
    if kind == p.MsgType.SETUP and rng.random() < 0.8:
        body = setup_json(ctx, rng)
    elif kind == p.MsgType.STEP and rng.random() < 0.8:
        body = step_body(ctx, rng, valid=rng.random() < 0.3)
    elif kind == p.MsgType.HELLO_WORKER:
        body = rng.randbytes(rng.choice([p.NONCE_BYTES, p.NONCE_BYTES, 0, 15, 17]))
    elif kind == p.MsgType.HELLO_ROOT:
        body = rng.randbytes(rng.choice([p.HELLO_ROOT.size, p.HELLO_ROOT.size, 0, 47, 49]))
    elif kind == p.MsgType.WELCOME:
        body = p.WELCOME.pack(rng.choice([0, 1, 2, 3, 255]), rng.randbytes(32),
                              rng.choice([0.0, 1.0, float("nan"), -1.0]), rng.randrange(1 << 64))
    elif kind == p.MsgType.MESH_HELLO:
        body = p.MESH_HELLO.pack(rng.randbytes(16), rng.randrange(1 << 32), rng.randbytes(32))
    elif kind == p.MsgType.READY:
        body = bytes([rng.choice([0, 1, 2, 255])]) * rng.choice([1, 1, 0, 2])
    elif kind == p.MsgType.ERROR:
        body = rng.choice([b"", b"reason", b"\xff\xfe", b"x" * 4001])
    else:  # END, LOGITS, LOADED, LOADING, unknown: empty, or not
        body = rng.choice([b"", b"", b"\x00", rng.randbytes(rng.randrange(64))])
    magic, version = p.MAGIC, p.VERSION
    if rng.random() < 0.1:
        magic, version = rng.choice([(b"DLPZ", p.VERSION), (b"\x00" * 4, p.VERSION), (p.MAGIC, 1), (p.MAGIC, 3),
                                     (p.MAGIC, 0xFFFF)])
    return head(kind, magic, version) + body


def mutate(rng: random.Random, payload: bytes) -> bytes:
    """The bytes to put on the wire for `payload`: framed as is, or broken in one of many ways."""
    how = rng.randrange(14)
    if how <= 3:
        return frame(payload)
    if how == 4:  # truncated: the frame says so
        return frame(payload[:rng.randrange(len(payload) + 1)])
    if how == 5:  # truncated: the frame does not (the worker waits for the rest, then we close)
        return U32.pack(len(payload)) + payload[:rng.randrange(len(payload) + 1)]
    if how == 6:  # a length shorter than the payload: the rest reads as the next frame
        return U32.pack(rng.randrange(len(payload) + 1)) + payload
    if how == 7:  # a length far bigger than what follows, then a close
        return U32.pack(rng.choice([len(payload) + 1, 1 << 20, (1 << 20) + 1, 1 << 30, 2**32 - 1])) + payload
    if how == 8:  # a valid prefix followed by garbage, inside the frame
        return frame(payload + rng.randbytes(rng.randint(1, 64)))
    if how == 9:  # a valid frame followed by garbage
        return frame(payload) + rng.randbytes(rng.randint(1, 64))
    if how == 10:  # bytes flipped
        data = bytearray(payload)
        for _ in range(rng.randint(1, 4)):
            if data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return frame(bytes(data))
    if how == 11:  # random bytes, framed
        return frame(rng.randbytes(rng.randrange(200)))
    if how == 12:  # random bytes, unframed
        return rng.randbytes(rng.randrange(1, 200))
    return rng.choice([b"", b"\x00", b"\x01\x00", b"\xff\xff\xff"])  # nothing, or part of a length


# ---- the wire --------------------------------------------------------------------------------

def connect(ctx: Ctx) -> socket.socket:
    sock = socket.create_connection(p.parse_address(ctx.address), timeout=SAFETY_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def send(sock: socket.socket, data: bytes) -> bool:
    """False when the worker has already closed (it may refuse before reading everything)."""
    try:
        sock.sendall(data)
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False


def finish(sock: socket.socket) -> bytes:
    """Shut our writing half and read until the worker closes; what it sent."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    chunks = []
    try:
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the worker neither answered nor closed within {SAFETY_S:g} s") from None
    finally:
        sock.close()
    return b"".join(chunks)


def frames(data: bytes) -> list[bytes]:
    out, at = [], 0
    while at < len(data):
        assert at + 4 <= len(data), f"the worker sent a partial length: {data[at:]!r}"
        (n,) = U32.unpack_from(data, at)
        assert at + 4 + n <= len(data), f"the worker sent a partial frame of {n} bytes"
        out.append(data[at + 4:at + 4 + n])
        at += 4 + n
    return out


def recv_frame(sock: socket.socket) -> bytes:
    try:
        return p.recv_frame(sock)
    except TimeoutError:
        raise AssertionError(f"the worker did not answer within {SAFETY_S:g} s") from None


def sessions_over(worker: WorkerProcess) -> bool:
    """Every session the worker started has ended (it logs that after its BusyResponder stopped)."""
    log = "\n".join(list(worker.lines))  # counted as substrings: concurrent log lines may run together
    return log.count(" connected: node ") == log.count("session with root ") + log.count(" finished; waiting")


def wait_free(worker: WorkerProcess) -> None:
    """Wait until the last session is over. A root sees the connection drop as soon as the mesh
    fails, a moment before the worker stops answering BUSY; waiting for its log line keeps a
    fuzz case from landing in that moment (it would be told BUSY)."""
    deadline = time.monotonic() + SAFETY_S  # only reached when the worker hangs
    while not sessions_over(worker):
        assert time.monotonic() < deadline, f"the worker's session never ended: {worker.lines[-10:]}"
        time.sleep(0.002)


def authenticated(ctx: Ctx) -> socket.socket:
    """A connection that passed the handshake (no secret) up to WELCOME OK. Told BUSY (the log
    line that ends the last session may still be on its way here), it tries again."""
    deadline = time.monotonic() + SAFETY_S  # only reached when the worker stays busy
    while True:
        wait_free(ctx.worker)
        sock = connect(ctx)
        try:
            hello = p.read(recv_frame(sock), p.HelloWorker)
            p.send_frame(sock, p.HelloRoot(p.new_nonce(), p.proof(None, b"root", hello.nonce)).encode())
            welcome = p.read(recv_frame(sock), p.Welcome)
        except BaseException:
            sock.close()
            raise
        if welcome.status == p.WelcomeStatus.OK:
            return sock
        sock.close()
        assert welcome.status == p.WelcomeStatus.BUSY and time.monotonic() < deadline, welcome
        time.sleep(0.01)


def in_session(ctx: Ctx, rng: random.Random) -> socket.socket:
    """A connection whose valid SETUP the worker accepted (READY received): the mesh is open."""
    sock = authenticated(ctx)
    p.send_frame(sock, head(p.MsgType.SETUP) + json.dumps(valid_setup(ctx, rng)).encode())
    ready = p.read(recv_frame(sock), p.Ready, p.Error)
    assert isinstance(ready, p.Ready) and not ready.has_weights, ready
    return sock


# ---- the stages ------------------------------------------------------------------------------

def first_message(ctx: Ctx, rng: random.Random) -> None:
    """A stranger's first message: only AUTH_FAILED (or nothing) may come back."""
    sock = connect(ctx)
    try:
        p.read(recv_frame(sock), p.HelloWorker)
    except BaseException:
        sock.close()
        raise
    data = mutate(rng, message(ctx, rng)) if rng.random() < 0.9 else mutate(rng, rng.randbytes(rng.randrange(80)))
    send(sock, data)
    for answer in frames(finish(sock)):
        welcome = p.read(answer, p.Welcome)
        assert welcome.status == p.WelcomeStatus.AUTH_FAILED, welcome


def corpus(ctx: Ctx) -> list[bytes]:
    """SETUPs that once hurt a worker, sent first in every run: a model header saying 10**30
    layers held it forever (the plan listed every tensor); `addresses` of the wrong type killed it."""
    rng = random.Random(0)
    huge = [[key, 10**30 if key == HeaderKey.N_LAYERS else value] for key, value in ctx.header]
    return [frame(head(p.MsgType.SETUP) + json.dumps(valid_setup(ctx, rng, **changes)).encode())
            for changes in (dict(header=huge), dict(addresses=5), dict(addresses=["root", 5]))]


def as_setup(ctx: Ctx, rng: random.Random, wire: bytes | None = None) -> None:
    """Any message where the SETUP goes: an ERROR, a READY, or nothing comes back."""
    sock = authenticated(ctx)
    kind = p.MsgType.SETUP if rng.random() < 0.7 else None
    send(sock, wire if wire is not None else mutate(rng, message(ctx, rng, kind)))
    answers = frames(finish(sock))
    assert len(answers) <= 1, answers
    for answer in answers:
        p.read(answer, p.Error, p.Ready)


def as_weights(ctx: Ctx, rng: random.Random) -> None:
    """A broken weights message (after k good ones): the worker must not report its weights
    loaded, even when the rest of the slices follow."""
    sock = in_session(ctx, rng)
    k = rng.randrange(len(ctx.parts))
    good = b"".join(frame(part) for part in ctx.parts[:k])
    part = ctx.parts[k]
    how = rng.randrange(6)
    if how == 0:  # shorter than the slice, then every other slice
        bad = frame(part[:rng.choice([0, 1, len(part) // 2, len(part) - 1])])
        rest = b"".join(frame(part) for part in ctx.parts[k + 1:])
    elif how == 1:  # longer than the slice
        bad, rest = frame(part + rng.randbytes(rng.choice([1, 4, 100]))), b""
    elif how == 2:  # a protocol message instead of the slice
        bad, rest = frame(message(ctx, rng)), b"".join(frame(part) for part in ctx.parts[k + 1:])
    else:
        bad, rest = mutate(rng, part), b""
    length_right = bad[:4] == U32.pack(len(part))
    send(sock, good + bad + rest)
    answers = frames(finish(sock))
    for answer in answers:
        p.read(answer, p.Loading, p.Loaded)
    if not length_right:
        assert p.Loaded().encode() not in answers, f"a weights message of the wrong length was accepted ({how=}, {k=})"


def weights_loaded(ctx: Ctx, rng: random.Random) -> socket.socket:
    sock = in_session(ctx, rng)
    sock.sendall(b"".join(frame(part) for part in ctx.parts))
    while True:
        message = p.read(recv_frame(sock), p.Loading, p.Loaded)
        if isinstance(message, p.Loaded):
            return sock


def as_steps(ctx: Ctx, rng: random.Random, count: int) -> int:
    """A session fed `count` messages: valid steps (answered), then anything. Gives the number sent."""
    sock = weights_loaded(ctx, rng)
    received: list[bytes] = []
    drain = threading.Thread(target=lambda: received.append(finish_reading(sock)), daemon=True)
    drain.start()
    sent = 0
    try:
        for i in range(count):
            last = i == count - 1
            if not last and rng.random() < 0.85:
                payload = head(p.MsgType.STEP) + step_body(ctx, rng, valid=True)
                chance = rng.random()
                if chance < 0.1:  # a slot copy, valid or out of range
                    copy = p.CopySlot(rng.choice([0, 1, 2, SLOTS, 65535]), rng.choice([0, 1, SLOTS - 1, SLOTS]),
                                      rng.choice([0, 1, 64, 65, 2**32 - 1]))
                    data = frame(copy.encode() if rng.random() < 0.8 else mutate(rng, copy.encode()))
                else:
                    data = frame(payload) if chance < 0.9 else frame(p.SendLogits().encode())
            elif rng.random() < 0.5:
                data = mutate(rng, head(p.MsgType.STEP) + step_body(ctx, rng, valid=rng.random() < 0.3))
            else:
                data = mutate(rng, message(ctx, rng))
            sent += 1
            if not send(sock, data):
                break
    finally:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        drain.join()
        sock.close()
    assert received and received[0] is not None, f"the worker neither answered nor closed within {SAFETY_S:g} s"
    return sent


def finish_reading(sock: socket.socket) -> bytes | None:
    """What the worker sends until it closes; None if it neither sent nor closed for SAFETY_S."""
    chunks = []
    try:
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    except TimeoutError:
        return None
    return b"".join(chunks)


# ---- the test --------------------------------------------------------------------------------

def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def weight_parts(model: Path) -> tuple[list[tuple[int, int]], int, list[bytes]]:
    with read_model(model) as m:
        header = [(int(k), v) for k, v in m.config.header_items()]
        plan = Plan.make(ModelConfig.from_header(header), 2)
        parts = []
        for tensor in m:
            cut = plan.cut(tensor.name, 1)
            if cut.kind is Split.ROOT:
                continue
            parts.append(np.ascontiguousarray(cut_tensor(tensor.data, tensor.float_type, cut)).tobytes())
        return header, m.config.dim, parts


def run_cases(ctx: Ctx, rng: random.Random, worker: WorkerProcess, total: int,
              timings: dict[str, float]) -> dict[str, int]:
    """Run `total` cases over the four stages; each case has its own seed, derived from rng."""
    counts = dict(first=0, setup=0, weights=0, steps=0)
    # A session costs the worker ~0.25 s to start and end (its accept loop notices a root that
    # authenticated only when its 0.2 s select times out), a refused handshake ~1 ms: most cases
    # are first messages and setups, and the session stages get the few hundred they need.
    n_weights = max(total // 125, 4)
    n_step_sessions = max(total // 250, 2)
    per_session = 20
    n_setup = total // 5
    n_first = max(total - n_weights - n_step_sessions * per_session - n_setup, 1)

    def check(stage: str, index: int, case_seed: int, run) -> None:
        try:
            run()
        except BaseException as error:
            raise AssertionError(f"fuzz case {stage}#{index} (DLLAMA_FUZZ_SEED={SEED}, case seed {case_seed}) "
                                 f"failed: {error!r}; worker alive: {worker.alive()}; "
                                 f"worker log tail: {worker.lines[-8:]}") from error

    seeds = [rng.randrange(1 << 63) for _ in range(n_first)]
    start = time.monotonic()
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = [pool.submit(check, "first", i, s, lambda s=s: first_message(ctx, random.Random(s)))
                   for i, s in enumerate(seeds)]
        for future in futures:
            future.result()
    counts["first"] = n_first
    assert worker.alive(), worker.lines[-20:]
    timings["first"], start = round(time.monotonic() - start, 1), time.monotonic()
    regressions = corpus(ctx)
    for i, wire in enumerate(regressions):
        check("setup-corpus", i, 0, lambda: as_setup(ctx, random.Random(0), wire))
    for i in range(len(regressions), n_setup):
        s = rng.randrange(1 << 63)
        check("setup", i, s, lambda: as_setup(ctx, random.Random(s)))
    counts["setup"] = n_setup
    assert worker.alive(), worker.lines[-20:]
    timings["setup"], start = round(time.monotonic() - start, 1), time.monotonic()
    for i in range(n_weights):
        s = rng.randrange(1 << 63)
        check("weights", i, s, lambda: as_weights(ctx, random.Random(s)))
    counts["weights"] = n_weights
    assert worker.alive(), worker.lines[-20:]
    timings["weights"], start = round(time.monotonic() - start, 1), time.monotonic()
    for i in range(n_step_sessions):
        s = rng.randrange(1 << 63)
        sent = []
        check("steps", i, s, lambda: sent.append(as_steps(ctx, random.Random(s), per_session)))
        counts["steps"] += sent[0]
    assert worker.alive(), worker.lines[-20:]
    timings["steps"] = round(time.monotonic() - start, 1)
    seeds_done = 0
    while sum(counts.values()) < total:  # a step session may end before its last message
        s = rng.randrange(1 << 63)
        check("first", n_first + seeds_done, s, lambda: first_message(ctx, random.Random(s)))
        counts["first"] += 1
        seeds_done += 1
    return counts


def test_worker_survives_fuzzed_protocol_messages_at_every_stage(stories):
    model, tok = stories
    print(f"fuzz seed {SEED} (DLLAMA_FUZZ_SEED replays it), {CASES} cases (DLLAMA_FUZZ_CASES)")
    header, dim, parts = weight_parts(model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    worker = WorkerProcess()
    try:
        ctx = Ctx(header, dim, worker.address, closed, worker, parts)
        rng = random.Random(SEED)
        # warm-up: every stage a few times, so that the allocator's arenas and caches exist
        # before the first measurement
        run_cases(ctx, random.Random(SEED ^ 0x5EED), worker, 100, {})
        before = rss_bytes(worker.proc.pid)
        sessions_before = "\n".join(worker.lines).count(" connected: node ")
        timings: dict[str, float] = {}
        counts = run_cases(ctx, rng, worker, CASES, timings)
        after = rss_bytes(worker.proc.pid)
        sessions = "\n".join(worker.lines).count(" connected: node ") - sessions_before
        assert worker.alive(), f"seed {SEED}: the worker died: {worker.lines[-20:]}"
        total = sum(counts.values())
        print(f"fuzz seed {SEED}: {total} cases {counts} in {timings} s, {sessions} sessions; worker RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")
        assert total >= CASES, counts
        assert after - before < RSS_SLACK, f"seed {SEED}: worker RSS grew from {before} to {after} bytes"
        authenticated(ctx).close()  # told OK, not BUSY: no session runs, a real root gets through
        assert_serves_a_real_root(model, tok, worker)
        assert worker.alive()
        tracebacks = [line for line in worker.lines if "Traceback" in line]
        assert not tracebacks, f"seed {SEED}: {worker.lines}"
    finally:
        worker.stop()
