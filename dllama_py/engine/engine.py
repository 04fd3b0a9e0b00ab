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

from dllama_py.engine.exchange import FULL, NO_LOGITS, Collected, Exchange, LogitsMode, Readout, Segment
from dllama_py.engine.loader import choose_layout, load_node_weights
from dllama_py.engine.sampler import Sampler
from dllama_py.engine.transport import BUFFER_TYPES, Loopback, NodeReport, Session, Transport
from dllama_py.formats.gguf_file import GGUFModel, is_gguf
from dllama_py.formats.model_file import ModelFile, read_model
from dllama_py.model import kernels
from dllama_py.model.config import FloatType, ModelConfig
from dllama_py.model.forward import NodeForward
from dllama_py.model.plan import Plan, PlanError, auto_shares

MAX_TOP_LOGPROBS = 20  # OpenAI's limit; within the TOPK candidates every node sends
MAX_SLOTS = 256  # KV-cache slots (sequences at once); the STEP message carries a slot in 16 bits


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


def memory_shortfall(plan: Plan, node: int, seq_len: int, kv_storage: str, slots: int = 1) -> str | None:
    """Why worker node `node` (>= 1) of `plan` cannot fit in this computer's available RAM, or
    None (also when the available RAM is unknown)."""
    available = known_available_memory()
    weights = plan.node_weight_bytes(node)
    kv = plan.node_kv_cache_bytes(node, seq_len) * slots if kv_storage == "ram" else 0
    if available is None or weights + kv <= available:
        return None
    return (f"node {node} needs {(weights + kv) / 2**30:.2f} GiB ({weights / 2**30:.2f} GiB of weights, "
            f"{kv / 2**30:.2f} GiB of KV cache for {slots} x {seq_len} positions) but this computer has "
            f"{available / 2**30:.2f} GiB available; use more nodes, a shorter --max-seq-len or "
            "--kv-cache-storage disk")


