"""`dllama worker`: wait for a root, receive the plan and weight slices, follow its steps.

A worker needs no model file; with `--model-dir` it reads its slices from its own copy of the
root's model when it has one (cluster/model_dir.py). When its root goes away (finished or
died) it frees everything and waits for the next one. Nothing a peer sends makes it exit: bytes that are not our
protocol, a wrong version or a wrong secret are refused with a logged line. Every incoming
connection is handshaken in a thread of its own with a deadline for the whole handshake
(`Reception`), so strangers that connect and say nothing cannot keep a real root out.
"""

from __future__ import annotations

import dataclasses
import gc
import queue
import select
import socket
import sys
import threading
import time

import numpy as np

from dllama_py import _core
from dllama_py.cluster import protocol as p
from dllama_py.cluster.mesh import MeshSync, net_spin_us, open_mesh
from dllama_py.cluster.model_dir import ModelDir, ModelDirError, config_key
from dllama_py.cluster.slice_cache import EntryWriter, SliceCache, entry_key
from dllama_py.engine.engine import MAX_SLOTS, known_available_memory, memory_shortfall
from dllama_py.engine.exchange import Exchange, LogitsMode, Readout, Segment
from dllama_py.engine.loader import choose_layout, load_node_weights, prepare_weights
from dllama_py.engine.transport import BUFFER_TYPES
from dllama_py.model import kernels
from dllama_py.model.config import FloatType, ModelConfig
from dllama_py.model.forward import NodeForward, tensor_layouts
from dllama_py.model.plan import Plan
from dllama_py.model.structure import Split, tensor_specs

HANDSHAKE_TIMEOUT_S = 10.0  # for the whole handshake up to the root's proof; then as long again for its setup
MAX_PENDING_HANDSHAKES = 32  # unauthenticated connections handled at once; beyond, the oldest is dropped
MAX_BATCH = 1024  # the most prompt rows per step a root may ask for
# The most layers x experts a setup's model may have: the plan lists every tensor, so a header
# saying 10**30 layers would hold the worker forever. The largest models run today have ~25,000
# (61 layers x 384 experts); a plan of 32,768 dense layers takes a few seconds to check.
MAX_LAYER_EXPERTS = 1 << 15


