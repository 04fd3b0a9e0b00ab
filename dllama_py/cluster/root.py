"""The root of a cluster: connect to the workers, ship their slices, drive every step.

`ClusterEngine` has the interface of `engine.LocalEngine`: the generator, `dllama inference`,
`dllama chat` and `dllama-api` use either. The root memory-maps the model and keeps only its
own slice resident; each worker's slice is cut from the mapping and streamed to it.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable

import numpy as np

from dllama_py import _core, kernels
from dllama_py.cluster import logits as L
from dllama_py.cluster import protocol as p
from dllama_py.cluster.slice_cache import model_fingerprint
from dllama_py.cluster.sync import MeshSync, net_spin_us, open_mesh
from dllama_py.engine import (
    BUFFER_TYPES,
    EngineError,
    EngineInfo,
    StepStats,
    choose_seq_len,
    default_buffer_type,
    known_available_memory,
    load_node_weights,
    open_model,
)
from dllama_py.forward import NodeForward, will_regroup
from dllama_py.plan import Plan, PlanError, cut_tensor
from dllama_py.sampler import Sampler

CONNECT_TIMEOUT_S = 10.0
DEFAULT_TIMEOUT_MS = 8000  # a silent worker is declared dead after this long


AUTO_SHARE_STEPS = 20  # --shares auto rounds every node's share to 1/20 of the whole


MEMORY_HEADROOM = 0.9  # --shares auto plans at most this part of a node's available RAM


def auto_shares(speeds: list[float], memories: list[int | None] | None = None, need: int = 0,
                names: list[str] | None = None) -> list[float]:
    """Shares in proportion to the nodes' speeds, rounded to 5% steps (at least one step each):
    measurements move a little from run to run, and a plan that stays the same keeps using the
    workers' slice caches. With `memories` (bytes each node has available, None if unknown) and
    `need` (bytes the whole model needs: weights and KV cache), no node gets more of the model
    than 90% of its RAM holds; the rest goes to the others, again by speed. Raises PlanError
    when all of them together cannot hold it."""
    n = len(speeds)
    speeds = [x if math.isfinite(x) and x > 0 else 1.0 for x in speeds]  # a failed probe counts as slow
    if min(speeds) < max(speeds) * 1e-3:  # no node below 0.1% of the fastest
        speeds = [max(x, max(speeds) * 1e-3) for x in speeds]
    caps = [float("inf")] * n
    if memories and need > 0:
        caps = [MEMORY_HEADROOM * m / need if m else float("inf") for m in memories]
        if sum(min(cap, 1.0) for cap in caps) < 1.0:
            have = " ".join(f"{(names or [str(i) for i in range(n)])[i]} {m / 2**30:.1f} GiB"
                            for i, m in enumerate(memories) if m)
            raise PlanError(f"the model needs {need / 2**30:.1f} GiB (weights and KV cache) and the nodes have "
                            f"less than that available together ({have}; {MEMORY_HEADROOM:.0%} of it is planned): "
                            "add a node or use a shorter --max-seq-len")
    fixed: dict[int, float] = {}  # nodes held to what their RAM allows
    while True:
        rest = [i for i in range(n) if i not in fixed]
        left = 1.0 - sum(fixed.values())
        speed = sum(speeds[i] for i in rest)
        part = {i: left * speeds[i] / speed for i in rest}
        over = [i for i in rest if part[i] > caps[i]]
        if not over:
            break
        fixed.update({i: caps[i] for i in over})
    part.update(fixed)
    # Capped nodes round down, so that rounding never hands a node more than its RAM holds.
    return [float(max(1, int(AUTO_SHARE_STEPS * part[i]) if i in fixed else round(AUTO_SHARE_STEPS * part[i])))
            for i in range(n)]


class ClusterEngine:
    """The model on this computer (node 0) and on every worker in `workers` (nodes 1..N)."""

    def __init__(self, model_path: str | os.PathLike[str], workers: list[str], threads: int | None = None,
                 buffer_type: str | None = None, max_seq_len: int | None = None, kv_storage: str = "ram",
                 max_batch: int = 32, secret: str | None = None, log: Callable[[str], None] = print,
                 timeout_ms: int = DEFAULT_TIMEOUT_MS, progress: bool = True, mmap_weights: bool = False,
                 shares: list[float] | str | None = None) -> None:
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
        self.model = open_model(model_path)
        self.config = c = self.model.config
        self.buffer_type = buffer_type or default_buffer_type(c)
        if self.buffer_type not in BUFFER_TYPES:
            raise EngineError(f"--buffer-float-type must be one of {', '.join(BUFFER_TYPES)}")
        if threads is not None:
            kernels.set_num_threads(threads)
        auto = shares == "auto"
        try:
            self.plan = Plan.make(c, 1 + len(addresses), None if auto else shares)  # refuses bad counts early
        except PlanError as error:
            raise EngineError(str(error)) from None
        self.max_batch = max_batch
        self.addresses = ["root"] + addresses
        self.log = log
        self.model_id = model_fingerprint(self.model)
        self.cached = [False] * self.plan.n_nodes  # which workers read their slices from their cache
        socks, speeds, memories = self._handshakes(addresses, secret)
        try:
            if auto:  # every node's share in proportion to how fast it runs the decoding matmul
                speeds = [kernels.measure_matmul_speed()] + speeds
                memories = [known_available_memory()] + memories
                seq_len, _ = choose_seq_len(c, self.plan, max_seq_len)
                need = sum(self.plan.node_weight_bytes(i) + self.plan.node_kv_cache_bytes(i, seq_len)
                           for i in range(self.plan.n_nodes)) - self.plan.embedding_bytes()
                try:
                    shares = auto_shares(speeds, memories, need, self.addresses)
                    log("matmul speed (GB/s of q40 weights): "
                        + ", ".join(f"{name} {gbps:.1f}" for name, gbps in zip(self.addresses, speeds))
                        + f"; shares {' '.join(f'{x:g}' for x in shares)}")
                    self.plan = Plan.make(c, 1 + len(addresses), shares)
                except PlanError as error:
                    raise EngineError(str(error)) from None
            self.seq_len, note = choose_seq_len(c, self.plan, max_seq_len)
            log(self.plan.describe(self.seq_len, self.addresses))
            self.mesh = self._setup(socks, addresses, kv_storage, timeout_ms, shares)
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        try:
            self._ship_weights(progress)
            weights = load_node_weights(self.model, self.plan, 0, mmap_weights or will_regroup(c), progress)
            self.sync = MeshSync(self.mesh, 0, self.plan.n_nodes, self.buffer_type, max_batch, c.dim)
            self.forward = NodeForward(self.plan, 0, weights, self.sync, self.seq_len, max_batch, kv_storage,
                                       regroup=not mmap_weights, release=self.model.release)
            if not mmap_weights:
                self.model.release()  # the weights were copied (or regrouped) out of the mapping
            self._wait_loaded()
            self.mesh.reset_counters()  # per-step traffic starts here (workers reset too)
        except BaseException:
            self.mesh.close()
            raise
        self.embedding = self.model["embedding"]
        self.x = np.zeros((max_batch, c.dim), dtype=np.float32)
        self._last: np.ndarray | None = None
        self._argmax: int | None = None
        self._candidates: L.Candidates | None = None
        self._local = np.zeros((1, self.plan.nodes[0].vocab_width), dtype=np.float32)
        self._temperature, self._vocab_limit = 1.0, c.vocab_size
        self.topk_hits = self.topk_misses = 0  # samples taken from top tokens / from every logit
        self._counters = [(0, 0, 0.0)] * self.plan.n_nodes  # every node's counters, last reported
        self._node_bytes: list[tuple[int, int]] | None = None
        self._node_wait_ms: list[float] | None = None
        self._logits_buf = np.zeros(max(sum(L.full_layout(self.plan, max_batch)[1]),
                                        sum(L.topk_layout(self.plan.n_nodes)[1])), dtype=np.uint8)
        self.info = EngineInfo(self.plan.n_nodes, self.plan.describe(self.seq_len, self.addresses),
                               c.weight_float_type.label, self.buffer_type, self.seq_len,
                               kernels.get_num_threads(), [note] if note else [])

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

    def _setup(self, socks: list[socket.socket], addresses: list[str], kv_storage: str, timeout_ms: int,
               shares: list[float] | None) -> _core.Mesh:
        """Send every worker its setup, wait until the workers are connected to each other, and
        hand the sockets to a Mesh (which owns them from then on)."""
        session = p.new_nonce().hex()
        for index, sock in enumerate(socks, start=1):
            setup = p.Setup(session, index, self.addresses, [(int(k), v) for k, v in self.config.header_items()],
                            self.buffer_type, self.seq_len, self.max_batch, kv_storage, timeout_ms,
                            self.model_id, list(shares) if shares is not None else None)
            try:
                p.send_frame(sock, p.pack(p.MsgType.SETUP, setup.encode()))
            except OSError as error:
                raise EngineError(f"worker {addresses[index - 1]} went away during setup: {error}") from None
        for node, (address, sock) in enumerate(zip(addresses, socks), start=1):
            sock.settimeout(CONNECT_TIMEOUT_S * 4)
            try:
                kind, body = p.unpack(p.recv_frame(sock), (p.MsgType.READY, p.MsgType.ERROR))
            except (OSError, p.ProtocolError) as error:
                raise EngineError(f"worker {address} failed while connecting to the other workers: "
                                  f"{error}") from None
            if kind == p.MsgType.ERROR:
                reason = body.decode("utf-8", errors="replace")
                raise EngineError(f"worker {address} cannot serve this model: {reason}")
            self.cached[node] = body[:1] == bytes([p.READY_HAS_WEIGHTS])
        fds = [-1] + [s.detach() for s in socks]
        return open_mesh(0, len(fds), fds, ["root"] + addresses, timeout_ms, self.spin_us)

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
            _, nonce_w = p.unpack(p.recv_frame(sock), p.MsgType.HELLO_WORKER)
            nonce_r = p.new_nonce()
            p.send_frame(sock, p.pack(p.MsgType.HELLO_ROOT, nonce_r + p.proof(secret, b"root", nonce_w)))
            _, body = p.unpack(p.recv_frame(sock), p.MsgType.WELCOME)
            if body[:1] == bytes([p.Welcome.AUTH_FAILED]):
                raise EngineError(f"worker {address} refused this root: the secrets differ "
                                  "(check --secret / DLLAMA_SECRET on both sides)")
            if body[:1] == bytes([p.Welcome.BUSY]):
                raise EngineError(f"worker {address} is busy with another root")
            if len(body) != 1 + 32 + p.SPEED.size:
                raise p.ProtocolError("malformed WELCOME")
            if not p.proofs_equal(body[1:33], p.proof(secret, b"worker", nonce_r)):
                raise EngineError(f"worker {address} does not know this root's secret "
                                  "(check --secret / DLLAMA_SECRET on both sides)")
            gbps, memory = p.SPEED.unpack_from(body, 33)
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
            address = self.addresses[node]
            if self.cached[node]:
                self.log(f"node {node} ({address}): {total / 2**20:.1f} MiB from its slice cache, nothing shipped")
                continue
            start = time.perf_counter()
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"weights -> node {node} {address}",
                      disable=not progress, leave=True) as bar:
                for tensor in self.model:
                    cut = self.plan.cut(tensor.name, node)
                    if cut.kind == "root":
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
            address = self.addresses[node]
            while True:
                try:
                    kind, _ = p.unpack(self.mesh.recv_message(node, 64, "waiting for the worker to load its weights"),
                                       (p.MsgType.LOADING, p.MsgType.LOADED))
                except ConnectionError as error:
                    raise EngineError(f"worker {address} failed while loading weights: {error}") from None
                if kind == p.MsgType.LOADED:
                    break

    # ---- steps ----------------------------------------------------------------------------
    def configure_sampling(self, temperature: float, vocab_limit: int) -> None:
        """Settings for steps with need='sample': scale logits by 1/temperature and ignore ids at
        or above vocab_limit (ids the tokenizer does not have)."""
        self._temperature, self._vocab_limit = float(temperature), int(vocab_limit)

    def step(self, tokens: list[int], start_pos: int, all_logits: bool = False, need: str = "full") -> StepStats:
        """Evaluate `tokens` on every node; `need` says what the next call reads: 'argmax',
        'full' (logits), 'sample' (`sample()`) or 'none', so workers send only that."""
        start = time.perf_counter()
        sent0, received0, sync0 = self.mesh.bytes_sent, self.mesh.bytes_received, self.sync.seconds
        B = len(tokens)
        if not 0 < B <= self.max_batch:
            raise EngineError(f"a step takes 1 to {self.max_batch} tokens, got {B}")
        modes = {"argmax": p.LogitsMode.ARGMAX, "none": p.LogitsMode.NONE, "sample": p.LogitsMode.TOPK}
        mode = p.LogitsMode.FULL if all_logits else modes.get(need, p.LogitsMode.FULL)
        x = self.x[:B]
        kernels.embedding(self.embedding, np.asarray(tokens, dtype=np.int32), x)
        flags = p.STEP_ALL_LOGITS if all_logits else 0
        header = p.STEP.pack(flags, int(mode), B, start_pos, self._temperature, self._vocab_limit)
        message = p.pack(p.MsgType.STEP, header + x.tobytes())
        positions = np.arange(start_pos, start_pos + B, dtype=np.int32)
        try:
            for node in range(1, self.plan.n_nodes):
                self.mesh.send_message(node, message, f"sending step at position {start_pos}")
            self._local = self.forward.forward(x, positions, all_logits, logits=mode != p.LogitsMode.NONE)
            gather_start = time.perf_counter()
            self._collect(mode)
            gather_s = time.perf_counter() - gather_start
        except ConnectionError as error:
            raise EngineError(f"the cluster failed: {error}") from None
        elapsed = time.perf_counter() - start
        sync_s = self.sync.seconds - sync0 + gather_s
        return StepStats(B, (elapsed - sync_s) * 1e3, sync_s * 1e3,
                         self.mesh.bytes_sent - sent0, self.mesh.bytes_received - received0, self._node_bytes,
                         self._node_wait_ms)

    def _gather(self, offsets: list[int], sizes: list[int], mine: bytes, label: str) -> np.ndarray:
        buf = self._logits_buf[: offsets[-1] + sizes[-1]]
        buf[: sizes[0]] = np.frombuffer(L.with_counters(mine, 0, 0, 0.0), dtype=np.uint8)
        self.mesh.gather(0, buf, offsets, sizes, label)
        counters = L.counters_of(buf, offsets, sizes)
        counters[0] = (self.mesh.bytes_sent, self.mesh.bytes_received, self.sync.seconds)
        self._node_bytes = [(s - s0, r - r0) for (s, r, _), (s0, r0, _) in zip(counters, self._counters)]
        self._node_wait_ms = [(w - w0) * 1e3 for (_, _, w), (_, _, w0) in zip(counters, self._counters)]
        self._counters = counters
        return buf

    def _collect(self, mode: p.LogitsMode) -> None:
        s0, local = self.plan.nodes[0], self._local
        self._last, self._argmax, self._candidates, self._node_bytes = None, None, None, None
        self._node_wait_ms = None
        if mode == p.LogitsMode.ARGMAX:
            offsets, sizes = L.argmax_layout(self.plan.n_nodes)
            mine = L.encode_argmax(local[-1], s0.vocab_start, self._vocab_limit)
            buf = self._gather(offsets, sizes, mine, "collecting the best token")
            self._argmax = L.best_of(buf, offsets)
        elif mode == p.LogitsMode.TOPK:
            offsets, sizes = L.topk_layout(self.plan.n_nodes)
            mine = L.encode_topk(local[-1], s0.vocab_start, self._vocab_limit, self._temperature)
            self._candidates = L.Candidates(self._gather(offsets, sizes, mine, "collecting top tokens"), offsets)
        elif mode == p.LogitsMode.FULL:
            self._gather_full()

    def _gather_full(self) -> None:
        rows = self._local.shape[0]
        offsets, sizes = L.full_layout(self.plan, rows)
        buf = self._gather(offsets, sizes, self._local.tobytes(), "collecting logits")
        parts = [buf[o:o + n - L.COUNTERS.size].view(np.float32).reshape(rows, -1) for o, n in zip(offsets, sizes)]
        self._last = np.concatenate(parts, axis=1)

    def sample(self, sampler: Sampler) -> int:
        """Sample the next token after a step with need='sample': from the nodes' top tokens when
        they hold the whole nucleus, else from every logit (fetched for this step only)."""
        coin = sampler.random_f32()
        c = self._candidates
        if c is not None and sampler.nucleus:
            cutoff = (1.0 - sampler.topp) / (self._vocab_limit - 1) if self._vocab_limit > 1 else 0.0
            complete = c.every_token_sent or c.unsent_bound < cutoff
            choice = sampler.choose(c.ids, c.probs, coin, self._vocab_limit, complete, c.unsent_bound)
            if choice is not None:
                self.topk_hits += 1
                return choice
        if self._last is None:
            try:
                for node in range(1, self.plan.n_nodes):
                    self.mesh.send_message(node, p.pack(p.MsgType.LOGITS), "asking for logits")
                self._gather_full()
            except ConnectionError as error:
                raise EngineError(f"the cluster failed: {error}") from None
        self.topk_misses += 1
        logits = self._last[-1][: self._vocab_limit]
        return sampler.sample_with_coin(logits, coin)

    def logits(self) -> np.ndarray:
        if self._last is None:
            raise EngineError("the last step did not collect logits")
        return self._last[0] if self._last.shape[0] == 1 else self._last

    def argmax(self) -> int:
        if self._argmax is not None:
            return self._argmax
        logits = self.logits()
        return int(np.argmax(logits if logits.ndim == 1 else logits[-1]))

    def check_workers(self) -> None:
        """Between steps, raise EngineError naming any worker whose connection closed (it died or
        restarted): an idle worker never sends anything, so readable means gone."""
        for node in range(1, self.plan.n_nodes):
            try:
                gone = self.mesh.wait_readable(node, 0)
            except ConnectionError as error:
                raise EngineError(f"the cluster failed: {error}") from None
            if gone:
                raise EngineError(f"worker {self.addresses[node]} closed its connection while idle")

    def close(self) -> None:
        """End the session on every worker and wait (briefly) until each has closed its side, so
        that when this returns the workers are ready for the next root; free the cache."""
        try:
            if not self.mesh.closed:
                for node in range(1, self.plan.n_nodes):
                    try:
                        self.mesh.send_message(node, p.pack(p.MsgType.END), "ending the session")
                    except ConnectionError:
                        pass
                for node in range(1, self.plan.n_nodes):
                    try:
                        self.mesh.wait_readable(node, 5000)  # the worker closing its end reads as EOF
                    except ConnectionError:
                        pass
        finally:
            self.mesh.close()
            self.forward.close()