def choose_seq_len(config: ModelConfig, plan: Plan, requested: int | None, node: int = 0,
                   slots: int = 1) -> tuple[int, str | None]:
    """The KV cache length: the model's, or `requested` (which may only lower it), capped so the
    cache of `slots` sequences takes at most half of the available RAM. Returns (length, message or None)."""
    if requested is not None and requested <= 0:
        raise EngineError(f"--max-seq-len must be positive, got {requested}")
    if requested is not None and requested > config.max_seq_len:
        return config.max_seq_len, (f"--max-seq-len {requested} is above the model's context of "
                                    f"{config.max_seq_len}; using {config.max_seq_len}")
    seq_len = requested or config.max_seq_len
    per_position = plan.node_kv_cache_bytes(node, 1) * slots
    budget = available_memory() // 2
    if requested is None and seq_len * per_position > budget:
        capped = max(256, budget // per_position // 256 * 256)
        if capped < seq_len:
            return capped, (f"the model's context of {seq_len} tokens needs "
                            f"{seq_len * per_position / 2**30:.1f} GiB of KV cache; using {capped} tokens "
                            f"({capped * per_position / 2**30:.1f} GiB) to fit in memory "
                            "(set --max-seq-len to choose)")
    return seq_len, None


ON_NODE_LOSS = ("replan", "stop")  # continue on the remaining nodes, or stop with an error naming the node
AUTO_SLOTS = (4, 8)  # slots="auto": at least 4 (the context shortens to fit them), at most 8


def auto_slots(config: ModelConfig, plan: Plan, requested: int | None,
               memories: list[int | None]) -> tuple[int, str]:
    """How many sequences to serve at once when the user did not say: as many as half of the RAM
    left after the weights holds on every node (memories: each node's available bytes, None
    unknown) at the context asked for, within AUTO_SLOTS. Returns (slots, why)."""
    seq_len = min(requested or config.max_seq_len, config.max_seq_len)
    fits = []
    for node, memory in enumerate(memories):
        if memory is None:
            continue
        left = memory - plan.node_weight_bytes(node) + (plan.embedding_bytes() if node == 0 else 0)
        fits.append(max(0, left // 2) // max(1, plan.node_kv_cache_bytes(node, seq_len)))
    fit = min(fits) if fits else AUTO_SLOTS[0]
    slots = int(min(AUTO_SLOTS[1], max(AUTO_SLOTS[0], fit)))
    per_slot = plan.node_kv_cache_bytes(0, seq_len) / 2**20
    return slots, (f"{slots} sequences at once: half of the RAM left after the weights holds {fit} KV slots of "
                   f"{seq_len} positions ({per_slot:.1f} MiB each on the root); between {AUTO_SLOTS[0]} and "
                   f"{AUTO_SLOTS[1]} are used (--parallel sets it)")


def default_buffer_type(config: ModelConfig) -> str:
    """A cluster's buffer type: q80 for quantized weights (as distributed-llama requires), f32 otherwise."""
    return "q80" if config.weight_float_type in (FloatType.Q40, FloatType.Q80) else "f32"


def open_model(path: str | os.PathLike[str], weight_type: str | None = None,
               log: Callable[[str], None] | None = None) -> ModelFile | GGUFModel:
    """Open a `.m` or a GGUF file (told apart by their first bytes); a missing file becomes an
    EngineError with the path. `weight_type` (q40, q80) is what a GGUF's other quantized types
    become; a `.m` file has no other types."""
    p = Path(path)
    if not p.is_file():
        raise EngineError(f"model file not found: {p}")
    if is_gguf(p):
        return GGUFModel(p, weight_type, log)
    if weight_type is not None:
        raise EngineError(f"--weight-type applies to GGUF files; {p.name} is a .m file, whose weights are "
                          "already q40/q80/f16/f32")
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
                 progress: bool = True, slots: int | str = 1, weight_type: str | None = None,
                 on_node_loss: str = "replan") -> None:
        self.transport = transport if transport is not None else Loopback()
        self.log = log or (lambda message: None)
        self.model = open_model(model_path, weight_type, self.log)
        self.config = self.model.config
        self.buffer_type = buffer_type or self.transport.default_buffer_type(self.config)
        if self.buffer_type not in BUFFER_TYPES:
            raise EngineError(f"--buffer-float-type must be one of {', '.join(BUFFER_TYPES)}")
        if on_node_loss not in ON_NODE_LOSS:
            raise EngineError(f"--on-node-loss must be one of {', '.join(ON_NODE_LOSS)}, got {on_node_loss!r}")
        if threads is not None:
            kernels.set_num_threads(threads)
        self.max_batch = max_batch
        if slots != "auto" and not 1 <= slots <= MAX_SLOTS:
            raise EngineError(f"the number of KV-cache slots must lie in 1..{MAX_SLOTS}, got {slots}")
        self.on_node_loss = on_node_loss
        self._options = dict(max_seq_len=max_seq_len, kv_storage=kv_storage, mmap_weights=mmap_weights,
                             progress=progress)
        self.forward: NodeForward | None = None
        self._start(shares, slots)
        self.history: list[list[int]] = [[] for _ in range(self.slots)]  # the tokens each KV slot holds
        self.lost: list[str] = []  # workers lost and planned around (they rejoin when they answer again)

    def _start(self, shares: list[float] | str | None, slots: int | str) -> None:
        """Plan, connect, ship the slices and load this node's own: everything that depends on
        the nodes (at construction, and again after a node is lost or comes back)."""
        c, o = self.config, self._options
        n_nodes = len(self.transport.names)
        auto = shares == "auto"
        try:
            plan = Plan.make(c, n_nodes, None if auto else shares)  # refuses a bad count before connecting
        except PlanError as error:
            raise EngineError(str(error)) from None
        try:
            reports = self.transport.connect()
            if auto:
                shares = self._auto_shares(plan, reports, o["max_seq_len"])
                plan = Plan.make(c, n_nodes, shares)
            if slots == "auto":
                slots, why = auto_slots(c, plan, o["max_seq_len"],
                                        [known_available_memory()] + [r.memory for r in reports])
                self.log(why)
            self.slots = slots
            self.plan = plan
            self.seq_len, note = choose_seq_len(c, plan, o["max_seq_len"], slots=slots)
            self.log(plan.describe(self.seq_len, self.transport.names, slots))
            session = Session(c, list(shares) if shares is not None else None, self.buffer_type, self.seq_len,
                              self.max_batch, o["kv_storage"], slots)
            self.transport.start(session, plan, self.model, o["progress"])
            layout = choose_layout(c, o["mmap_weights"])
            weights = load_node_weights(self.model, plan, 0, layout, o["mmap_weights"], o["progress"])
            sync = self.transport.sync(self.buffer_type, self.max_batch, c.dim)
            self.forward = NodeForward(plan, 0, weights, sync, self.seq_len, self.max_batch, o["kv_storage"], layout,
                                       slots)
            if not o["mmap_weights"]:
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
        self.exchange = Exchange(plan, 0)
        self.x = np.zeros((self.max_batch, c.dim), dtype=np.float32)
        self._local: np.ndarray | None = None  # this node's logits slice of the last step
        self._segments: list[Segment] = []  # the last step's segments
        self._collected: list[Collected] = []  # what the root made of each segment's logits
        self._counters = [(0, 0, 0.0)] * plan.n_nodes  # every node's counters, last reported
        self.topk_hits = self.topk_misses = 0  # samples taken from the nodes' top tokens / from every logit
        self.info = EngineInfo(plan.n_nodes, plan.describe(self.seq_len, self.transport.names, slots),
                               c.weight_float_type.label, self.buffer_type, self.seq_len,
                               kernels.get_num_threads(), [note] if note else [])

    # ---- a node lost, a node back -----------------------------------------------------------
    def _replan(self, transport: Transport, why: str) -> None:
        """Run on `transport`'s nodes from here on: the same slots and context (shorter only if
        memory says so), the slices planned and shipped again, and every slot's tokens evaluated
        again so that its sequence continues as if nothing happened."""
        seq_len = self.seq_len
        if self.forward is not None:
            self.forward.close()
            self.forward = None
        self.transport = transport
        self.log(why)
        self._options["max_seq_len"] = seq_len
        self._start(None, self.slots)
        if self.seq_len < max((len(h) for h in self.history), default=0):
            raise EngineError(f"the remaining nodes hold a context of {self.seq_len} tokens, less than the "
                              "sequences so far")
        for slot, tokens in enumerate(self.history):
            for pos in range(0, len(tokens), self.max_batch):
                self._step_once([(slot, pos, tokens[pos:pos + self.max_batch], NO_LOGITS)])

    def _recover(self, error: ConnectionError) -> bool:
        """After a failed step: find the workers that no longer answer, plan around them and
        replay every slot (True); False when nothing was lost that re-planning can route around."""
        survivors = getattr(self.transport, "survivors", None)
        if self.on_node_loss != "replan" or survivors is None:
            return False
        found = survivors(error)
        if found is None:
            return False
        transport, lost = found
        self.lost += [name for name in lost if name not in self.lost]
        self._replan(transport, f"lost node{'s' if len(lost) > 1 else ''} {', '.join(lost)} ({error}); "
                                f"continuing on {len(transport.names)} node(s)")
        return True

    def rejoin(self) -> bool:
        """Bring back lost workers that answer again (call it while idle: the slots are evaluated
        again, prefix caches included). True when the cluster grew."""
        back = getattr(self.transport, "with_workers", None)
        if not self.lost or back is None:
            return False
        found = back(self.lost)
        if found is None:
            return False
        transport, returned = found
        self.lost = [name for name in self.lost if name not in returned]
        self._replan(transport, f"node{'s' if len(returned) > 1 else ''} {', '.join(returned)} back; "
                                f"continuing on {len(transport.names)} node(s)")
        return True

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

    def step(self, tokens: list[int], start_pos: int, readout: Readout = FULL, slot: int = 0) -> StepStats:
        """Evaluate `tokens` of the sequence in KV slot `slot` at positions start_pos.. (at most
        max_batch of them) on every node; `readout` says what the next call reads of the logits,
        so the nodes send only that."""
        return self.step_batch([(slot, start_pos, tokens, readout)])

    def copy_slot(self, source: int, target: int, length: int) -> None:
        """KV slot `target` gets positions 0..length-1 of slot `source` on every node: a sequence
        that starts with another's prompt continues from there instead of evaluating it again."""
        if not (0 <= source < self.slots and 0 <= target < self.slots) or source == target:
            raise EngineError(f"cannot copy KV slot {source} to {target} (this engine has {self.slots})")
        if not 0 <= length <= self.seq_len:
            raise EngineError(f"cannot copy {length} positions of a {self.seq_len}-position context")
        self.history[target] = self.history[source][:length]
        try:
            self.transport.send_copy(source, target, length)
        except ConnectionError as error:  # a re-plan evaluates every slot's tokens again, the copy's included
            if not self._recover(error):
                raise EngineError(f"the cluster failed: {error}") from None
            return
        self.forward.cache.copy(source, target, length)

    def step_batch(self, sequences: list[tuple[int, int, list[int], Readout]]) -> StepStats:
        """One step over the rows of several sequences, each (KV slot, first position, tokens,
        readout): the weights are read once for all of them (continuous batching). Each
        sequence's logits are then read by its index in `sequences` (next_token, logits...).
        When a worker is lost (on_node_loss "replan"), the engine continues on the others and
        runs the step again there (`_recover`)."""
        for _ in range(len(self.transport.names)):
            try:
                stats = self._step_once(sequences)
                break
            except ConnectionError as error:
                if not self._recover(error):
                    raise EngineError(f"the cluster failed: {error}") from None
        else:
            raise EngineError("the cluster failed again after every re-plan")
        for slot, pos, tokens, _ in sequences:
            held = self.history[slot]
            del held[pos:]
            held.extend([0] * (pos - len(held)) + list(tokens))  # positions never written hold anything
        return stats

    def _step_once(self, sequences: list[tuple[int, int, list[int], Readout]]) -> StepStats:
        """step_batch on the nodes as they are; ConnectionError when the cluster fails."""
        start = time.perf_counter()
        segments = [Segment(slot, pos, len(tokens), readout) for slot, pos, tokens, readout in sequences]
        B = sum(seg.rows for seg in segments)
        if not segments or not 0 < B <= self.max_batch or any(seg.rows == 0 for seg in segments):
            raise EngineError(f"a step takes 1 to {self.max_batch} tokens in all, each sequence at least one, "
                              f"got {[seg.rows for seg in segments]}")
        for seg in segments:
            if not 0 <= seg.slot < self.slots:
                raise EngineError(f"KV slot {seg.slot} is not one of this engine's {self.slots}")
            if not 0 <= seg.position <= self.seq_len - seg.rows:
                raise EngineError(f"positions {seg.position}..{seg.position + seg.rows - 1} do not fit the "
                                  f"context of {self.seq_len} tokens")
        if len({seg.slot for seg in segments}) != len(segments):
            raise EngineError("a step holds each KV slot at most once")
        sent0, received0, sync0 = self.transport.counters()
        x = self.x[:B]
        ids = [t for _, _, tokens, _ in sequences for t in tokens]
        self.model.embed(ids, x)
        self._segments, self._collected = segments, [Collected() for _ in segments]
        self.transport.send_step(segments, x)
        self._local = self.forward.forward(x, segments)
        gather_start = time.perf_counter()
        if any(seg.readout.mode != LogitsMode.NONE for seg in segments):
            self._collect(segments)
        gather_s = time.perf_counter() - gather_start if self.plan.n_nodes > 1 else 0.0
        elapsed = time.perf_counter() - start
        sent, received, sync = self.transport.counters()
        sync_s = sync - sync0 + gather_s
        stats = StepStats(B, (elapsed - sync_s) * 1e3, sync_s * 1e3, sent - sent0, received - received0)
        counters = self._collected[0].counters if self._collected else None
        if counters is not None and self.plan.n_nodes > 1:
            counters[0] = (sent, received, sync)
            stats.node_bytes = [(s - s0, r - r0) for (s, r, _), (s0, r0, _) in zip(counters, self._counters)]
            stats.node_wait_ms = [(w - w0) * 1e3 for (_, _, w), (_, _, w0) in zip(counters, self._counters)]
            self._counters = counters
        return stats

    def _collect(self, segments: list[Segment]) -> None:
        """Every node's part of the last step's logits, as each segment's readout asks, read at the root."""
        offsets, sizes = self.exchange.layout(segments)
        part = self.exchange.part(segments, self._local, (0, 0, 0.0))  # the root's counters are read locally
        modes = {seg.readout.mode for seg in segments} - {LogitsMode.NONE}
        label = {LogitsMode.ARGMAX: "collecting the best token", LogitsMode.TOPK: "collecting top tokens"}
        buf = self.transport.gather(part, offsets, sizes,
                                    label.get(modes.pop(), "collecting logits") if len(modes) == 1 else
                                    "collecting logits")
        self._collected = self.exchange.combine(segments, buf)

    def _full_logits(self, index: int = 0) -> np.ndarray:
        """The last step's logits of sequence `index` (rows, vocab), fetched from every node (for
        every sequence of the step) if the step kept less."""
        if not self._segments:
            raise EngineError("no step has run")
        if self._collected[index].logits is None:
            if self._segments[index].readout.mode == LogitsMode.NONE:
                raise EngineError("the last step did not compute logits for this sequence")
            try:
                self.transport.send_logits_request()
                self._collect([Segment(seg.slot, seg.position, seg.rows, Readout(
                    LogitsMode.FULL, all_rows=seg.readout.all_rows) if seg.readout.mode != LogitsMode.NONE
                    else NO_LOGITS) for seg in self._segments])
            except ConnectionError as error:
                raise EngineError(f"the cluster failed: {error}") from None
        return self._collected[index].logits

    def logits(self, index: int = 0) -> np.ndarray:
        """Logits of the last step for sequence `index`: (vocab,) for its last token, or (B, vocab)
        when it kept every row."""
        logits = self._full_logits(index)
        return logits[0] if logits.shape[0] == 1 else logits

    def argmax(self, index: int = 0) -> int:
        """The most likely next token after the last step (first index on ties)."""
        if self._collected[index].argmax is not None:
            return self._collected[index].argmax
        return int(np.argmax(self._full_logits(index)[-1]))

    def next_token(self, sampler: Sampler, index: int = 0) -> int:
        """The token `sampler` chooses after the last step for sequence `index`, which ran with
        `readout_for(sampler, ...)`: the best token; or a nucleus sample from the nodes' top
        tokens when they hold the whole nucleus, else from every logit (fetched for this step
        only); or a sample from every logit."""
        readout = self._segments[index].readout
        limit = self.exchange.limit(readout)
        c = self._collected[index].candidates
        if sampler.greedy and not sampler.needs_all_logits:
            if readout.mode == LogitsMode.ARGMAX:
                return self.argmax(index)
            if c is not None:  # the best token is every node's first candidate; ties go to the lowest id
                return int(c.ids[np.lexsort((c.ids, -c.probs))[0]])
            return int(np.argmax(self._full_logits(index)[-1][:limit]))
        if sampler.greedy:
            return sampler.sample(self._full_logits(index)[-1][:limit])
        coin = sampler.random_f32()
        if c is not None and sampler.nucleus and not sampler.needs_all_logits:
            complete = c.every_token_sent or c.unsent_bound < sampler.cutoff(limit)
            choice = sampler.choose(c.ids, c.probs, coin, limit, complete, c.unsent_bound)
            if choice is not None:
                self.topk_hits += 1
                return choice
            self.topk_misses += 1
        return sampler.sample_with_coin(self._full_logits(index)[-1][:limit], coin)

    def logprobs(self, token: int, top: int, index: int = 0) -> TokenLogprobs:
        """The log-probability of `token` after the last step for sequence `index`, and the `top`
        most likely tokens with theirs (at most MAX_TOP_LOGPROBS), under the model's own
        distribution (temperature 1, no penalties, bias or grammar) over ids below the step's
        vocabulary limit. Read from the nodes' top tokens when the step kept them at temperature
        1 and they hold `token`, else from every logit."""
        if top > MAX_TOP_LOGPROBS:
            raise EngineError(f"at most {MAX_TOP_LOGPROBS} top log-probabilities, asked for {top}")
        readout = self._segments[index].readout
        collected = self._collected[index]
        c = collected.candidates
        if collected.logits is None and c is not None and readout.temperature == 1.0:
            hit = np.flatnonzero(c.ids == token)
            if len(hit):
                order = np.lexsort((c.ids, -c.probs))[:top]
                with np.errstate(divide="ignore"):
                    return TokenLogprobs(token, float(np.log(c.probs[hit[0]])),
                                         [(int(c.ids[i]), float(np.log(c.probs[i]))) for i in order])
        row = self._full_logits(index)[-1][:self.exchange.limit(readout)].astype(np.float64)
        top_value = row.max()
        log_z = top_value + np.log(np.exp(row - top_value).sum())
        order = np.argsort(-row, kind="stable")[:top]  # stable: ties by id
        return TokenLogprobs(token, float(row[token] - log_z), [(int(i), float(row[i] - log_z)) for i in order])

    def check_alive(self) -> None:
        """Between steps: notice a worker that went away (died or restarted): plan around it, or
        (on_node_loss "stop") raise EngineError naming it."""
        try:
            self.transport.check_alive()
        except ConnectionError as error:
            if not self._recover(error):  # on_node_loss "replan": carry on without it
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
