"""The engine: one model over one transport, this node being the root.

One node alone is the cluster of size 1 (transport.Loopback); a cluster of N is the same
engine over cluster/root.py's ClusterTransport. Everything else is written once: opening the
model, the plan, the context length, loading this node's weights, the embedding, every step,
the logits exchange (exchange.py) and sampling (`next_token`). The generator
(generation/generator.py) calls only what `Engine` declares here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dllama_py.engine.exchange import FULL, Collected, Exchange, LogitsMode, Readout
from dllama_py.engine.loader import choose_layout, load_node_weights
from dllama_py.engine.sampler import Sampler
from dllama_py.engine.transport import BUFFER_TYPES, Loopback, NodeReport, Session, Transport
from dllama_py.formats.model_file import ModelFile, read_model
from dllama_py.model import kernels
from dllama_py.model.config import FloatType, ModelConfig
from dllama_py.model.forward import NodeForward
from dllama_py.model.plan import Plan, PlanError, auto_shares

MAX_TOP_LOGPROBS = 20  # OpenAI's limit; within the TOPK candidates every node sends


@dataclass
class TokenLogprobs:
    """A chosen token's log-probability and the most likely tokens' (id, log-probability), best first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


class EngineError(RuntimeError):
    """The engine cannot run as asked; the message says what to change."""


@dataclass
class StepStats:
    """Timing and traffic of one step (one batch of tokens through the model)."""

    tokens: int
    compute_ms: float
    sync_ms: float = 0.0
    bytes_sent: int = 0  # by this node (the root)
    bytes_received: int = 0
    # (bytes sent, bytes received) by every node of a cluster since the last step that reported
    # them (prompt batches whose logits nobody reads report nothing; their bytes count later)
    node_bytes: list[tuple[int, int]] | None = None
    # milliseconds every node spent waiting for the others in syncs, over the same steps: the
    # slowest node waits least (give it a smaller --shares)
    node_wait_ms: list[float] | None = None


@dataclass
class EngineInfo:
    """What a user-facing command shows about a loaded engine."""

    nodes: int
    plan_text: str
    weight_type: str
    buffer_type: str
    seq_len: int
    threads: int
    notes: list[str] = field(default_factory=list)


def known_available_memory() -> int | None:
    """Bytes of RAM the kernel says are available (MemAvailable), or None where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory() -> int:
    """Bytes of RAM the kernel says are available (MemAvailable), or 8 GiB if unknown."""
    known = known_available_memory()
    return 8 << 30 if known is None else known


def memory_shortfall(plan: Plan, node: int, seq_len: int, kv_storage: str) -> str | None:
    """Why worker node `node` (>= 1) of `plan` cannot fit in this computer's available RAM, or
    None (also when the available RAM is unknown)."""
    available = known_available_memory()
    weights = plan.node_weight_bytes(node)
    kv = plan.node_kv_cache_bytes(node, seq_len) if kv_storage == "ram" else 0
    if available is None or weights + kv <= available:
        return None
    return (f"node {node} needs {(weights + kv) / 2**30:.2f} GiB ({weights / 2**30:.2f} GiB of weights, "
            f"{kv / 2**30:.2f} GiB of KV cache for {seq_len} positions) but this computer has "
            f"{available / 2**30:.2f} GiB available; use more nodes, a shorter --max-seq-len or "
            "--kv-cache-storage disk")


def choose_seq_len(config: ModelConfig, plan: Plan, requested: int | None, node: int = 0) -> tuple[int, str | None]:
    """The KV cache length: the model's, or `requested` (which may only lower it), capped so the
    cache takes at most half of the available RAM. Returns (length, message or None)."""
    if requested is not None and requested <= 0:
        raise EngineError(f"--max-seq-len must be positive, got {requested}")
    if requested is not None and requested > config.max_seq_len:
        return config.max_seq_len, (f"--max-seq-len {requested} is above the model's context of "
                                    f"{config.max_seq_len}; using {config.max_seq_len}")
    seq_len = requested or config.max_seq_len
    per_position = plan.node_kv_cache_bytes(node, 1)
    budget = available_memory() // 2
    if requested is None and seq_len * per_position > budget:
        capped = max(256, budget // per_position // 256 * 256)
        if capped < seq_len:
            return capped, (f"the model's context of {seq_len} tokens needs "
                            f"{seq_len * per_position / 2**30:.1f} GiB of KV cache; using {capped} tokens "
                            f"({capped * per_position / 2**30:.1f} GiB) to fit in memory "
                            "(set --max-seq-len to choose)")
    return seq_len, None


def default_buffer_type(config: ModelConfig) -> str:
    """A cluster's buffer type: q80 for quantized weights (as distributed-llama requires), f32 otherwise."""
    return "q80" if config.weight_float_type in (FloatType.Q40, FloatType.Q80) else "f32"


