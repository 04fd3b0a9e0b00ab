"""Weighted plans (`--shares`) on a cluster whose nodes differ in speed.

Root (the best SIMD path here) + 1 worker on 127.0.0.1, 1 thread each, on the 1B-shaped q40
model with q80 buffers. The worker is made slower by forcing a slower SIMD path on it
(DLLAMA_ISA=avx2 or scalar): a stand-in for a home cluster of unequal computers (a laptop and
a mini PC, a Raspberry Pi). Each pair runs with equal shares and with `--shares auto`, which
weighs every node by the matmul speed it measured. The table gives generation tokens/s (median
of --repeats fresh runs, taken round-robin), the root's part of the feed-forward rows, and the
speed-up that auto gives over equal shares. JSON with --json PATH.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_cluster import child_command, run_children, start_worker  # noqa: E402
from model_cache import llama_1b_q40  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (medians; default 3)")
    parser.add_argument("--gen-tokens", type=int, default=48)
    parser.add_argument("--worker-isas", nargs="+", default=["avx2", "scalar"],
                        help="SIMD paths forced on the worker (default: avx2 scalar)")
    args = parser.parse_args(argv)
    args.model = llama_1b_q40()
    args.prompt_tokens = 32

    import os

    from dllama_py.model import kernels

    isas = [isa for isa in args.worker_isas if isa in kernels.supported_isas()]
    rows = []
    for i, isa in enumerate(isas):
        port = 29960 + i
        env_isa = os.environ.get("DLLAMA_ISA")
        os.environ["DLLAMA_ISA"] = isa
        try:
            worker = start_worker([], "127.0.0.1", port, 1)
        finally:
            if env_isa is None:
                del os.environ["DLLAMA_ISA"]
            else:
                os.environ["DLLAMA_ISA"] = env_isa
        try:
            runs: dict[str, list[dict]] = {"equal": [], "auto": []}
            for _ in range(args.repeats):
                for mode in runs:
                    cmd = child_command([], args, 1, [f"127.0.0.1:{port}"])
                    if mode == "auto":
                        cmd += ["--shares", "auto"]
                    runs[mode].append(run_children([cmd])[0])
        finally:
            worker.kill()
            worker.wait()
        for mode, results in runs.items():
            rows.append({"worker_isa": isa, "shares": mode,
                         "gen_tokens_per_s": statistics.median(r["gen_tokens_per_s"] for r in results),
                         "root_ff_share": statistics.median(r["root_ff_share"] for r in results)})
    print(f"root SIMD path {kernels.best_isa()}, 1 thread per node, loopback")
    print(f"{'worker isa':>10} {'shares':>6} {'gen tok/s':>9} {'root ff share':>13}")
    for r in rows:
        print(f"{r['worker_isa']:>10} {r['shares']:>6} {r['gen_tokens_per_s']:>9.2f} {r['root_ff_share']:>13.0%}")
    for isa in isas:
        equal, auto = (next(r for r in rows if r["worker_isa"] == isa and r["shares"] == m) for m in ("equal", "auto"))
        print(f"worker on {isa}: --shares auto runs {auto['gen_tokens_per_s'] / equal['gen_tokens_per_s']:.2f}x "
              "as fast as equal shares")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
