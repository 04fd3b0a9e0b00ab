"""Cluster speed and traffic, root + workers on one machine (q40 weights, q80 buffers), in one run.

Row groups (--rows; default: all of them):

* `1b`: the 1B-shaped model: 1 node x 1 thread, 1 node x 2 threads, root + 1 worker x 1 thread
  each on 127.0.0.1, and two unrelated 1-thread engines at the same time: their tokens/s added
  up is the most two single-thread nodes sharing this machine's memory bus can reach (each node
  of a 2-node cluster streams half the weights per token), so it shows how far root + worker is
  from the hardware's limit rather than from an ideal 2x ("bus_ceiling_gen_tokens_per_s",
  "share_of_bus_ceiling" on the 2-node rows).
* `1b-netns`: the same root + worker over 1 Gbit/s (below), and again with a worker whose slice
  cache (`dllama worker --cache-dir`) already holds its slices (`1gbit+c`, "worker_cache": true):
  the startup of every run of a model after the first.
* `8b`: an 8B-shaped model (Llama 3 8B's widths: dim 4096, ff 14336, 32 heads, 8 KV heads,
  head_dim 128, vocab 128256) with only --layers layers (default 2: a whole random 8B model is
  4.5 GB to write), on 1 node and on 2, 3, 4 and 8 nodes (--nodes) on 127.0.0.1, with the sync
  the root picks (all-gather for 2, reduce-scatter from 3), and 4 nodes again with
  DLLAMA_SYNC=allgather (the all-gather every node count used before). Bytes per token are
  linear in the layer count (two syncs per layer) plus per-step constants (the root's step
  broadcast, the logits replies), so the traffic of all 32 layers is extrapolated from the
  measured figure and printed beside it, with the ratio the issue "Clusters of 4 to 16 nodes"
  asks for (4 nodes: bytes per node at most 55% of the all-gather's).
* `8b-netns`: the 8B-shaped model on 2 and 4 nodes over 1 Gbit/s.

1 Gbit/s: every node in a network namespace of its own (`ip netns`), joined by veth pairs to a
bridge in one more namespace, each veth end shaped with `tc tbf` to 1 Gbit/s like a port of a
home switch; the addresses (10.213.0.0/24) exist only inside these namespaces, which are deleted
at exit (errors and SIGTERM included). This kernel has no `netem`, so no latency is added: the
rows show the cost of the bandwidth. Needs root; skipped with a message otherwise.

Every node runs 1 thread. This machine has 2 cores: beyond 2 nodes the processes share them, so
the speeds of the 4- and 8-node rows say little about a real cluster; their bytes and sync
counts are what a real cluster sends. Per row (medians of --repeats fresh runs, taken
round-robin so that drifts in the machine's load touch every configuration alike; within a run,
medians over the generated tokens): generation and prompt tokens/s, the root's sync time per
token, every node's own bytes sent and received per token (its counters, in its replies) and
its time waiting in syncs, seconds from start (connect, ship slices, load) to the first token.

Cost model: the benchmark measures one node's effective weight bandwidth (1 node x 1 thread:
weight bytes x tokens/s) and the latency and rate of one network step (a 2-node mesh of the
engine's own C++ transport, on loopback and through the namespaces), predicts every cluster
row's tokens/s from the model's shape (`predict`, docs/cluster.md "Predicting a cluster's
speed") and prints the prediction beside the measurement. `--predict` prints predictions only,
for figures you give (e.g. --bandwidth 20 --rate 1e9 --latency 2e-4).

Prints tables and writes JSON (--json PATH). The default run takes about 5 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from model_cache import CACHE, llama_1b_config, llama_1b_q40, write_random_model  # noqa: E402

GROUPS = ("1b", "1b-netns", "8b", "8b-netns")
NETNS_PREFIX = "dllama-bench-"
NS_SWITCH = NETNS_PREFIX + "sw"
BRIDGE = "dlb-br"
LOOPBACK_PORT = 29990  # loopback workers listen on 29990, 29991, ...
NETNS_PORT, NETNS_CACHED_PORT, PROBE_PORT = 9998, 9997, 9990
TBF = ("tbf", "rate", "1gbit", "burst", "128kb", "latency", "50ms")
FULL_LAYERS = 32  # Llama 3 8B


def ns_name(node: int) -> str:
    return f"{NETNS_PREFIX}n{node}"


def ns_ip(node: int) -> str:
    return f"10.213.0.{node + 1}"


def ns_prefix(node: int) -> list[str]:
    return ["ip", "netns", "exec", ns_name(node)]


def llama_8b_config(layers: int):  # noqa: ANN201 (ModelConfig)
    return llama_1b_config(n_layers=layers, dim=4096, hidden=14336, heads=32, kv_heads=8)


def llama_8b_q40(layers: int) -> Path:
    """The cached 8B-shaped q40 model with `layers` layers (2.1 GB of f32 embedding, 295 MB of
    classifier, 123 MB per layer)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"dllama_model_llama8b-shape-{layers}layers_q40.m"
    if not path.exists():
        print(f"making {path} (once)...", file=sys.stderr, flush=True)
        write_random_model(path, llama_8b_config(layers))
    return path


# ---- one configuration, in a child process (the root) -------------------------------------------