def open_model(path: str | os.PathLike[str]) -> ModelFile:
    """Open a `.m` file; a missing or unreadable file becomes an EngineError with the path."""
    p = Path(path)
    if not p.is_file():
        raise EngineError(f"model file not found: {p}")
    return read_model(p)


class Engine:
    """The model on this node (node 0) and on every other node its transport reaches.

    `transport` None is this node alone. `shares` (one number per node, root first, or "auto"
    for every node's measured matmul speed and available RAM) sizes each node's part; `log`
    receives the plan and what the cluster reports while starting.
    """

    def __init__(self, model_path: str | os.PathLike[str], transport: Transport | None = None, *,
                 threads: int | None = None, buffer_type: str | None = None, max_seq_len: int | None = None,
                 kv_storage: str = "ram", max_batch: int = 32, mmap_weights: bool = False,
                 shares: list[float] | str | None = None, log: Callable[[str], None] | None = None,
                 progress: bool = True) -> None:
        self.transport = transport if transport is not None else Loopback()
        self.log = log or (lambda message: None)
        self.model = open_model(model_path)
        self.config = c = self.model.config
        self.buffer_type = buffer_type or self.transport.default_buffer_type(c)
        if self.buffer_type not in BUFFER_TYPES:
            raise EngineError(f"--buffer-float-type must be one of {', '.join(BUFFER_TYPES)}")
        if threads is not None:
            kernels.set_num_threads(threads)
        n_nodes = len(self.transport.names)
        auto = shares == "auto"
        try:
            plan = Plan.make(c, n_nodes, None if auto else shares)  # refuses a bad count before connecting
        except PlanError as error:
            raise EngineError(str(error)) from None
        self.max_batch = max_batch
        self.forward: NodeForward | None = None
        try:
            reports = self.transport.connect()
            if auto:
                shares = self._auto_shares(plan, reports, max_seq_len)
                plan = Plan.make(c, n_nodes, shares)
            self.plan = plan
            self.seq_len, note = choose_seq_len(c, plan, max_seq_len)
            self.log(plan.describe(self.seq_len, self.transport.names))
            session = Session(c, list(shares) if shares is not None else None, self.buffer_type, self.seq_len,
                              max_batch, kv_storage)
            self.transport.start(session, plan, self.model, progress)
            layout = choose_layout(c, mmap_weights)
            weights = load_node_weights(self.model, plan, 0, layout, mmap_weights, progress)
            sync = self.transport.sync(self.buffer_type, max_batch, c.dim)
            self.forward = NodeForward(plan, 0, weights, sync, self.seq_len, max_batch, kv_storage, layout)
            if not mmap_weights:
                self.model.release()  # the weights were copied (or regrouped) out of the mapping
            self.transport.wait_loaded()
        except PlanError as error:
            self.close()
            raise EngineError(str(error)) from None
        except ConnectionError as error:
            self.close()
            raise EngineError(str(error)) from None
        except BaseException:
            self.close()
            raise
        self.layout = layout
        self.embedding = self.model["embedding"]
        self.exchange = Exchange(plan, 0)
        self.x = np.zeros((max_batch, c.dim), dtype=np.float32)
        self._local: np.ndarray | None = None  # this node's logits slice of the last step
        self._readout = FULL
        self._collected = Collected()
        self._counters = [(0, 0, 0.0)] * plan.n_nodes  # every node's counters, last reported
        self.topk_hits = self.topk_misses = 0  # samples taken from the nodes' top tokens / from every logit
        self.info = EngineInfo(plan.n_nodes, plan.describe(self.seq_len, self.transport.names),
                               c.weight_float_type.label, self.buffer_type, self.seq_len,
                               kernels.get_num_threads(), [note] if note else [])

    def _auto_shares(self, plan: Plan, reports: list[NodeReport], max_seq_len: int | None) -> list[float]:
        """Every node's share in proportion to how fast it runs the decoding matmul, within what
        its RAM holds."""
        speeds = [kernels.measure_matmul_speed()] + [r.speed_gbps for r in reports]
        memories = [known_available_memory()] + [r.memory for r in reports]
        seq_len, _ = choose_seq_len(self.config, plan, max_seq_len)
        need = sum(plan.node_weight_bytes(i) + plan.node_kv_cache_bytes(i, seq_len)
                   for i in range(plan.n_nodes)) - plan.embedding_bytes()
        shares = auto_shares(speeds, memories, need, self.transport.names)
        self.log("matmul speed (GB/s of q40 weights): "
                 + ", ".join(f"{name} {gbps:.1f}" for name, gbps in zip(self.transport.names, speeds))
                 + f"; shares {' '.join(f'{x:g}' for x in shares)}")
        return shares

    # ---- steps ----------------------------------------------------------------------------
    def readout_for(self, sampler: Sampler, vocab_limit: int) -> Readout:
        """What a step must keep of its logits for `sampler` to choose the next token among ids
        below `vocab_limit` (and report log-probabilities if it asks): the best token (greedy),
        every node's top tokens (nucleus; and log-probabilities, which are those of temperature 1),
        or every logit (a sampler that shapes or filters them, or one whose temperature differs
        from the log-probabilities')."""
        if sampler.needs_all_logits:
            return Readout(LogitsMode.FULL, vocab_limit=vocab_limit)
        if sampler.logprobs is not None:
            if sampler.greedy or (sampler.nucleus and sampler.temperature == 1.0):
                return Readout(LogitsMode.TOPK, temperature=1.0, vocab_limit=vocab_limit)
            return Readout(LogitsMode.FULL, vocab_limit=vocab_limit)
        if sampler.greedy:
            return Readout(LogitsMode.ARGMAX, vocab_limit=vocab_limit)
        if sampler.nucleus:
            return Readout(LogitsMode.TOPK, temperature=sampler.temperature, vocab_limit=vocab_limit)
        return Readout(LogitsMode.FULL, vocab_limit=vocab_limit)

    def step(self, tokens: list[int], start_pos: int, readout: Readout = FULL) -> StepStats:
        """Evaluate `tokens` at positions start_pos.. (at most max_batch of them) on every node;
        `readout` says what the next call reads of the logits, so the nodes send only that."""
        start = time.perf_counter()
        B = len(tokens)
        if not 0 < B <= self.max_batch:
            raise EngineError(f"a step takes 1 to {self.max_batch} tokens, got {B}")
        sent0, received0, sync0 = self.transport.counters()
        x = self.x[:B]
        kernels.embedding(self.embedding, np.asarray(tokens, dtype=np.int32), x)
        positions = np.arange(start_pos, start_pos + B, dtype=np.int32)
        self._readout, self._collected = readout, Collected()
        try:
            self.transport.send_step(readout, start_pos, x)
            self._local = self.forward.forward(x, positions, readout.all_rows,
                                               logits=readout.mode != LogitsMode.NONE)
            gather_start = time.perf_counter()
            if readout.mode != LogitsMode.NONE:
                self._collect(readout)
            gather_s = time.perf_counter() - gather_start if self.plan.n_nodes > 1 else 0.0
        except ConnectionError as error:
            raise EngineError(f"the cluster failed: {error}") from None
        elapsed = time.perf_counter() - start
        sent, received, sync = self.transport.counters()
        sync_s = sync - sync0 + gather_s
        stats = StepStats(B, (elapsed - sync_s) * 1e3, sync_s * 1e3, sent - sent0, received - received0)
        counters = self._collected.counters
        if counters is not None and self.plan.n_nodes > 1:
            counters[0] = (sent, received, sync)
            stats.node_bytes = [(s - s0, r - r0) for (s, r, _), (s0, r0, _) in zip(counters, self._counters)]
            stats.node_wait_ms = [(w - w0) * 1e3 for (_, _, w), (_, _, w0) in zip(counters, self._counters)]
            self._counters = counters
        return stats

    def _collect(self, readout: Readout) -> None:
        """Every node's part of the last step's logits, as `readout` asks, read at the root."""
        rows = self._local.shape[0]
        offsets, sizes = self.exchange.layout(readout, rows)
        part = self.exchange.part(readout, self._local, (0, 0, 0.0))  # the root's counters are read locally
        label = {LogitsMode.ARGMAX: "collecting the best token", LogitsMode.TOPK: "collecting top tokens"}
        buf = self.transport.gather(part, offsets, sizes, label.get(readout.mode, "collecting logits"))
        self._collected = self.exchange.combine(readout, buf, rows)

    def _full_logits(self) -> np.ndarray:
        """The last step's logits (rows, vocab), fetched from every node if the step kept less."""
        if self._collected.logits is None:
            if self._local is None or self._local.shape[0] == 0:
                raise EngineError("the last step did not compute logits")
            try:
                self.transport.send_logits_request()
                self._collect(Readout(LogitsMode.FULL, all_rows=self._readout.all_rows))
            except ConnectionError as error:
                raise EngineError(f"the cluster failed: {error}") from None
        return self._collected.logits

    def logits(self) -> np.ndarray:
        """Logits of the last step: (vocab,) for its last token, or (B, vocab) when it kept every row."""
        logits = self._full_logits()
        return logits[0] if logits.shape[0] == 1 else logits

    def argmax(self) -> int:
        """The most likely next token after the last step (first index on ties)."""
        if self._collected.argmax is not None:
            return self._collected.argmax
        return int(np.argmax(self._full_logits()[-1]))

    def next_token(self, sampler: Sampler) -> int:
        """The token `sampler` chooses after the last step, which ran with `readout_for(sampler, ...)`:
        the best token; or a nucleus sample from the nodes' top tokens when they hold the whole
        nucleus, else from every logit (fetched for this step only); or a sample from every logit."""
        readout = self._readout
        limit = self.exchange.limit(readout)
        c = self._collected.candidates
        if sampler.greedy and not sampler.needs_all_logits:
            if readout.mode == LogitsMode.ARGMAX:
                return self.argmax()
            if c is not None:  # the best token is every node's first candidate; ties go to the lowest id
                return int(c.ids[np.lexsort((c.ids, -c.probs))[0]])
            return int(np.argmax(self._full_logits()[-1][:limit]))
        if sampler.greedy:
            return sampler.sample(self._full_logits()[-1][:limit])
        coin = sampler.random_f32()
        if c is not None and sampler.nucleus and not sampler.needs_all_logits:
            complete = c.every_token_sent or c.unsent_bound < sampler.cutoff(limit)
            choice = sampler.choose(c.ids, c.probs, coin, limit, complete, c.unsent_bound)
            if choice is not None:
                self.topk_hits += 1
                return choice
            self.topk_misses += 1
        return sampler.sample_with_coin(self._full_logits()[-1][:limit], coin)

    def logprobs(self, token: int, top: int) -> TokenLogprobs:
        """The log-probability of `token` after the last step, and the `top` most likely tokens
        with theirs (at most TOPK_LOGPROBS), under the model's own distribution (temperature 1,
        no penalties, bias or grammar) over ids below the step's vocabulary limit. Read from the
        nodes' top tokens when the step kept them at temperature 1 and they hold `token`, else
        from every logit."""
        if top > MAX_TOP_LOGPROBS:
            raise EngineError(f"at most {MAX_TOP_LOGPROBS} top log-probabilities, asked for {top}")
        readout = self._readout
        c = self._collected.candidates
        if self._collected.logits is None and c is not None and readout.temperature == 1.0:
            hit = np.flatnonzero(c.ids == token)
            if len(hit):
                order = np.lexsort((c.ids, -c.probs))[:top]
                with np.errstate(divide="ignore"):
                    return TokenLogprobs(token, float(np.log(c.probs[hit[0]])),
                                         [(int(c.ids[i]), float(np.log(c.probs[i]))) for i in order])
        row = self._full_logits()[-1][:self.exchange.limit(readout)].astype(np.float64)
        top_value = row.max()
        log_z = top_value + np.log(np.exp(row - top_value).sum())
        order = np.argsort(-row, kind="stable")[:top]  # stable: ties by id
        return TokenLogprobs(token, float(row[token] - log_z), [(int(i), float(row[i] - log_z)) for i in order])

    def check_alive(self) -> None:
        """Between steps: raise EngineError naming a worker that went away (died or restarted)."""
        try:
            self.transport.check_alive()
        except ConnectionError as error:
            raise EngineError(str(error)) from None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the session on every worker and free the KV cache."""
        try:
            self.transport.close()
        finally:
            if self.forward is not None:
                self.forward.close()
