"""Cluster speed on the 1B-shaped q40 model (q80 buffers), in one run:

  1 node x 1 thread, 1 node x 2 threads, root + 1 worker x 1 thread each on 127.0.0.1, and,
  where the machine allows it (root, `ip netns`, `tc`), root + worker in two network
  namespaces joined by a veth pair shaped to 1 Gbit/s with `tc tbf` like a home switch.
  This kernel has no `netem`, so no latency is added: the 1gbit row shows the cost of the
  bandwidth only. A second 1gbit row (`1gbit+c`, "worker_cache": true) uses a worker whose
  slice cache (`dllama worker --cache-dir`) already holds its slices: the startup of every run
  of a model after the first.

It also runs two unrelated 1-thread engines at the same time: their tokens/s added up is the
most that two single-thread nodes sharing this machine's memory bus can reach (each node of a
2-node cluster streams half the weights per token), so it shows how far root + worker is from
the hardware's limit rather than from an ideal 2x. The 2-node JSON rows carry it as
"bus_ceiling_gen_tokens_per_s" and "share_of_bus_ceiling".

Per configuration (medians of --repeats fresh runs, taken round-robin so that drifts in the
machine's load touch every configuration alike): generation and prompt tokens/s, sync ms per
token, bytes sent and received per token by the root, and seconds from start (connect, ship
slices, load) to the first generated token. Prints a table and writes JSON (--json PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
from model_cache import llama_1b_q40  # noqa: E402

NS_ROOT, NS_WORKER = "dllama-bench-root", "dllama-bench-worker"
ROOT_IP, WORKER_IP = "10.213.0.1", "10.213.0.2"


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
    engine.close()
    per_token = [s.compute_ms + s.sync_ms for s in stats]
    return {
        "gen_tokens_per_s": 1e3 / statistics.median(per_token),
        "prompt_tokens_per_s": prompt_tokens / prompt_s,
        "sync_ms_per_token": statistics.median(s.sync_ms for s in stats),
        "bytes_sent_per_token": statistics.median(s.bytes_sent for s in stats),
        "bytes_received_per_token": statistics.median(s.bytes_received for s in stats),
        "seconds_to_first_token": first_token_s,
        "root_ff_share": root_share,
    }


def start_worker(prefix: list[str], host: str, port: int, threads: int, extra: list[str] | None = None
                 ) -> subprocess.Popen:
    worker = subprocess.Popen(prefix + [sys.executable, "-m", "dllama_py.commands.cli", "worker", "--host", host,
                                        "--port", str(port), "--nthreads", str(threads)] + (extra or []),
                              stderr=subprocess.PIPE, text=True)
    assert worker.stderr is not None
    for line in worker.stderr:
        if "listening on" in line:
            # keep reading its log, so that a full pipe never blocks it
            threading.Thread(target=lambda: [None for _ in worker.stderr], daemon=True).start()
            return worker
    raise RuntimeError("worker did not start")


def child_command(prefix: list[str], args: argparse.Namespace, threads: int, workers: list[str]) -> list[str]:
    return prefix + [sys.executable, str(Path(__file__).resolve()), "--child", "--model", str(args.model),
                     "--threads", str(threads), "--gen-tokens", str(args.gen_tokens),
                     "--prompt-tokens", str(args.prompt_tokens)] + (["--workers", *workers] if workers else [])


def run_children(commands: list[list[str]]) -> list[dict]:
    """Start every command at once (fresh processes) and return each one's result."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd in commands]
    results = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark child failed ({proc.returncode}): {err.strip()[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def medians(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def independent_pair(args: argparse.Namespace) -> dict:
    """Two 1-node x 1-thread engines that generate at the same moment; their speeds added up.
    (Loading takes a few seconds; both wait for a common start, so that neither generates alone.)"""
    start = ["--gen-start-at", f"{time.time() + 8.0:.3f}"]
    a, b = run_children([child_command([], args, 1, []) + start, child_command([], args, 1, []) + start])
    return {"gen_tokens_per_s": a["gen_tokens_per_s"] + b["gen_tokens_per_s"],
            "prompt_tokens_per_s": a["prompt_tokens_per_s"] + b["prompt_tokens_per_s"],
            "seconds_to_first_token": max(a["seconds_to_first_token"], b["seconds_to_first_token"])}


def netns_available() -> bool:
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        return False
    ok = subprocess.run(["ip", "netns", "add", "dllama-bench-probe"], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "del", "dllama-bench-probe"], capture_output=True)
    return ok


def netns_up() -> None:
    def sh(*cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True)

    netns_down()
    sh("ip", "netns", "add", NS_ROOT)
    sh("ip", "netns", "add", NS_WORKER)
    sh("ip", "link", "add", "dlb-root", "netns", NS_ROOT, "type", "veth", "peer", "name", "dlb-worker", "netns",
       NS_WORKER)
    for ns, dev, ip in ((NS_ROOT, "dlb-root", ROOT_IP), (NS_WORKER, "dlb-worker", WORKER_IP)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", "1gbit",
           "burst", "128kb", "latency", "50ms")


def netns_down() -> None:
    for ns in (NS_ROOT, NS_WORKER):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--model", type=Path, default=None, help="q40 model (default: the cached 1B-shaped one)")
    parser.add_argument("--no-netns", action="store_true", help="skip the network-namespace configuration")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (medians; default 3)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--workers", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--shares", nargs="+", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--gen-start-at", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.model = args.model or llama_1b_q40()
    if args.child:
        shares = args.shares if args.shares is None or args.shares != ["auto"] else "auto"
        if isinstance(shares, list):
            shares = [float(x) for x in shares]
        print(json.dumps(run_config(args.model, args.threads, args.workers, args.gen_tokens, args.prompt_tokens,
                                    shares, args.gen_start_at)))
        return 0

    netns = not args.no_netns and netns_available()
    # name -> (nodes, threads, link, what one run does)
    configs: dict[str, tuple[int, int, str, Callable[[], dict]]] = {
        "1x1": (1, 1, "loopback", lambda: run_children([child_command([], args, 1, [])])[0]),
        "1x2": (1, 2, "loopback", lambda: run_children([child_command([], args, 2, [])])[0]),
        "2x1": (2, 1, "loopback", lambda: run_children([child_command([], args, 1, ["127.0.0.1:29998"])])[0]),
        # Two unrelated 1-thread engines at once: what the memory bus gives two busy cores. A
        # node of a 2-node cluster reads half the weights per token, so the pair's tokens/s
        # added up is the most root + worker can reach on this machine.
        "independent": (2, 1, "none", lambda: independent_pair(args)),
    }
    if netns:
        configs["2x1 1gbit"] = (2, 1, "1gbit", lambda: run_children(
            [child_command(["ip", "netns", "exec", NS_ROOT], args, 1, [f"{WORKER_IP}:9998"])])[0])
        # The same with a worker whose slice cache (--cache-dir) already holds its slices: the
        # startup a user sees from the second run of a model on.
        configs["2x1 1gbit cached"] = (2, 1, "1gbit", lambda: run_children(
            [child_command(["ip", "netns", "exec", NS_ROOT], args, 1, [f"{WORKER_IP}:9997"])])[0])
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    workers = [start_worker([], "127.0.0.1", 29998, 1)]
    cache_dir = tempfile.TemporaryDirectory(prefix="dllama-bench-cache-")
    try:
        if netns:
            netns_up()
            workers.append(start_worker(["ip", "netns", "exec", NS_WORKER], WORKER_IP, 9998, 1))
            workers.append(start_worker(["ip", "netns", "exec", NS_WORKER], WORKER_IP, 9997, 1,
                                        ["--cache-dir", cache_dir.name]))
            configs["2x1 1gbit cached"][3]()  # fills the cache
        # Round-robin: every configuration once per round, so that a change in the machine's
        # load or memory bandwidth during the run touches every configuration alike.
        for round_index in range(args.repeats):
            for name, (_, _, _, run) in configs.items():
                runs[name].append(run())
            print(f"round {round_index + 1} of {args.repeats} done", file=sys.stderr, flush=True)
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
        if netns:
            netns_down()
        cache_dir.cleanup()

    rows = []
    print(f"{'nodes':>5} {'threads':>7} {'link':>8} {'gen tok/s':>9} {'prompt tok/s':>12} {'sync ms':>8}"
          f" {'sent kB':>8} {'recv kB':>8} {'1st tok s':>8}")
    for name, (nodes, threads, link, _) in configs.items():
        if name == "independent":
            continue
        cached = name.endswith("cached")
        r = {"nodes": nodes, "threads": threads, "link": link, **medians(runs[name]), "worker_cache": cached}
        rows.append(r)
        print(f"{nodes:>5} {threads:>7} {link + ('+c' if cached else ''):>8} {r['gen_tokens_per_s']:>9.2f}"
              f" {r['prompt_tokens_per_s']:>12.2f}"
              f" {r['sync_ms_per_token']:>8.2f} {r['bytes_sent_per_token'] / 1e3:>8.1f}"
              f" {r['bytes_received_per_token'] / 1e3:>8.1f} {r['seconds_to_first_token']:>8.2f}", flush=True)
    if not netns:
        print("1gbit: skipped (needs root, ip netns and tc)")
    else:
        print("note: 1gbit is a tc tbf rate limit on a veth pair; this kernel has no netem, so no latency was added;"
              " 1gbit+c: the worker's slice cache (--cache-dir) already held its slices")
    base = rows[0]["gen_tokens_per_s"]
    for r in rows[1:]:
        if r["worker_cache"]:
            continue
        print(f"{r['nodes']} node(s) x {r['threads']} thread(s), {r['link']}: {r['gen_tokens_per_s'] / base:.2f}x "
              "the generation speed of 1 node x 1 thread")
    pair = medians(runs["independent"])
    ceiling = pair["gen_tokens_per_s"]
    cluster = next(r for r in rows if r["nodes"] == 2 and r["link"] == "loopback")
    print(f"memory-bus ceiling: two 1-thread engines running at once make {ceiling:.2f} tokens/s together "
          f"({ceiling / base:.2f}x one alone); root + worker on loopback reaches "
          f"{cluster['gen_tokens_per_s'] / ceiling:.0%} of that")
    # Rows are the configurations; the ceiling rides along on the 2-node rows.
    for r in rows:
        if r["nodes"] == 2:
            r["bus_ceiling_gen_tokens_per_s"] = ceiling  # two unrelated 1-thread engines at once, added up
            r["share_of_bus_ceiling"] = r["gen_tokens_per_s"] / ceiling
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