def run_config(model: Path, threads: int, workers: list[str], gen_tokens: int, prompt_tokens: int,
               shares: list[float] | str | None = None, gen_start_at: float | None = None) -> dict:
    """Measure one configuration in this process (the root). With gen_start_at (time.time()),
    generation waits for that moment, so that processes started together generate together."""
    from dllama_py.cluster.root import cluster_engine
    from dllama_py.engine.engine import Engine
    from dllama_py.engine.exchange import ARGMAX, NO_LOGITS

    start = time.perf_counter()
    if workers:
        engine = cluster_engine(model, workers, threads=threads, buffer_type="q80", max_seq_len=1024,
                               log=lambda m: None, progress=False, shares=shares)
    else:
        engine = Engine(model, threads=threads, buffer_type="q80", max_seq_len=1024)
    rng = np.random.default_rng(0)
    prompt = [1] + rng.integers(100, 1000, size=prompt_tokens - 1).tolist()
    t0 = time.perf_counter()
    for pos in range(0, prompt_tokens, 32):
        engine.step(prompt[pos:pos + 32], pos, ARGMAX if pos + 32 >= prompt_tokens else NO_LOGITS)
    prompt_s = time.perf_counter() - t0
    token = engine.argmax()
    first_token_s = time.perf_counter() - start
    if gen_start_at is not None:
        time.sleep(max(0.0, gen_start_at - time.time()))
    stats = []
    for i in range(gen_tokens):
        stats.append(engine.step([token], prompt_tokens + i, ARGMAX))
        token = engine.argmax()
    root_share = engine.plan.nodes[0].ff_width / engine.config.ff_dim
    algorithm = getattr(engine.transport, "algorithm", None) if workers else None
    engine.close()
    per_token = [s.compute_ms + s.sync_ms for s in stats]
    result = {
        "gen_tokens_per_s": 1e3 / statistics.median(per_token),
        "prompt_tokens_per_s": prompt_tokens / prompt_s,
        "sync_ms_per_token": statistics.median(s.sync_ms for s in stats),
        "bytes_sent_per_token": statistics.median(s.bytes_sent for s in stats),
        "bytes_received_per_token": statistics.median(s.bytes_received for s in stats),
        "seconds_to_first_token": first_token_s,
        "root_ff_share": root_share,
    }
    reported = [s for s in stats if s.node_bytes is not None]
    if workers and reported:
        nodes = len(reported[0].node_bytes)
        # every node's own counters (a worker's reply carries them); the median over the tokens
        result["sync_algorithm"] = algorithm
        result["node_sent_per_token"] = [statistics.median(s.node_bytes[i][0] for s in reported) for i in range(nodes)]
        result["node_received_per_token"] = [statistics.median(s.node_bytes[i][1] for s in reported)
                                             for i in range(nodes)]
        result["node_wait_ms_per_token"] = [statistics.median(s.node_wait_ms[i] for s in reported)
                                            for i in range(nodes)]
    return result


# ---- processes ----------------------------------------------------------------------------------

def start_worker(prefix: list[str], host: str, port: int, threads: int, extra: list[str] | None = None
                 ) -> subprocess.Popen:
    return wait_listening(spawn_worker(prefix, host, port, threads, extra))


def spawn_worker(prefix: list[str], host: str, port: int, threads: int, extra: list[str] | None = None
                 ) -> subprocess.Popen:
    return subprocess.Popen(prefix + [sys.executable, "-m", "dllama_py.commands.cli", "worker", "--host", host,
                                      "--port", str(port), "--nthreads", str(threads)] + (extra or []),
                            stderr=subprocess.PIPE, text=True)


def wait_listening(worker: subprocess.Popen) -> subprocess.Popen:
    assert worker.stderr is not None
    for line in worker.stderr:
        if "listening on" in line:
            # keep reading its log, so that a full pipe never blocks it
            threading.Thread(target=lambda: [None for _ in worker.stderr], daemon=True).start()
            return worker
    raise RuntimeError("worker did not start")


def child_command(prefix: list[str], args: argparse.Namespace, threads: int, workers: list[str],
                  model: Path | None = None, gen_tokens: int | None = None,
                  prompt_tokens: int | None = None) -> list[str]:
    return prefix + [sys.executable, str(Path(__file__).resolve()), "--child", "--model", str(model or args.model),
                     "--threads", str(threads), "--gen-tokens", str(gen_tokens or args.gen_tokens),
                     "--prompt-tokens", str(prompt_tokens or args.prompt_tokens)] + (
                         ["--workers", *workers] if workers else [])


