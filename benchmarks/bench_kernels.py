"""Kernel benchmark: memory read bandwidth and the Q40-weight / Q80-input matmul, in the file's
layout (`q40`) and, on paths with a kernel for it, regrouped 16 rows at a time (`q40x16`, what the
engine uses there).

Weights come from memory, not cache: every timing cycles through enough distinct matrices
(at least --pool-gib GiB) that no matrix is still cached when it is used again.
Prints a table and writes JSON (--json PATH).

    python benchmarks/bench_kernels.py --json bench_kernels.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from dllama_py.model import kernels

SHAPES = ((4096, 14336), (2048, 8192))
GIB = 1 << 30


def measure_bandwidth(threads: int, gib: float, repeats: int) -> float:
    """Median GB/s of a plain streaming read of a `gib` GiB buffer on `threads` threads."""
    kernels.set_num_threads(threads)
    buf = np.ones(int(gib * GIB), dtype=np.uint8)
    kernels.stream_read(buf)  # fault the pages in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        kernels.stream_read(buf)
        times.append(time.perf_counter() - t0)
    return buf.nbytes / statistics.median(times) / 1e9


def make_q40_pool(rows: int, cols: int, pool_bytes: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Distinct random Q40 matrices (rows, cols/32*18) totalling at least pool_bytes."""
    nb = cols // 32
    one = rows * nb * 18
    count = max(2, -(-pool_bytes // one))
    pool = []
    for _ in range(count):
        w = rng.integers(0, 256, size=(rows, nb, 18), dtype=np.uint8)
        # A sane fp16 scale (about 0.01) in every block; the nibbles stay random.
        w[:, :, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
        pool.append(w.reshape(rows, nb * 18))
    return pool


def time_matmul(pool: list[np.ndarray], x: np.ndarray, y: np.ndarray, min_seconds: float, repeats: int,
                layout: str = "q40") -> float:
    """Median seconds per matmul while cycling through the pool (one cycle = every matrix once)."""
    for w in pool[:2]:
        kernels.matmul(x, w, layout, y)
    per_call = []
    for _ in range(repeats):
        calls = 0
        t0 = time.perf_counter()
        while True:
            for w in pool:
                kernels.matmul(x, w, layout, y)
            calls += len(pool)
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds:
                break
        per_call.append(elapsed / calls)
    return statistics.median(per_call)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default 1 2)")
    parser.add_argument("--isa", nargs="+", default=None, help="SIMD paths (default: every path this CPU runs)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes (default 1 32)")
    parser.add_argument("--pool-gib", type=float, default=1.0, help="GiB of distinct matrices per shape (>= 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per configuration (median)")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="minimum length of one timed round")
    args = parser.parse_args(argv)

    isas = args.isa or kernels.supported_isas()
    rng = np.random.default_rng(0)
    bandwidth = {}
    for t in args.threads:
        bandwidth[str(t)] = measure_bandwidth(t, max(1.0, args.pool_gib), args.repeats + 2)
        print(f"read bandwidth, {t} thread(s): {bandwidth[str(t)]:.1f} GB/s", flush=True)

    results = []
    header = (f"{'shape':>12} {'B':>3} {'thr':>3} {'isa':>15} {'ms/matmul':>10} {'weight GB/s':>11}"
              f" {'% of read bw':>12} {'Gop/s':>8}")
    print(header)
    print("-" * len(header))
    for rows, cols in SHAPES:
        pool = make_q40_pool(rows, cols, int(args.pool_gib * GIB), rng)
        weight_bytes = pool[0].nbytes
        # The engine regroups Q40 weights 16 rows at a time on paths with a fast kernel for that.
        regrouped = []
        for isa in isas:
            kernels.set_isa(isa)
            if kernels.q40x16_fast() and not regrouped:
                regrouped = [kernels.repack_q40x16(w) for w in pool]
        for batch in args.batch:
            x = kernels.quantize_q80(rng.standard_normal((batch, cols), dtype=np.float32))
            y = np.zeros((batch, rows), dtype=np.float32)
            for isa in isas:
                kernels.set_isa(isa)
                layouts = [("q40", pool)] + ([("q40x16", regrouped)] if kernels.q40x16_fast() else [])
                for layout, matrices in layouts:
                    for t in args.threads:
                        kernels.set_num_threads(t)
                        slow = isa == "scalar" and batch > 1
                        seconds = time_matmul(matrices, x, y, 0.0 if slow else args.min_seconds,
                                              1 if slow else args.repeats, layout)
                        gbs = weight_bytes / seconds / 1e9
                        row = {
                            "rows": rows, "cols": cols, "weight": layout, "input": "q80", "batch": batch,
                            "threads": t, "isa": isa, "seconds": seconds, "weight_gbs": gbs,
                        }
                        results.append(row)
                        pct = 100 * gbs / bandwidth[str(t)] if str(t) in bandwidth else float("nan")
                        gops = 2 * rows * cols * batch / seconds / 1e9
                        name = isa if layout == "q40" else f"{isa}/x16"
                        print(f"{rows:>5}x{cols:<6} {batch:>3} {t:>3} {name:>15} {seconds * 1e3:>10.3f}"
                              f" {gbs:>11.2f} {pct:>11.1f}% {gops:>8.1f}", flush=True)
        del pool, regrouped
    kernels.set_isa(kernels.best_isa())

    best = {}
    for r in results:
        key = (r["rows"], r["cols"], r["batch"], r["threads"])
        if key not in best or r["seconds"] < best[key]["seconds"]:
            best[key] = r
    print("\nbest path per configuration:")
    for (rows, cols, batch, t), r in sorted(best.items()):
        line = f"  {rows}x{cols} B={batch} threads={t}: {r['isa']} {r['weight']}, {r['weight_gbs']:.2f} GB/s"
        if batch == 1 and str(t) in bandwidth:
            line += f" = {100 * r['weight_gbs'] / bandwidth[str(t)]:.0f}% of read bandwidth"
        if batch > 1 and (rows, cols, 1, t) in best:
            ratio = best[(rows, cols, 1, t)]["seconds"] * batch / r["seconds"]
            line += f"; rows x tokens per second {ratio:.1f}x of B=1"
        print(line)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"read_bandwidth_gbs": bandwidth, "results": results}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