def log(message: str) -> None:
    # one write: print() writes the line and its end separately, and the handshake threads log
    # at once, which ran lines together
    sys.stderr.write(f"[worker {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


class Deadline:
    """A socket whose reads and writes must all be done by one deadline (time.monotonic()), so
    that a peer that sends a byte now and then cannot stretch a handshake (a timeout per read
    could not stop it). Has what protocol.send_frame and recv_frame use."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self.sock, self.seconds = sock, seconds
        self.deadline = time.monotonic() + seconds

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the handshake took longer than {self.seconds:g} s")
        return left

    def recv(self, n: int) -> bytes:
        self.sock.settimeout(self._left())
        try:
            return self.sock.recv(n)
        except TimeoutError:
            raise TimeoutError(f"the handshake took longer than {self.seconds:g} s") from None

    def sendall(self, data: bytes) -> None:
        self.sock.settimeout(self._left())
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise TimeoutError(f"the handshake took longer than {self.seconds:g} s") from None


def secret_mismatch(secret: str | None, root_proof: bytes, nonce_w: bytes) -> str:
    """Why a root's proof does not match, said from this worker's side."""
    if not secret:
        return "the root uses a secret but this worker has none (start it with the same --secret / DLLAMA_SECRET)"
    if p.proofs_equal(root_proof, p.proof(None, b"root", nonce_w)):
        return "the root has no secret but this worker requires one (give the root --secret / DLLAMA_SECRET)"
    return "the root's secret differs from this worker's (check --secret / DLLAMA_SECRET on both sides)"


def authenticate(link: Deadline | socket.socket, secret: str | None) -> p.HelloRoot:
    """The first half of the worker's handshake: challenge the root and check its proof
    (answering AUTH_FAILED and raising ProtocolError when it does not know the secret)."""
    nonce_w = p.new_nonce()
    p.send_frame(link, p.HelloWorker(nonce_w).encode())
    hello = p.read(p.recv_frame(link), p.HelloRoot)
    if not p.proofs_equal(hello.proof, p.proof(secret, b"root", nonce_w)):
        p.send_frame(link, p.Welcome(p.WelcomeStatus.AUTH_FAILED).encode())
        raise p.ProtocolError(secret_mismatch(secret, hello.proof, nonce_w))
    return hello


def welcome(link: Deadline | socket.socket, secret: str | None, hello: p.HelloRoot, speed: float) -> p.Setup:
    """The second half: prove this worker knows the secret, then read the root's setup."""
    p.send_frame(link, p.Welcome(p.WelcomeStatus.OK, p.proof(secret, b"worker", hello.nonce), speed,
                                 known_available_memory() or 0).encode())
    return p.read(p.recv_frame(link), p.Setup)


class Reception:
    """Handshakes every incoming connection in a thread of its own, so that strangers which
    connect and then say nothing (or dribble a byte every few seconds) cannot keep a root
    waiting: the first root that proves it knows the secret wins the worker; any other root
    that authenticates meanwhile is told BUSY. Each handshake has HANDSHAKE_TIMEOUT_S in all;
    at most MAX_PENDING_HANDSHAKES unauthenticated ones run at once, and a new connection
    beyond that drops the oldest (a flood must then outpace a root's whole handshake, a
    few milliseconds on a LAN, to keep it out)."""

    def __init__(self, secret: str | None, speed: float) -> None:
        self.secret, self.speed = secret, speed
        self._lock = threading.Lock()
        self._pending: dict[socket.socket, str] = {}  # unauthenticated connections, oldest first
        self._dropped: set[socket.socket] = set()
        self._claimed = False  # a root authenticated: accept nothing more until release()
        self._outcomes: queue.Queue[tuple[socket.socket, p.Setup, str] | None] = queue.Queue()
        # a handshake thread that wins wakes next_root's select at once (not at its next timeout)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)

    def next_root(self, listener: socket.socket) -> tuple[socket.socket, p.Setup, str]:
        """Accept connections until a root has authenticated and sent its setup: (its socket,
        the setup, its address). Once one authenticates, nothing more is accepted here (the
        other workers of its session connect to this listener next)."""
        while True:
            with self._lock:
                claimed = self._claimed
            if claimed:
                outcome = self._outcomes.get()
                if outcome is not None:
                    return outcome
                continue  # that root went away before its setup: accept again
            ready, _, _ = select.select([listener, self._wake_r], [], [], 1.0)
            if self._wake_r in ready:
                try:
                    self._wake_r.recv(64)
                except BlockingIOError:
                    pass
            if listener not in ready:
                continue
            with self._lock:
                if self._claimed:  # a connection made after a root authenticated is its session's
                    continue
                listener.settimeout(0)
                try:
                    conn, addr = listener.accept()
                except OSError:  # gone again (reset before accept)
                    continue
                finally:
                    listener.settimeout(None)
                who = f"{addr[0]}:{addr[1]}"
                if len(self._pending) >= MAX_PENDING_HANDSHAKES:
                    oldest = next(iter(self._pending))
                    self._drop(oldest)
                self._pending[conn] = who
            threading.Thread(target=self._handshake, args=(conn, who), daemon=True,
                             name=f"dllama-handshake {who}").start()

    def release(self) -> None:
        """The session of the root next_root returned is over: accept the next."""
        with self._lock:
            self._claimed = False

    def _drop(self, conn: socket.socket) -> None:
        """Make room (lock held): end the oldest unauthenticated handshake."""
        del self._pending[conn]
        self._dropped.add(conn)
        try:
            conn.shutdown(socket.SHUT_RDWR)  # its thread's read returns at once
        except OSError:
            pass

    def _handshake(self, conn: socket.socket, who: str) -> None:
        won = dropped = False
        try:
            hello = authenticate(Deadline(conn, HANDSHAKE_TIMEOUT_S), self.secret)
            with self._lock:
                self._pending.pop(conn, None)
                won = not self._claimed and conn not in self._dropped
                self._claimed = self._claimed or won
            if won:
                self._wake_w.send(b"w")
            if not won:
                p.send_frame(Deadline(conn, HANDSHAKE_TIMEOUT_S), p.Welcome(p.WelcomeStatus.BUSY).encode())
                log(f"told root {who} that this worker is busy with another root")
                conn.close()
                return
            setup = welcome(Deadline(conn, HANDSHAKE_TIMEOUT_S), self.secret, hello, self.speed)
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            self._outcomes.put((conn, setup, who))
        except Exception as error:  # noqa: BLE001 - whatever arrives, the worker keeps serving
            with self._lock:
                dropped = conn in self._dropped
            if dropped:
                log(f"dropped connection from {who}: {MAX_PENDING_HANDSHAKES} newer handshakes were pending")
            else:
                log(f"refused connection from {who}: {error}")
            conn.close()
            if won:
                with self._lock:
                    self._claimed = False
                self._outcomes.put(None)
        finally:
            with self._lock:
                self._pending.pop(conn, None)
                self._dropped.discard(conn)


def connect_mesh(listener: socket.socket, root: socket.socket, setup: p.Setup,
                 secret: str | None) -> dict[int, socket.socket]:
    """Connect to every worker after this one and accept every worker before it; gives up at once
    when the root goes away meanwhile (e.g. because another worker refused the setup)."""
    me, peers = setup.node_index, {}
    session = bytes.fromhex(setup.session)
    for j in range(me + 1, len(setup.addresses)):
        host, port = p.parse_address(setup.addresses[j])
        sock = socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT_S)
        p.send_frame(sock, p.MeshHello(session, me, p.proof(secret, b"mesh", session, str(me).encode())).encode())
        peers[j] = sock
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S * 3
    while len(peers) < len(setup.addresses) - 2:  # every other worker
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = [setup.addresses[j] for j in range(1, me) if j not in peers]
            raise p.ProtocolError(f"workers {', '.join(missing)} did not connect to this worker")
        ready, _, _ = select.select([listener, root], [], [], min(remaining, 1.0))
        if root in ready:  # the root sends nothing before READY: readable means it closed
            raise p.ProtocolError("the root went away while the workers were connecting to each other")
        if listener not in ready:
            continue
        listener.settimeout(remaining)
        try:
            sock, addr = listener.accept()
        except TimeoutError:
            continue
        link = Deadline(sock, min(HANDSHAKE_TIMEOUT_S, max(0.1, deadline - time.monotonic())))
        try:
            hello = p.read(p.recv_frame(link), p.MeshHello)
            if hello.session != session:
                raise p.ProtocolError("mesh hello for another session")
            j = hello.node
            if not 1 <= j < me or j in peers:
                raise p.ProtocolError(f"unexpected mesh peer index {j}")
            if not p.proofs_equal(hello.proof, p.proof(secret, b"mesh", session, str(j).encode())):
                raise p.ProtocolError("mesh peer does not know the secret")
            peers[j] = sock
        except (p.ProtocolError, OSError) as error:
            log(f"refused connection from {addr[0]}:{addr[1]} while building the mesh: {error}")
            sock.close()
    listener.settimeout(None)
    return peers


