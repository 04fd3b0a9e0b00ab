"""Network benchmark: all-gather latency and throughput of the C++ Mesh on loopback.

Each node is its own process (as in a real cluster), connected over TCP on 127.0.0.1.
Prints a table and writes JSON (--json PATH).

    python benchmarks/bench_net.py --json bench_net.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import statistics
import struct
import time
from typing import Any

import numpy as np

from dllama_py._core import Mesh

SLICE_SIZES = (2 * 1024, 64 * 1024, 4 * 1024 * 1024)


def connect_mesh(index: int, n: int, ports: Any, my_queue: Any) -> Mesh:
    """Full mesh: every node listens; higher indices connect to lower ones and say who they are."""
    server = socket.create_server(("127.0.0.1", 0))
    ports.put((index, server.getsockname()[1]))
    all_ports: list[int] = my_queue.get(timeout=30)
    socks: list[socket.socket | None] = [None] * n
    for j in range(index):
        s = socket.create_connection(("127.0.0.1", all_ports[j]), timeout=10)
        s.sendall(struct.pack("<I", index))
        socks[j] = s
    for _ in range(index + 1, n):
        s, _ = server.accept()
        s.settimeout(10)
        (j,) = struct.unpack("<I", s.recv(4, socket.MSG_WAITALL))
        socks[j] = s
    server.close()
    names = ["self" if j == index else f"127.0.0.1:{all_ports[j]}" for j in range(n)]
    return Mesh(index, n, [-1 if s is None else s.detach() for s in socks], names, 10_000)


def node_main(index: int, n: int, seconds: float, ports: Any, my_queue: Any, results: Any) -> None:
    """Times all_gather for every slice size; node 0 reports per-call times."""
    mesh = connect_mesh(index, n, ports, my_queue)
    rows = []
    for slice_bytes in SLICE_SIZES:
        buf = np.zeros(n * slice_bytes, np.uint8)
        for _ in range(5):  # warm-up
            mesh.all_gather(buf, slice_bytes, "warm-up")
        # Every node must run the same number of calls: derive it from one timed probe on node 0.
        probe = np.zeros(1, np.float64)
        if index == 0:
            t0 = time.perf_counter()
            for _ in range(20):
                mesh.all_gather(buf, slice_bytes, "probe")
            probe[0] = (time.perf_counter() - t0) / 20
        else:
            for _ in range(20):
                mesh.all_gather(buf, slice_bytes, "probe")
        mesh.broadcast(0, probe, "probe")
        iterations = max(20, min(20_000, int(seconds / probe[0])))
        mesh.reset_counters()
        times = np.empty(iterations)
        for k in range(iterations):
            t0 = time.perf_counter()
            mesh.all_gather(buf, slice_bytes, "bench")
            times[k] = time.perf_counter() - t0
        if index == 0:
            rows.append(
                {
                    "slice_bytes": slice_bytes,
                    "iterations": iterations,
                    "median_us": statistics.median(times) * 1e6,
                    "p90_us": float(np.percentile(times, 90)) * 1e6,
                    "bytes_sent": mesh.bytes_sent,
                    "bytes_received": mesh.bytes_received,
                    "received_mb_per_s": mesh.bytes_received / times.sum() / 1e6,
                }
            )
    mesh.close()
    if index == 0:
        results.put(rows)


def run(n: int, seconds: float) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    ports, results = ctx.Queue(), ctx.Queue()
    queues = [ctx.Queue() for _ in range(n)]
    procs = [ctx.Process(target=node_main, args=(i, n, seconds, ports, queues[i], results)) for i in range(n)]
    for p in procs:
        p.start()
    found = dict(ports.get(timeout=60) for _ in range(n))
    for q in queues:
        q.put([found[i] for i in range(n)])
    rows = results.get(timeout=600)
    for p in procs:
        p.join(30)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=2, help="processes in the mesh (default 2)")
    parser.add_argument("--seconds", type=float, default=1.0, help="time spent per slice size (default 1)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()

    rows = run(args.nodes, args.seconds)
    print(f"all_gather on loopback, {args.nodes} nodes (one process each), seen from node 0")
    print(f"{'slice':>10} {'calls':>7} {'median us':>10} {'p90 us':>10} {'recv MB/s':>10}")
    for r in rows:
        size = r["slice_bytes"]
        label = f"{size // (1 << 20)} MiB" if size >= 1 << 20 else f"{size // 1024} KiB"
        print(
            f"{label:>10} {r['iterations']:>7} {r['median_us']:>10.1f} {r['p90_us']:>10.1f} "
            f"{r['received_mb_per_s']:>10.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"benchmark": "net", "link": "loopback", "nodes": args.nodes, "rows": rows}, f, indent=2
            )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
