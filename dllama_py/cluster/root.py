"""The root of a cluster: connect to the workers, ship their slices, carry every step.

`ClusterTransport` is the engine's transport (engine/transport.py) to the workers; the engine
itself (engine/engine.py) is the same for one node and for a cluster. The root memory-maps the
model and keeps only its own slice resident; each worker's slice is cut from the mapping and
streamed to it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dllama_py import _core
from dllama_py.cluster import protocol as p
from dllama_py.cluster.mesh import MeshSync, net_spin_us, open_mesh, sync_algorithm
from dllama_py.cluster.slice_cache import model_fingerprint
from dllama_py.engine.engine import Engine, EngineError, default_buffer_type
from dllama_py.engine.exchange import Segment
from dllama_py.engine.transport import NodeReport, Session, Transport
from dllama_py.formats.model_file import ModelFile
from dllama_py.model.config import ModelConfig
from dllama_py.model.plan import Plan, cut_tensor
from dllama_py.model.structure import Split

CONNECT_TIMEOUT_S = 10.0
DEFAULT_TIMEOUT_MS = 8000  # a silent worker is declared dead after this long


class ClusterTransport:
    """The root's links to the workers at `workers` (nodes 1..N): the engine over it is a cluster.

    `connect` authenticates every worker (and hears its matmul speed and free RAM), `start`
    sends each the session and streams it its slices, then every step is one STEP message
    broadcast to the workers, the per-layer syncs over the mesh, and one gather of the logits
    parts at the root.
    """

    def __init__(self, workers: list[str], secret: str | None = None, timeout_ms: int = DEFAULT_TIMEOUT_MS,
                 log: Callable[[str], None] = print) -> None:
        addresses = list(workers)
        for address in addresses:
            p.parse_address(address)
        repeated = sorted({a for a in addresses if addresses.count(a) > 1})
        if repeated:
            raise EngineError(f"worker {', '.join(repeated)} is listed more than once in --workers; "
                              "a worker serves one node (start one worker per port)")
        try:
            self.spin_us = net_spin_us()
        except ValueError as error:
            raise EngineError(str(error)) from None
        self.addresses = addresses
        self.names = ["root"] + addresses
        self.secret, self.timeout_ms, self.log = secret, timeout_ms, log
        self.socks: list[socket.socket] = []
        self.mesh: _core.Mesh | None = None
        self.mesh_sync: MeshSync | None = None
        self._gather_buf = np.zeros(0, dtype=np.uint8)  # reused by every step's gather, grown as needed
        self.cached = [False] * len(self.names)  # which workers read their slices from their cache

    def default_buffer_type(self, config: ModelConfig) -> str:
        return default_buffer_type(config)

    def connect(self) -> list[NodeReport]:
        socks, speeds, memories = self._handshakes(self.addresses, self.secret)
        self.socks = socks
        return [NodeReport(speed, memory) for speed, memory in zip(speeds, memories)]

    def start(self, session: Session, plan: Plan, model: ModelFile, progress: bool) -> None:
        self.plan, self.model = plan, model
        self.algorithm = sync_algorithm(plan.n_nodes)  # the root chooses; SETUP tells the workers
        self.mesh = self._setup(self.socks, self.addresses, session, model_fingerprint(model))
        self.socks = []  # the mesh owns them now
        self._ship_weights(progress)

    def sync(self, buffer_type: str, max_batch: int, dim: int) -> MeshSync:
        self.mesh_sync = MeshSync(self.mesh, 0, self.plan.n_nodes, buffer_type, max_batch, dim, self.algorithm)
        return self.mesh_sync

    def wait_loaded(self) -> None:
        self._wait_loaded()
        self.mesh.reset_counters()  # per-step traffic starts here (workers reset too)

    def send_step(self, segments: list[Segment], x: np.ndarray) -> None:
        vocab = self.plan.config.vocab_size
        limited = [seg if seg.readout.vocab_limit else
                   dataclasses.replace(seg, readout=dataclasses.replace(seg.readout, vocab_limit=vocab))
                   for seg in segments]
        where = f"position {segments[0].position}" if len(segments) == 1 else f"{len(segments)} sequences"
        self.mesh.broadcast_message(p.Step(limited, x).encode(), f"sending step at {where}")

    def send_copy(self, source: int, target: int, length: int) -> None:
        self.mesh.broadcast_message(p.CopySlot(source, target, length).encode(), "sending a slot copy")

    def send_logits_request(self) -> None:
        self.mesh.broadcast_message(p.SendLogits().encode(), "asking for logits")

    def gather(self, part: bytes, offsets: list[int], sizes: list[int], label: str) -> np.ndarray:
        total = offsets[-1] + sizes[-1]
        if self._gather_buf.size < total:
            self._gather_buf = np.zeros(total, dtype=np.uint8)
        buf = self._gather_buf[:total]  # what combine() keeps of it is copied (several nodes' parts)
        buf[: sizes[0]] = np.frombuffer(part, dtype=np.uint8)
        self.mesh.gather(0, buf, offsets, sizes, label)
        return buf

    def counters(self) -> tuple[int, int, float]:
        if self.mesh is None:
            return 0, 0, 0.0
        return self.mesh.bytes_sent, self.mesh.bytes_received, self.mesh_sync.seconds if self.mesh_sync else 0.0

    # ---- setup ----------------------------------------------------------------------------
    def _handshakes(self, addresses: list[str], secret: str | None
                    ) -> tuple[list[socket.socket], list[float], list[int | None]]:
        """Connect to every worker and authenticate; returns the sockets, every worker's matmul
        speed (GB/s of q40 weights) and available RAM (bytes; None if unknown). Every worker is
        inside its handshake before any gets its setup, so the mesh connections workers open to
        each other wait in listen backlogs."""
        socks: list[socket.socket] = []
        speeds: list[float] = []
        memories: list[int | None] = []
        seen: dict[tuple, str] = {}  # (ip, port) -> the address it was reached by
        try:
            for address in addresses:
                sock, gbps, memory = self._handshake(address, secret, seen)
                socks.append(sock)
                speeds.append(gbps)
                memories.append(memory)
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        return socks, speeds, memories

    def _setup(self, socks: list[socket.socket], addresses: list[str], session: Session,
               model_id: str) -> _core.Mesh:
        """Send every worker its setup, wait until the workers are connected to each other, and
        hand the sockets to a Mesh (which owns them from then on)."""
        session_id = p.new_nonce().hex()
        for index, sock in enumerate(socks, start=1):
            setup = p.Setup(session_id, index, self.names, [(int(k), v) for k, v in session.config.header_items()],
                            session.buffer_type, session.seq_len, session.max_batch, session.kv_storage,
                            self.timeout_ms, model_id, session.shares, session.slots,
                            {name: t.label for name, t in session.config.tensor_types}, self.algorithm)
            try:
                p.send_frame(sock, setup.encode())
            except OSError as error:
                raise EngineError(f"worker {addresses[index - 1]} went away during setup: {error}") from None
        for node, (address, sock) in enumerate(zip(addresses, socks), start=1):
            sock.settimeout(CONNECT_TIMEOUT_S * 4)
            try:
                answer = p.read(p.recv_frame(sock), p.Ready, p.Error)
            except (OSError, p.ProtocolError) as error:
                raise EngineError(f"worker {address} failed while connecting to the other workers: "
                                  f"{error}") from None
            if isinstance(answer, p.Error):
                raise EngineError(f"worker {address} cannot serve this model: {answer.reason}")
            self.cached[node] = answer.has_weights
        fds = [-1] + [s.detach() for s in socks]
        return open_mesh(0, len(fds), fds, self.names, self.timeout_ms, self.spin_us)

    def _handshake(self, address: str, secret: str | None, seen: dict[tuple, str]
                   ) -> tuple[socket.socket, float, int | None]:
        host, port = p.parse_address(address)
        try:
            sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
        except OSError as error:
            raise EngineError(f"cannot connect to worker {address}: {error.strerror or error} "
                              "(is `dllama worker` running there?)") from None
        peer = tuple(sock.getpeername()[:2])
        if peer in seen:
            sock.close()
            raise EngineError(f"--workers {seen[peer]} and {address} are the same worker ({peer[0]} port {peer[1]}); "
                              "a worker serves one node (start one worker per port)")
        seen[peer] = address
        try:
            hello = p.read(p.recv_frame(sock), p.HelloWorker)
            nonce_r = p.new_nonce()
            p.send_frame(sock, p.HelloRoot(nonce_r, p.proof(secret, b"root", hello.nonce)).encode())
            welcome = p.read(p.recv_frame(sock), p.Welcome)
            if welcome.status == p.WelcomeStatus.AUTH_FAILED:
                raise EngineError(f"worker {address} refused this root: the secrets differ "
                                  "(check --secret / DLLAMA_SECRET on both sides)")
            if welcome.status == p.WelcomeStatus.BUSY:
                raise EngineError(f"worker {address} is busy with another root")
            if not p.proofs_equal(welcome.proof, p.proof(secret, b"worker", nonce_r)):
                raise EngineError(f"worker {address} does not know this root's secret "
                                  "(check --secret / DLLAMA_SECRET on both sides)")
            gbps, memory = welcome.speed_gbps, welcome.memory
        except TimeoutError:
            sock.close()
            raise EngineError(f"worker {address} did not answer the handshake within {CONNECT_TIMEOUT_S:.0f} s "
                              "(busy with another root?)") from None
        except (p.ProtocolError, OSError) as error:
            sock.close()
            raise EngineError(f"worker {address}: handshake failed: {error}") from None
        except BaseException:
            sock.close()
            raise
        return sock, gbps, memory or None

    def _ship_weights(self, progress: bool) -> None:
        """Stream every worker its slices (cut from the memory-mapped file, one tensor at a time)."""
        from tqdm import tqdm

        for node in range(1, self.plan.n_nodes):
            total = self.plan.node_weight_bytes(node)
            address = self.names[node]
            if self.cached[node]:
                self.log(f"node {node} ({address}): {total / 2**20:.1f} MiB read by the worker from its own disk "
                         "(its --model-dir model file or --cache-dir slice cache), nothing shipped")
                continue
            start = time.perf_counter()
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"weights -> node {node} {address}",
                      disable=not progress, leave=True) as bar:
                for tensor in self.model:
                    cut = self.plan.cut(tensor.name, node)
                    if cut.kind is Split.ROOT:
                        continue
                    part = np.ascontiguousarray(cut_tensor(tensor.data, tensor.float_type, cut))
                    try:
                        self.mesh.send_message(node, part, f"loading {tensor.name}")
                    except ConnectionError as error:
                        raise EngineError(f"worker {address} failed while loading weights: {error}") from None
                    bar.update(part.nbytes)
                    self.model.release(tensor.name)  # the root keeps only its own slices resident
            seconds = time.perf_counter() - start
            self.log(f"node {node} ({address}): {total / 2**20:.1f} MiB in {seconds:.1f} s "
                     f"({total / max(seconds, 1e-9) / 1e6:.0f} MB/s)")

    def _wait_loaded(self) -> None:
        """Wait until every worker has its weights in place; a worker reading or preparing them
        reports progress every second, so a frozen one still fails within the timeout."""
        for node in range(1, self.plan.n_nodes):
            address = self.names[node]
            while True:
                try:
                    message = p.read(self.mesh.recv_message(node, 64, "waiting for the worker to load its weights"),
                                     p.Loading, p.Loaded)
                except ConnectionError as error:
                    raise EngineError(f"worker {address} failed while loading weights: {error}") from None
                if isinstance(message, p.Loaded):
                    break

    def check_alive(self) -> None:
        """Between steps, raise ConnectionError naming any worker whose connection closed (it died
        or restarted): an idle worker never sends anything, so readable means gone."""
        for node in range(1, len(self.names)):
            try:
                gone = self.mesh.wait_readable(node, 0)
            except ConnectionError as error:
                raise ConnectionError(f"the cluster failed: {error}") from None
            if gone:
                raise ConnectionError(f"worker {self.names[node]} closed its connection while idle")

    # ---- a node lost, a node back ---------------------------------------------------------
    def survivors(self, error: ConnectionError) -> tuple[Transport, list[str]] | None:
        """After the cluster failed: end this session and ask every worker whether it still
        answers (a worker that just left the session may say busy for a moment: asked again until
        the deadline). Returns a transport over the ones that do and the names of the others, or
        None when every worker still answers (nothing to plan around)."""
        if self.mesh is not None:
            self.mesh.close()  # the workers that are alive see the session end and wait for a root again
        deadline = time.monotonic() + max(10.0, 2 * self.timeout_ms / 1000)
        alive = [address for address in self.addresses if self._answers(address, deadline)]
        lost = [address for address in self.addresses if address not in alive]
        if not lost:
            return None
        # with none left, the root alone (still a ClusterTransport: it knows how to ask the lost back)
        return ClusterTransport(alive, self.secret, self.timeout_ms, self.log), lost

    def with_workers(self, returning: list[str]) -> tuple[Transport, list[str]] | None:
        """The workers of `returning` that answer again, with this transport's: a transport over
        all of them (this session ended) and the names that came back; None if none answers."""
        back = [address for address in returning if self._answers(address, time.monotonic())]
        if not back:
            return None
        self.close()
        return ClusterTransport(self.addresses + back, self.secret, self.timeout_ms, self.log), back

    def _answers(self, address: str, deadline: float) -> bool:
        """Whether the worker at `address` completes a handshake (then hung up on: it waits for the
        next root), retrying a busy one until `deadline`."""
        while True:
            try:
                sock, _, _ = self._handshake(address, self.secret, {})
            except EngineError as error:
                if "is busy with another root" in str(error) and time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                return False
            sock.close()
            return True

    def close(self) -> None:
        """End the session on every worker and wait (briefly) until each has closed its side, so
        that when this returns the workers are ready for the next root."""
        for sock in self.socks:  # connected, never set up
            sock.close()
        self.socks = []
        if self.mesh is None:
            return
        try:
            if not self.mesh.closed:
                for node in range(1, len(self.names)):
                    try:
                        self.mesh.send_message(node, p.End().encode(), "ending the session")
                    except ConnectionError:
                        pass
                for node in range(1, len(self.names)):
                    try:
                        self.mesh.wait_readable(node, 5000)  # the worker closing its end reads as EOF
                    except ConnectionError:
                        pass
        finally:
            self.mesh.close()


def cluster_engine(model_path: str | os.PathLike[str], workers: list[str], *, secret: str | None = None,
                   timeout_ms: int = DEFAULT_TIMEOUT_MS, log: Callable[[str], None] = print,
                   **options: Any) -> Engine:
    """The engine with this computer as the root of `workers` (none: this computer alone, the
    cluster of size 1). `options` are Engine's."""
    transport = ClusterTransport(workers, secret, timeout_ms, log) if workers else None
    return Engine(model_path, transport, log=log, **options)