def receive_weights(mesh: _core.Mesh, plan: Plan, node: int, store: EntryWriter | None = None) -> dict[str, np.ndarray]:
    """Receive this node's slice of every tensor, in file order (writing each to `store`)."""
    weights = {}
    for spec in tensor_specs(plan.config):
        cut = plan.cut(spec.name, node)
        if cut.kind is Split.ROOT:
            continue
        rows, cols = plan.slice_shape(spec.name, spec.shape, node)
        array = np.empty((rows, spec.float_type.row_elements(cols)), dtype=spec.float_type.storage_dtype)
        got = mesh.recv_message_into(0, array, f"loading {spec.name}")
        if got != array.nbytes:  # the rest of the array would be whatever np.empty left there
            raise p.ProtocolError(f"malformed weights: {got} bytes for {spec.name}, expected {array.nbytes}")
        weights[spec.name] = array
        if store is not None:
            store.write(spec.name, array)
    return weights


class Heartbeat:
    """Sends LOADING to the root every second while this worker reads or prepares its weights,
    so that the root can tell a slow worker from a frozen one."""

    def __init__(self, mesh: _core.Mesh) -> None:
        self.mesh, self.stopping = mesh, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(1.0):
            try:
                self.mesh.send_message(0, p.Loading().encode(), "reporting progress while loading")
            except ConnectionError:
                return  # the main thread hears about it on its next operation

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()