def run_children(commands: list[list[str]], env: dict[str, str] | None = None) -> list[dict]:
    """Start every command at once (fresh processes) and return each one's result."""
    full_env = dict(os.environ, **env) if env else None
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
             for cmd in commands]
    results = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark child failed ({proc.returncode}): {err.strip()[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def medians(runs: list[dict]) -> dict:
    """Per key, the median over runs (element-wise for lists); strings and None as in the first run."""
    out = {}
    for key, value in runs[0].items():
        if isinstance(value, list):
            out[key] = [statistics.median(run[key][i] for run in runs) for i in range(len(value))]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(run[key] for run in runs)
        else:
            out[key] = value
    if len(runs) > 1 and "gen_tokens_per_s" in runs[0]:
        out["gen_tokens_per_s_runs"] = [run["gen_tokens_per_s"] for run in runs]
    return out


def independent_pair(args: argparse.Namespace) -> dict:
    """Two 1-node x 1-thread engines that generate at the same moment; their speeds added up.
    (Loading takes a few seconds; both wait for a common start, so that neither generates alone.)"""
    start = ["--gen-start-at", f"{time.time() + 8.0:.3f}"]
    a, b = run_children([child_command([], args, 1, []) + start, child_command([], args, 1, []) + start])
    return {"gen_tokens_per_s": a["gen_tokens_per_s"] + b["gen_tokens_per_s"],
            "prompt_tokens_per_s": a["prompt_tokens_per_s"] + b["prompt_tokens_per_s"],
            "seconds_to_first_token": max(a["seconds_to_first_token"], b["seconds_to_first_token"])}


# ---- network namespaces -------------------------------------------------------------------------

def netns_available() -> tuple[bool, str]:
    """Whether namespaces, a bridge and tbf can be made here; else why not."""
    if os.geteuid() != 0:
        return False, "needs root (ip netns, tc)"
    if not shutil.which("ip") or not shutil.which("tc"):
        return False, "needs the ip and tc commands (iproute2)"
    probe = NETNS_PREFIX + "probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    try:
        if made.returncode != 0:
            return False, f"ip netns add failed: {made.stderr.strip()}"
        for cmd in (["ip", "-n", probe, "link", "add", "dlb-probe", "type", "bridge"],
                    ["ip", "-n", probe, "link", "add", "dlb-p0", "type", "veth", "peer", "name", "dlb-p1"],
                    ["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "dlb-p0", "root", *TBF]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                return False, f"{' '.join(cmd)} failed: {r.stderr.strip()}"
        return True, ""
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)


def netns_up(nodes: int) -> None:
    """`nodes` namespaces (node i: 10.213.0.(i+1)) on a bridge in a namespace of its own, every
    link 1 Gbit/s each way (tbf on both ends of every veth pair)."""
    def sh(*cmd: str) -> None:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")

    netns_down()
    sh("ip", "netns", "add", NS_SWITCH)
    sh("ip", "-n", NS_SWITCH, "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "-n", NS_SWITCH, "link", "set", BRIDGE, "up")
    for i in range(nodes):
        ns, dev, port = ns_name(i), f"dlb-n{i}", f"dlb-s{i}"
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", NS_SWITCH, "link", "add", port, "type", "veth", "peer", "name", dev, "netns", ns)
        sh("ip", "-n", NS_SWITCH, "link", "set", port, "master", BRIDGE)
        sh("ip", "-n", NS_SWITCH, "link", "set", port, "up")
        sh("ip", "netns", "exec", NS_SWITCH, "tc", "qdisc", "add", "dev", port, "root", *TBF)
        sh("ip", "-n", ns, "addr", "add", f"{ns_ip(i)}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", *TBF)


def netns_down() -> None:
    """Delete every namespace this benchmark makes (their veths and the bridge go with them)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for name in listed:
        if name.startswith(NETNS_PREFIX) or name in ("dllama-bench-root", "dllama-bench-worker"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


# ---- network step probe -------------------------------------------------------------------------

def probe_mesh(role: str, address: str) -> dict:
    """One end of a 2-node mesh of the engine's C++ transport: the median time of an all-gather
    of one q80 block (34 bytes; a network step's latency, the wake-up included) and of 1 MiB
    (the rate). The connecting end prints the figures."""
    from dllama_py.cluster.mesh import net_spin_us, open_mesh

    host, port = address.rsplit(":", 1)
    if role == "listen":
        with socket.create_server((host, int(port))) as server:
            print("listening", flush=True)
            conn, _ = server.accept()
        node = 1
    else:
        deadline = time.time() + 20
        while True:
            try:
                conn = socket.create_connection((host, int(port)))
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        node = 0
    fd = conn.detach()
    mesh = open_mesh(node, 2, [-1, fd] if node == 0 else [fd, -1], ["a", "b"], 20000, net_spin_us())
    out = {}
    for name, size, count in (("latency_s", 34, 3000), ("big_s", 1 << 20, 40)):
        buf = np.zeros(2 * size, dtype=np.uint8)
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            mesh.all_gather(buf, size, "probe")
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times[count // 5:])
    mesh.close()
    # both ends send and receive 1 MiB at once (full duplex): one link direction carries 1 MiB
    return {"latency_s": out["latency_s"], "rate_bps": 8 * (1 << 20) / max(out["big_s"] - out["latency_s"], 1e-9)}


def measure_link(listen_prefix: list[str], connect_prefix: list[str], listen_ip: str, port: int) -> dict:
    script = [sys.executable, str(Path(__file__).resolve())]
    listener = subprocess.Popen(listen_prefix + script + ["--probe", "listen", f"{listen_ip}:{port}"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None
        if listener.stdout.readline().strip() != "listening":
            raise RuntimeError(f"link probe did not start: {listener.stderr.read()[-1000:] if listener.stderr else ''}")
        result = run_children([connect_prefix + script + ["--probe", "connect", f"{listen_ip}:{port}"]])[0]
    finally:
        listener.kill()
        listener.wait()
    return result


# ---- traffic arithmetic and the cost model ------------------------------------------------------

def q80_row_bytes(dim: int) -> int:
    return dim // 32 * 34


def sync_bytes_per_layer(dim: int, nodes: int, algorithm: str, node: int) -> tuple[int, int]:
    """(sent, received) by `node` in one layer's two syncs of one token (q80 buffers): exactly
    what cluster/mesh.py's MeshSync moves (its reduce-scatter's chunks are whole q80 blocks)."""
    from dllama_py.cluster.mesh import chunk_bounds

    row = q80_row_bytes(dim)
    if nodes < 2:
        return 0, 0
    if algorithm == "allgather":
        per_sync = (nodes - 1) * row, (nodes - 1) * row
    else:
        bounds = chunk_bounds(dim, nodes, 32)
        mine = q80_row_bytes(bounds[node + 1] - bounds[node])
        # chunk q of the partial to node q (row - mine), then this node's sum to every other node;
        # and the same received
        per_sync = row - mine + (nodes - 1) * mine, (nodes - 1) * mine + row - mine
    return 2 * per_sync[0], 2 * per_sync[1]


def weight_bytes(config) -> int:  # noqa: ANN001 (ModelConfig)
    """Bytes of weights one token reads: every matrix and norm but the embedding (one row of it)."""
    from dllama_py.model.structure import tensor_specs

    return sum(spec.nbytes for spec in tensor_specs(config) if spec.name != "embedding")


def predict(config, nodes: int, algorithm: str | None, bandwidth: float, rate_bps: float, latency_s: float,  # noqa: ANN001
            cores: int | None = None, bus: float | None = None) -> dict:
    """Seconds per generated token on `nodes` identical nodes (greedy sampling, q80 buffers):
    compute = weight bytes / nodes / bandwidth (bytes/s); per sync, one latency per network step
    (all-gather 1, reduce-scatter + all-gather 2) plus a node's bytes on its link / rate; two syncs
    per layer; the root's step (x in f32 to every worker, over the root's one link) and the
    replies (8 bytes of argmax + 24 of counters each) cost a latency each plus their bytes.
    `cores`: the nodes share that many cores (this machine), so compute takes
    weight bytes / min(nodes, cores) / bandwidth; `bus`: with more than one node, what those
    cores get from the memory bus together, as a multiple of one core's bandwidth (measured: two
    unrelated 1-thread engines at once), in place of min(nodes, cores)."""
    parallel = min(nodes, cores or nodes)
    if bus is not None and parallel > 1:
        parallel = bus
    compute = weight_bytes(config) / parallel / bandwidth
    if nodes < 2:
        return {"compute_s": compute, "network_s": 0.0, "tokens_per_s": 1 / compute, "steps": 0}
    algorithm = algorithm or ("allgather" if nodes <= 2 else "reducescatter")
    steps_per_sync = 1 if algorithm == "allgather" else 2
    sent_per_layer, _ = sync_bytes_per_layer(config.dim, nodes, algorithm, 0)
    layers = config.n_layers
    syncs = 2 * layers * (steps_per_sync * latency_s) + layers * sent_per_layer * 8 / rate_bps
    step = latency_s + (nodes - 1) * config.dim * 4 * 8 / rate_bps
    replies = latency_s + (nodes - 1) * 32 * 8 / rate_bps
    network = syncs + step + replies
    return {"compute_s": compute, "network_s": network, "tokens_per_s": 1 / (compute + network),
            "steps": 2 * layers * steps_per_sync + 2}


# ---- configurations -----------------------------------------------------------------------------

@dataclasses.dataclass
class Config:
    name: str
    group: str
    model: str  # "1b" or "8b"
    nodes: int
    threads: int
    link: str  # loopback, 1gbit, none
    run: Callable[[], dict]
    sync: str | None = None  # forced with DLLAMA_SYNC; None: the root's choice
    cached: bool = False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--rows", nargs="+", choices=GROUPS, default=list(GROUPS),
                        help="row groups to run (default: all)")
    parser.add_argument("--nodes", nargs="+", type=int, default=[2, 3, 4, 8],
                        help="node counts of the 8b rows on loopback (default 2 3 4 8; 4 also runs with "
                             "DLLAMA_SYNC=allgather); the 8b-netns rows take those of 2 and 4 that are listed")
    parser.add_argument("--layers", type=int, default=2, help="layers of the 8B-shaped model (default 2)")
    parser.add_argument("--gen-tokens", type=int, default=64, help="1b rows: tokens generated (default 64)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="1b rows: prompt tokens (default 128)")
    parser.add_argument("--gen-tokens-8b", type=int, default=32, help="8b rows: tokens generated (default 32)")
    parser.add_argument("--prompt-tokens-8b", type=int, default=16, help="8b rows: prompt tokens (default 16)")
    parser.add_argument("--model", type=Path, default=None, help="1b rows: q40 model (default: the cached one)")
    parser.add_argument("--no-netns", action="store_true", help="skip the network-namespace rows")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (medians; default 3)")
    parser.add_argument("--predict", action="store_true",
                        help="print the cost model's tokens/s for the full 8B shape and exit (no measuring)")
    parser.add_argument("--bandwidth", type=float, default=20.0, help="--predict: a node's GB/s of weights")
    parser.add_argument("--rate", type=float, default=1e9, help="--predict: link rate, bit/s")
    parser.add_argument("--latency", type=float, default=2e-4, help="--predict: one network step's latency, s")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe", nargs=2, metavar=("ROLE", "ADDRESS"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--workers", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--shares", nargs="+", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--gen-start-at", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe_mesh(*args.probe)))
        return 0
    if args.predict:
        return print_predictions(args)
    if args.child:
        shares = args.shares if args.shares is None or args.shares != ["auto"] else "auto"
        if isinstance(shares, list):
            shares = [float(x) for x in shares]
        print(json.dumps(run_config(args.model, args.threads, args.workers, args.gen_tokens, args.prompt_tokens,
                                    shares, args.gen_start_at)))
        return 0
    return run_benchmark(args)


def print_predictions(args: argparse.Namespace) -> int:
    config = llama_8b_config(FULL_LAYERS)
    print(f"cost model, 8B shape ({FULL_LAYERS} layers, q40 weights {weight_bytes(config) / 1e9:.2f} GB read per "
          f"token, q80 buffers): {args.bandwidth:g} GB/s per node, link {args.rate / 1e9:g} Gbit/s, "
          f"latency {args.latency * 1e6:g} us per network step")
    print(f"{'nodes':>5} {'sync':>13} {'compute ms':>10} {'network ms':>10} {'steps':>5} {'tok/s':>7}")
    for n in (1, 2, 3, 4, 8, 16):
        for algorithm in ((None,) if n < 3 else ("allgather", "reducescatter")):
            p = predict(config, n, algorithm if n > 1 else None, args.bandwidth * 1e9, args.rate, args.latency)
            label = "-" if n == 1 else (algorithm or "allgather")
            print(f"{n:>5} {label:>13} {p['compute_s'] * 1e3:>10.2f} {p['network_s'] * 1e3:>10.2f} {p['steps']:>5}"
                  f" {p['tokens_per_s']:>7.2f}")
    return 0


def _kill_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run_benchmark(args: argparse.Namespace) -> int:
    groups = set(args.rows)
    netns_reason = ""
    netns = False
    if groups & {"1b-netns", "8b-netns"}:
        if args.no_netns:
            netns_reason = "--no-netns"
        else:
            netns, netns_reason = netns_available()
    if not netns:
        groups -= {"1b-netns", "8b-netns"}
    model_1b = args.model or (llama_1b_q40() if groups & {"1b", "1b-netns"} else None)
    model_8b = llama_8b_q40(args.layers) if groups & {"8b", "8b-netns"} else None
    args.model = model_1b
    scale_nodes = sorted({n for n in args.nodes if n >= 2})
    netns_nodes = [n for n in (2, 4) if n in scale_nodes] if "8b-netns" in groups else []

    def cmd_8b(prefix: list[str], workers: list[str]) -> list[str]:
        return child_command(prefix, args, 1, workers, model_8b, args.gen_tokens_8b, args.prompt_tokens_8b)

    def loopback(n: int) -> list[str]:
        return [f"127.0.0.1:{LOOPBACK_PORT + i}" for i in range(n - 1)]

    def netns_workers(n: int, port: int = NETNS_PORT) -> list[str]:
        return [f"{ns_ip(i)}:{port}" for i in range(1, n)]

    configs: list[Config] = []
    if "1b" in groups:
        configs += [
            Config("1b 1x1", "1b", "1b", 1, 1, "loopback", lambda: run_children([child_command([], args, 1, [])])[0]),
            Config("1b 1x2", "1b", "1b", 1, 2, "loopback", lambda: run_children([child_command([], args, 2, [])])[0]),
            Config("1b 2x1", "1b", "1b", 2, 1, "loopback",
                   lambda: run_children([child_command([], args, 1, loopback(2))])[0]),
            # Two unrelated 1-thread engines at once: what the memory bus gives two busy cores. A
            # node of a 2-node cluster reads half the weights per token, so the pair's tokens/s
            # added up is the most root + worker can reach on this machine.
            Config("1b independent", "1b", "1b", 2, 1, "none", lambda: independent_pair(args)),
        ]
    if "1b-netns" in groups:
        configs += [
            Config("1b 2x1 1gbit", "1b-netns", "1b", 2, 1, "1gbit",
                   lambda: run_children([child_command(ns_prefix(0), args, 1, netns_workers(2))])[0]),
            # The same with a worker whose slice cache (--cache-dir) already holds its slices: the
            # startup a user sees from the second run of a model on.
            Config("1b 2x1 1gbit cached", "1b-netns", "1b", 2, 1, "1gbit",
                   lambda: run_children([child_command(ns_prefix(0), args, 1,
                                                       netns_workers(2, NETNS_CACHED_PORT))])[0], cached=True),
        ]
    if "8b" in groups:
        configs.append(Config("8b 1x1", "8b", "8b", 1, 1, "loopback", lambda: run_children([cmd_8b([], [])])[0]))
        for n in scale_nodes:
            configs.append(Config(f"8b {n}x1", "8b", "8b", n, 1, "loopback",
                                  lambda n=n: run_children([cmd_8b([], loopback(n))])[0]))
            if n == 4:
                configs.append(Config("8b 4x1 allgather", "8b", "8b", 4, 1, "loopback",
                                      lambda: run_children([cmd_8b([], loopback(4))], {"DLLAMA_SYNC": "allgather"})[0],
                                      sync="allgather"))
    for n in netns_nodes:
        configs.append(Config(f"8b {n}x1 1gbit", "8b-netns", "8b", n, 1, "1gbit",
                              lambda n=n: run_children([cmd_8b(ns_prefix(0), netns_workers(n))])[0]))
        if n == 4:
            configs.append(Config("8b 4x1 1gbit allgather", "8b-netns", "8b", 4, 1, "1gbit",
                                  lambda: run_children([cmd_8b(ns_prefix(0), netns_workers(4))],
                                                       {"DLLAMA_SYNC": "allgather"})[0], sync="allgather"))
    if not configs:
        print("nothing to run" + (f" (namespaces: {netns_reason})" if netns_reason else ""))
        return 1

    loopback_workers = max([c.nodes for c in configs if c.link == "loopback"] + [1]) - 1
    ns_nodes = max([c.nodes for c in configs if c.link == "1gbit"] + [0])
    runs: dict[str, list[dict]] = {c.name: [] for c in configs}
    workers: list[subprocess.Popen] = []
    links: dict[str, dict] = {}
    cache_dir = tempfile.TemporaryDirectory(prefix="dllama-bench-cache-")
    previous = {sig: signal.signal(sig, _kill_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    if ns_nodes:
        atexit.register(netns_down)
    began = datetime.datetime.now().astimezone()
    try:
        spawned = [spawn_worker([], "127.0.0.1", LOOPBACK_PORT + i, 1) for i in range(loopback_workers)]
        workers += spawned
        if ns_nodes:
            netns_up(ns_nodes)
            more = [spawn_worker(ns_prefix(i), ns_ip(i), NETNS_PORT, 1) for i in range(1, ns_nodes)]
            if "1b-netns" in groups:
                more.append(spawn_worker(ns_prefix(1), ns_ip(1), NETNS_CACHED_PORT, 1,
                                         ["--cache-dir", cache_dir.name]))
            workers += more
            spawned += more
        for worker in spawned:
            wait_listening(worker)
        links["loopback"] = measure_link([], [], "127.0.0.1", LOOPBACK_PORT - 10)
        if ns_nodes:
            links["1gbit"] = measure_link(ns_prefix(1), ns_prefix(0), ns_ip(1), PROBE_PORT)
            if "1b-netns" in groups:
                next(c for c in configs if c.cached).run()  # fills the worker's slice cache
        # Round-robin: every configuration once per round, so that a change in the machine's
        # load or memory bandwidth during the run touches every configuration alike.
        for round_index in range(args.repeats):
            for config in configs:
                runs[config.name].append(config.run())
            print(f"round {round_index + 1} of {args.repeats} done", file=sys.stderr, flush=True)
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
        if ns_nodes:
            netns_down()
        cache_dir.cleanup()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    rows = report(args, configs, runs, links, netns_reason, began)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.json}")
    return 0


def report(args: argparse.Namespace, configs: list[Config], runs: dict[str, list[dict]], links: dict[str, dict],
           netns_reason: str, began: datetime.datetime) -> list[dict]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    host = f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"
    print(f"bench_cluster {began:%Y-%m-%d %H:%M %Z}, {host}; every node 1 thread unless said")
    for name, link in links.items():
        print(f"link {name}: {link['latency_s'] * 1e6:.0f} us per network step (2-node all-gather of 34 bytes), "
              f"{link['rate_bps'] / 1e9:.2f} Gbit/s (all-gather of 1 MiB), by the engine's own C++ mesh")
    rows: list[dict] = []
    for config in configs:
        if config.name == "1b independent":
            continue
        r = {"name": config.name, "model": config.model, "nodes": config.nodes, "threads": config.threads,
             "link": config.link, **medians(runs[config.name]), "worker_cache": config.cached,
             "runs": len(runs[config.name]), "date": began.isoformat(timespec="minutes"), "host": host}
        if config.model == "8b":
            r["layers"] = args.layers
        if config.nodes > 1:
            r.setdefault("sync_algorithm", config.sync)
        rows.append(r)
    by_name = {r["name"]: r for r in rows}
    if runs.get("1b independent"):
        by_name["1b independent"] = medians(runs["1b independent"])  # not a row: the 2-node rows carry it

    one_b = [r for r in rows if r["model"] == "1b"]
    if one_b:
        print("\n1B-shaped model (dim 2048, 16 layers, q40 weights, q80 buffers); per generated token, root's counters")
        print(f"{'nodes':>5} {'threads':>7} {'link':>8} {'gen tok/s':>9} {'prompt tok/s':>12} {'sync ms':>8}"
              f" {'sent kB':>8} {'recv kB':>8} {'1st tok s':>8}")
        for r in one_b:
            print(f"{r['nodes']:>5} {r['threads']:>7} {r['link'] + ('+c' if r['worker_cache'] else ''):>8}"
                  f" {r['gen_tokens_per_s']:>9.2f} {r['prompt_tokens_per_s']:>12.2f}"
                  f" {r['sync_ms_per_token']:>8.2f} {r['bytes_sent_per_token'] / 1e3:>8.1f}"
                  f" {r['bytes_received_per_token'] / 1e3:>8.1f} {r['seconds_to_first_token']:>8.2f}", flush=True)
        if any(r["link"] == "1gbit" for r in one_b):
            print("1gbit+c: the worker's slice cache (--cache-dir) already held its slices")
        base = by_name.get("1b 1x1")
        if base:
            for r in one_b[1:]:
                if not r["worker_cache"]:
                    print(f"{r['nodes']} node(s) x {r['threads']} thread(s), {r['link']}: "
                          f"{r['gen_tokens_per_s'] / base['gen_tokens_per_s']:.2f}x the generation speed of "
                          "1 node x 1 thread")
        if runs.get("1b independent") and base:
            ceiling = medians(runs["1b independent"])["gen_tokens_per_s"]
            cluster = by_name.get("1b 2x1")
            if cluster:
                print(f"memory-bus ceiling: two 1-thread engines running at once make {ceiling:.2f} tokens/s together "
                      f"({ceiling / base['gen_tokens_per_s']:.2f}x one alone); root + worker on loopback reaches "
                      f"{cluster['gen_tokens_per_s'] / ceiling:.0%} of that")
            for r in one_b:
                if r["nodes"] == 2:
                    r["bus_ceiling_gen_tokens_per_s"] = ceiling  # two unrelated 1-thread engines at once, added up
                    r["share_of_bus_ceiling"] = r["gen_tokens_per_s"] / ceiling

    eight_b = [r for r in rows if r["model"] == "8b"]
    if eight_b:
        report_8b(args, eight_b, by_name)
    report_cost_model(args, rows, by_name, links)
    if netns_reason:
        print(f"\n1 Gbit/s rows skipped: {netns_reason}")
    elif any(r["link"] == "1gbit" for r in rows):
        print("\n1gbit: every node in a network namespace on a bridge, every veth end shaped with tc tbf to 1 Gbit/s; "
              "this kernel has no netem, so no latency was added")
    return rows


def report_8b(args: argparse.Namespace, rows: list[dict], by_name: dict[str, dict]) -> None:
    L, dim = args.layers, 4096
    print(f"\n8B-shaped model (dim 4096, ff 14336, 32 heads, 8 KV heads, vocab 128256, q40 weights, q80 buffers) "
          f"with {L} of its {FULL_LAYERS} layers; per generated token: medians over the tokens, every node's own "
          "counters (node 0 is the root; workers as min-max)")
    print(f"{'nodes':>5} {'link':>8} {'sync':>13} {'steps':>5} {'gen tok/s':>9} {'sync ms':>7} {'waits ms':>11}"
          f" {'root sent kB':>12} {'root recv kB':>12} {'wrk sent kB':>13} {'wrk recv kB':>13}")

    def span(values: list[float], scale: float = 1e-3, fmt: str = ".1f") -> str:
        lo, hi = min(values) * scale, max(values) * scale
        return f"{lo:{fmt}}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}}-{hi:{fmt}}"

    for r in rows:
        algorithm = r.get("sync_algorithm") or "-"
        steps = 0 if r["nodes"] < 2 else 2 * L * (1 if algorithm == "allgather" else 2) + 2
        r["network_steps_per_token"] = steps
        r["syncs_per_token"] = 2 * L if r["nodes"] > 1 else 0
        if r["nodes"] < 2:
            print(f"{1:>5} {'-':>8} {'-':>13} {0:>5} {r['gen_tokens_per_s']:>9.2f}")
            continue
        sent, recv, waits = r["node_sent_per_token"], r["node_received_per_token"], r["node_wait_ms_per_token"]
        print(f"{r['nodes']:>5} {r['link']:>8} {algorithm:>13} {steps:>5} {r['gen_tokens_per_s']:>9.2f}"
              f" {r['sync_ms_per_token']:>7.2f} {span(waits, 1, '.2f'):>11} {sent[0] / 1e3:>12.1f}"
              f" {recv[0] / 1e3:>12.1f} {span(sent[1:]):>13} {span(recv[1:]):>13}")
        # the same at 32 layers: measured + (32 - L) x the per-layer sync bytes of every node
        per_layer = [sync_bytes_per_layer(dim, r["nodes"], algorithm, p) for p in range(r["nodes"])]
        r["sync_bytes_per_layer"] = per_layer
        r["node_sent_per_token_32_layers"] = [s + (FULL_LAYERS - L) * pl[0] for s, pl in zip(sent, per_layer)]
        r["node_received_per_token_32_layers"] = [s + (FULL_LAYERS - L) * pl[1] for s, pl in zip(recv, per_layer)]
        r["node_constant_sent_per_token"] = [s - L * pl[0] for s, pl in zip(sent, per_layer)]
    print("steps: network steps per token (2 syncs per layer, 1 step each for all-gather, 2 for reduce-scatter + "
          "all-gather, + the step broadcast and the replies); sync ms: the root's time in syncs and in gathering the "
          "replies; waits: every node's time waiting in syncs")
    if max(r["nodes"] for r in rows) > 2:
        print(f"this machine has {os.cpu_count()} cores shared by all the nodes: the tokens/s of 3 or more nodes say "
              "little about a real cluster (processes take turns on the cores); their bytes and step counts are "
              "what a real cluster sends")
    print(f"\nextrapolated to {FULL_LAYERS} layers: measured + {FULL_LAYERS - L} x every node's per-layer sync bytes "
          "(exact from the sync's chunk sizes; constant = measured - the layers' syncs: step broadcast, replies)")
    print(f"{'nodes':>5} {'link':>8} {'sync':>13} {'root sent kB':>12} {'root recv kB':>12} {'wrk sent kB':>13}"
          f" {'wrk recv kB':>13} {'root const':>10} {'wrk const':>9}")
    for r in rows:
        if r["nodes"] < 2:
            continue
        sent, recv = r["node_sent_per_token_32_layers"], r["node_received_per_token_32_layers"]
        const = r["node_constant_sent_per_token"]
        print(f"{r['nodes']:>5} {r['link']:>8} {r['sync_algorithm']:>13} {sent[0] / 1e3:>12.1f} {recv[0] / 1e3:>12.1f}"
              f" {span(sent[1:]):>13} {span(recv[1:]):>13} {const[0] / 1e3:>10.1f} {span(const[1:], 1, '.0f'):>9}")
    for link in ("", " 1gbit"):
        rs, ag = by_name.get(f"8b 4x1{link}"), by_name.get(f"8b 4x1{link} allgather")
        if not rs or not ag:
            continue
        print(f"\n4 nodes{link or ' loopback'}: bytes per node per token, reduce-scatter / all-gather (today's):")
        for label, s_key, r_key in (("measured", "node_sent_per_token", "node_received_per_token"),
                                    (f"{FULL_LAYERS} layers", "node_sent_per_token_32_layers",
                                     "node_received_per_token_32_layers")):
            sent = [a / b for a, b in zip(rs[s_key], ag[s_key])]
            both = [(a + b) / (c + d) for a, b, c, d in zip(rs[s_key], rs[r_key], ag[s_key], ag[r_key])]
            verdict = "meets" if max(both) <= 0.55 else "misses"
            print(f"  {label + ':':<11} sent {' '.join(f'{x:.1%}' for x in sent)} (nodes 0-3); sent + received "
                  f"{' '.join(f'{x:.1%}' for x in both)}; worst node {max(both):.1%}: {verdict} the issue's <= 55%")
            rs[f"ratio_to_allgather_{'measured' if label == 'measured' else '32_layers'}"] = {
                "sent": sent, "sent_and_received": both, "worst": max(both)}


def report_cost_model(args: argparse.Namespace, rows: list[dict], by_name: dict[str, dict],
                      links: dict[str, dict]) -> None:
    cores = os.cpu_count() or 1
    printed = False
    pair, one = by_name.get("1b independent"), by_name.get("1b 1x1")
    # what 2 busy cores get from the memory bus, as a multiple of one: two unrelated engines at once
    bus = pair["gen_tokens_per_s"] / one["gen_tokens_per_s"] if pair and one and cores == 2 else None
    for model, base_name in (("1b", "1b 1x1"), ("8b", "8b 1x1")):
        base = by_name.get(base_name)
        cluster_rows = [r for r in rows if r["model"] == model and r["nodes"] > 1]
        if not base or not cluster_rows:
            continue
        config = llama_1b_config() if model == "1b" else llama_8b_config(args.layers)
        weights = weight_bytes(config)
        bandwidth = weights * base["gen_tokens_per_s"]
        if not printed:
            print("\ncost model (docs/cluster.md, 'Predicting a cluster's speed'): per token, weight bytes / nodes / "
                  "bandwidth + per sync (2 per layer) 1 latency (all-gather) or 2 (reduce-scatter + all-gather) + a "
                  "node's sync bytes / rate, + the step broadcast and the replies; the bandwidth is 1 node x 1 "
                  "thread's weight bytes x tokens/s (so it holds every per-token cost but the network), latency and "
                  "rate those of the link probe. 'N machines': N nodes each on a computer of its own; 'here': the "
                  f"nodes share this machine's {cores} cores (compute / min(N, {cores}))"
                  + (f", and their memory bus: 2 busy cores read {bus:.2f}x what one does (two unrelated 1-thread "
                     f"engines at once, 1B model), so compute / {bus:.2f} from 2 nodes on" if bus else ""))
            printed = True
        print(f"{model}: {weights / 1e6:.0f} MB of weights per token, measured bandwidth {bandwidth / 1e9:.2f} GB/s")
        print(f"{'nodes':>5} {'link':>8} {'sync':>13} {'compute ms':>10} {'net ms':>7} {'pred tok/s':>10}"
              f" {'pred here':>9} {'measured':>8} {'meas sync ms':>12}")
        for r in cluster_rows:
            if r["threads"] != 1 or r["link"] not in links:
                continue
            link = links[r["link"]]
            algorithm = r.get("sync_algorithm")
            p = predict(config, r["nodes"], algorithm, bandwidth, link["rate_bps"], link["latency_s"])
            here = predict(config, r["nodes"], algorithm, bandwidth, link["rate_bps"], link["latency_s"], cores, bus)
            r["predicted"] = {"bandwidth_Bps": bandwidth, "latency_s": link["latency_s"], "rate_bps": link["rate_bps"],
                              "compute_ms": p["compute_s"] * 1e3, "network_ms": p["network_s"] * 1e3,
                              "tokens_per_s": p["tokens_per_s"], "tokens_per_s_this_machine": here["tokens_per_s"]}
            print(f"{r['nodes']:>5} {r['link'] + ('+c' if r['worker_cache'] else ''):>8} {algorithm or '-':>13}"
                  f" {p['compute_s'] * 1e3:>10.1f} {p['network_s'] * 1e3:>7.2f} {p['tokens_per_s']:>10.2f}"
                  f" {here['tokens_per_s']:>9.2f} {r['gen_tokens_per_s']:>8.2f} {r['sync_ms_per_token']:>12.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