def check_setup(setup: p.Setup) -> Plan:
    """The plan of a root's setup; raises ValueError saying why this worker cannot serve it."""
    config = ModelConfig.from_header(setup.header)  # ConfigError names the problem
    if setup.tensor_types:  # FloatType.from_label and tensor_specs (in Plan.make) refuse bad ones
        config = dataclasses.replace(config, tensor_types=tuple((name, FloatType.from_label(label))
                                                                for name, label in setup.tensor_types.items()))
    if config.n_layers * max(config.n_experts, 1) > MAX_LAYER_EXPERTS:  # before anything walks them
        raise ValueError(f"a model of {config.n_layers} layers and {config.n_experts} experts is beyond this worker "
                         f"(at most {MAX_LAYER_EXPERTS} layers x experts)")
    plan = Plan.make(config, len(setup.addresses), setup.shares)  # PlanError says why and what would work
    if not 1 <= setup.node_index < plan.n_nodes:
        raise ValueError(f"node index {setup.node_index} is not a worker of a {plan.n_nodes}-node plan")
    if setup.buffer_type not in BUFFER_TYPES:
        raise ValueError(f"unknown buffer type {setup.buffer_type!r}")
    if setup.kv_storage not in ("ram", "disk"):
        raise ValueError(f"unknown KV cache storage {setup.kv_storage!r}")
    if not 1 <= setup.seq_len <= config.max_seq_len:
        raise ValueError(f"context of {setup.seq_len} positions is outside 1..{config.max_seq_len}")
    if not 1 <= setup.max_batch <= MAX_BATCH:
        raise ValueError(f"batch of {setup.max_batch} rows is outside 1..{MAX_BATCH}")
    if not 1 <= setup.slots <= MAX_SLOTS:
        raise ValueError(f"{setup.slots} KV-cache slots is outside 1..{MAX_SLOTS}")
    if not 0 < setup.timeout_ms <= 3_600_000:
        raise ValueError(f"timeout of {setup.timeout_ms} ms is outside 1..3600000")
    shortfall = memory_shortfall(plan, setup.node_index, setup.seq_len, setup.kv_storage, setup.slots)
    if shortfall:
        raise ValueError(shortfall)
    return plan


def open_local_model(models: ModelDir, setup: p.Setup, plan: Plan):
    """The root's model from this worker's --model-dir, opened as the root opened it, or None
    (saying why in the log)."""
    local = models.find(setup.model_id)
    if local is None:
        log(f"model dir: no model file in {models.dir} has the root's fingerprint {setup.model_id[:12]}; "
            "the slices come from the root (or the slice cache)")
        return None
    try:
        model = local.open()
    except Exception as error:  # noqa: BLE001 - changed since it was fingerprinted: fall back to shipping
        log(f"model dir: cannot open {local.path}: {error}; the slices come from the root")
        return None
    if config_key(model.config) != config_key(plan.config):
        model.close()
        log(f"model dir: {local.describe()} has the root's fingerprint but another config; the slices come "
            "from the root")
        return None
    log(f"model dir: the root's model is {local.describe()}; reading this node's slices from it")
    return model


def run_session(listener: socket.socket, conn: socket.socket, setup: p.Setup, secret: str | None,
                spin_us: int, cache: SliceCache | None = None, models: ModelDir | None = None) -> None:
    """Serve one root from setup to END (or until it goes away)."""
    try:
        plan = check_setup(setup)
    except ValueError as error:  # tell the root why, before anything is allocated
        p.send_frame(conn, p.Error(str(error)).encode())
        raise
    config = plan.config
    me = setup.node_index
    peers = connect_mesh(listener, conn, setup, secret)
    local = open_local_model(models, setup, plan) if models is not None and setup.model_id else None
    key = entry_key(setup.model_id, plan, me) if cache is not None and setup.model_id and local is None else None
    cached = key is not None and cache.has(key, plan, me)
    try:
        p.send_frame(conn, p.Ready(cached or local is not None).encode())
    except BaseException:
        if local is not None:
            local.close()
        raise
    fds = [-1] * plan.n_nodes
    names = list(setup.addresses)
    names[0] = f"root {conn.getpeername()[0]}"
    fds[0] = conn.detach()
    for j, sock in peers.items():
        fds[j] = sock.detach()
    mesh = open_mesh(me, plan.n_nodes, fds, names, setup.timeout_ms, spin_us)
    forward = None
    busy = BusyResponder(listener, f"busy with root {conn_name(names[0])}")
    heartbeat = None
    layout = choose_layout(config)
    try:
        start = time.perf_counter()
        if local is not None:  # cut and prepared as the root does its own slices
            heartbeat = Heartbeat(mesh)
            try:
                weights = load_node_weights(local, plan, me, layout, progress=False)
            finally:
                local.close()
            how = f"read {plan.node_weight_bytes(me) / 2**20:.1f} MiB of weights from {local.path}"
        elif cached:
            heartbeat = Heartbeat(mesh)
            weights = cache.load(key, plan, me)
            how = f"read {sum(w.nbytes for w in weights.values()) / 2**20:.1f} MiB of weights from the cache"
        else:
            store = cache.writer(key, plan.node_weight_bytes(me)) if key is not None else None
            # The root ships to one worker after another: this one's turn may come much later
            # than the timeout. A root that dies meanwhile makes the socket readable (EOF).
            while not mesh.wait_readable(0, 5000):
                pass
            try:
                weights = receive_weights(mesh, plan, me, store)
            except BaseException:
                if store is not None:
                    store.abort()
                raise
            heartbeat = Heartbeat(mesh)
            if store is not None:
                store.commit()
            how = f"received {sum(w.nbytes for w in weights.values()) / 2**20:.1f} MiB of weights"
        log(f"{how} in {time.perf_counter() - start:.1f} s (node {me} of {plan.n_nodes})")
        if local is None:
            prepare_weights(weights, tensor_layouts(config, layout))
        sync = MeshSync(mesh, me, plan.n_nodes, setup.buffer_type, setup.max_batch, config.dim, setup.sync)
        forward = NodeForward(plan, me, weights, sync, setup.seq_len, setup.max_batch, setup.kv_storage, layout,
                              setup.slots)
        heartbeat.stop()
        heartbeat = None
        mesh.send_message(0, p.Loaded().encode(), "reporting its weights loaded")
        mesh.reset_counters()  # per-step traffic starts here, as on the root
        follow_root(mesh, plan, me, forward, setup)
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        busy.stop()
        mesh.close()
        if forward is not None:
            forward.close()


def conn_name(name: str) -> str:
    return name.removeprefix("root ")


class BusyResponder:
    """While a session runs, answers every other root at once that this worker is busy,
    instead of leaving it waiting for a handshake."""

    def __init__(self, listener: socket.socket, reason: str) -> None:
        self.listener, self.reason = listener, reason
        self.stopping = threading.Event()
        listener.settimeout(0.05)  # how soon stop() takes effect
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, addr = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                link = Deadline(sock, 2.0)  # for the whole exchange: strangers cannot hold this thread
                p.send_frame(link, p.HelloWorker(p.new_nonce()).encode())
                p.read(p.recv_frame(link), p.HelloRoot)
                p.send_frame(link, p.Welcome(p.WelcomeStatus.BUSY).encode())
                log(f"told root {addr[0]}:{addr[1]} that this worker is {self.reason}")
            except (p.ProtocolError, OSError) as error:
                log(f"refused connection from {addr[0]}:{addr[1]} during a session: {error}")
            finally:
                sock.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.listener.settimeout(None)


def follow_root(mesh: _core.Mesh, plan: Plan, me: int, forward: NodeForward, setup: p.Setup) -> None:
    """Run the root's steps until END; returns when the root ends the session."""
    dim = plan.config.dim
    x_buf = np.zeros((setup.max_batch, dim), dtype=np.float32)
    # the largest STEP this session sends: every row its own segment
    max_step = p.HEADER.size + p.STEP.size + setup.max_batch * (p.SEGMENT.size + dim * 4)
    exchange = Exchange(plan, me)
    last = np.zeros((0, plan.nodes[me].vocab_width), dtype=np.float32)
    segments: list[Segment] = []
    while True:
        while not mesh.wait_readable(0, 5000):
            pass  # an idle root is not a dead one; a dead one makes the socket readable (EOF)
        message = p.read(mesh.recv_message(0, max_step, "waiting for the next step"), p.Step, p.SendLogits, p.End,
                         p.CopySlot, dim=dim)
        if isinstance(message, p.End):
            return
        if isinstance(message, p.CopySlot):
            if max(message.source, message.target) >= setup.slots or message.source == message.target \
                    or message.length > setup.seq_len:
                raise p.ProtocolError(f"malformed copy: slot {message.source} to {message.target}, {message.length} "
                                      f"positions, in a session of {setup.slots} slots of {setup.seq_len}")
            forward.cache.copy(message.source, message.target, message.length)
            continue
        if isinstance(message, p.SendLogits):  # the root wants the whole slices of the last step after all
            reply(mesh, exchange, [full_instead(seg) for seg in segments], last, forward.sync.seconds)
            continue
        if message.batch > setup.max_batch:
            raise p.ProtocolError(f"malformed step: {message.batch} rows, more than this session's {setup.max_batch}")
        for seg in message.segments:
            if seg.slot >= setup.slots or seg.position + seg.rows > setup.seq_len:
                raise p.ProtocolError(f"malformed step: slot {seg.slot} positions {seg.position}.."
                                      f"{seg.position + seg.rows - 1} outside this session's {setup.slots} slots of "
                                      f"{setup.seq_len} positions")
        if len({seg.slot for seg in message.segments}) != len(message.segments):
            raise p.ProtocolError("malformed step: a KV slot twice")
        x = x_buf[:message.batch]
        x[:] = message.x
        segments = message.segments
        last = forward.forward(x, segments)
        reply(mesh, exchange, segments, last, forward.sync.seconds)


def full_instead(segment: Segment) -> Segment:
    """The segment asking for its whole logits slice (for the rows it kept), or for none."""
    if segment.readout.mode == LogitsMode.NONE:
        return segment
    return dataclasses.replace(segment, readout=Readout(LogitsMode.FULL, all_rows=segment.readout.all_rows))


def reply(mesh: _core.Mesh, exchange: Exchange, segments: list[Segment], logits: np.ndarray,
          waited_s: float) -> None:
    """Send this node's part of the logits to the root, as the step's segments ask."""
    modes = {seg.readout.mode for seg in segments} - {LogitsMode.NONE}
    if not modes:
        return
    offsets, sizes = exchange.layout(segments)
    part = exchange.part(segments, logits, (mesh.bytes_sent, mesh.bytes_received, waited_s))
    me = exchange.node
    buf = np.zeros(offsets[-1] + sizes[-1], dtype=np.uint8)
    buf[offsets[me]:offsets[me] + sizes[me]] = np.frombuffer(part, dtype=np.uint8)
    label = {LogitsMode.ARGMAX: "sending the best token", LogitsMode.TOPK: "sending top tokens"}
    mesh.gather(0, buf, offsets, sizes, label.get(modes.pop(), "sending logits") if len(modes) == 1 else
                "sending logits")


def serve(host: str, port: int, threads: int | None, secret: str | None, once: bool = False,
          cache_dir: str | None = None, model_dir: str | None = None) -> int:
    """Listen on host:port and serve roots one after another; returns only with `once`."""
    try:
        spin_us = net_spin_us()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    models = None
    if model_dir is not None:
        try:
            models = ModelDir(model_dir, log=log)
        except ModelDirError as error:
            print(f"error: --model-dir: {error}", file=sys.stderr)
            return 1
    cache = None
    if cache_dir is not None:
        try:
            cache = SliceCache(cache_dir, log=log)
        except OSError as error:
            print(f"error: cannot use {cache_dir} as the slice cache: {error.strerror or error}", file=sys.stderr)
            return 1
    if threads is not None:
        kernels.set_num_threads(threads)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server((host, port), family=family, reuse_port=False, backlog=16)
    except (OSError, OverflowError) as error:  # OverflowError: a port outside 0-65535
        print(f"error: cannot listen on {host}:{port}: {getattr(error, 'strerror', None) or error}", file=sys.stderr)
        return 1
    speed = kernels.measure_matmul_speed()  # --shares auto weighs the nodes by it
    if models is not None:
        start = time.perf_counter()
        found = models.scan()
        log(f"model dir {models.dir}: {len({m.path for m in found})} model file(s), fingerprinted in "
            f"{time.perf_counter() - start:.1f} s")
    log(f"listening on {host}:{port} with {kernels.get_num_threads()} thread(s), SIMD path {kernels.get_isa()}, "
        f"matmul speed {speed:.1f} GB/s of q40 weights" + (", secret required" if secret else "")
        + (f", slice cache in {cache.dir}" if cache else ""))
    reception = Reception(secret, speed)
    try:
        while True:
            conn, setup, who = reception.next_root(listener)
            log(f"root {who} connected: node {setup.node_index} of {len(setup.addresses)}")
            try:
                run_session(listener, conn, setup, secret, spin_us, cache, models)
                log(f"root {who} finished; waiting for the next root")
            except (ConnectionError, OSError, ValueError, RuntimeError) as error:
                log(f"session with root {who} ended: {error}; waiting for the next root")
            except Exception as error:  # noqa: BLE001 - nothing a root sends may stop the worker
                log(f"session with root {who} ended: {type(error).__name__}: {error}; waiting for the next root")
            finally:
                conn.close()
                reception.release()
                gc.collect()
            if once:
                return 0
    except KeyboardInterrupt:
        log("stopped")
        return 0
    finally:
        listener.close()
