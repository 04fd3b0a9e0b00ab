"""Memory each node really holds, against what the plan table promises.

On the 1B-shaped q40 model (2 nodes, 1 thread each, context 1024): the root and the worker
of a cluster on 127.0.0.1, and one node alone. For each process, read from /proc while a
session runs (after a first step): anonymous resident memory (its own copies of weights, KV
cache, buffers), the resident part of the mapped model file, and the peak resident memory
since it started (VmHWM, file pages included). The plan's RAM figure for the node is printed
beside them. A table, and JSON with --json PATH. Linux only.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from model_cache import llama_1b_q40  # noqa: E402

CHILD = """
import json, sys, time
from pathlib import Path
from dllama_py.cluster.root import cluster_engine
from dllama_py.engine.engine import Engine
from dllama_py.engine.exchange import ARGMAX

model, workers = sys.argv[1], sys.argv[2:]
if workers:
    engine = cluster_engine(model, workers, threads=1, max_seq_len=1024, log=lambda m: None, progress=False)
else:
    engine = Engine(model, threads=1, max_seq_len=1024)
engine.step([1, 2, 3], 0, ARGMAX)
plan_ram = [engine.plan.node_weight_bytes(i) + engine.plan.node_kv_cache_bytes(i, engine.seq_len)
            - (engine.plan.embedding_bytes() if i == 0 else 0) for i in range(engine.plan.n_nodes)]
print(json.dumps({"plan_ram": plan_ram}), flush=True)
sys.stdin.readline()  # the parent reads /proc meanwhile
engine.close()
"""


def status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def mapped(pid: int, path: Path) -> int:
    target, rss, inside = str(path.resolve()), 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            inside = line.endswith(target)
        elif inside and line.startswith("Rss:"):
            rss += int(fields[1]) * 1024
    return rss


def measure(pid: int, model: Path) -> dict[str, int]:
    s = status(pid)
    return {"anon_bytes": s["RssAnon"], "mapped_model_bytes": mapped(pid, model), "peak_bytes": s["VmHWM"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("bench_memory reads /proc: Linux only")
        return 1
    model = llama_1b_q40()
    rows = []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = subprocess.Popen([sys.executable, "-m", "dllama_py.commands.cli", "worker", "--host", "127.0.0.1",
                               "--port", str(port), "--nthreads", "1"], stderr=subprocess.PIPE, text=True)
    try:
        assert worker.stderr is not None
        for line in worker.stderr:
            if "listening on" in line:
                break
        for label, workers in (("cluster", [f"127.0.0.1:{port}"]), ("alone", [])):
            root = subprocess.Popen([sys.executable, "-c", CHILD, str(model), *workers], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
            assert root.stdout is not None and root.stdin is not None
            plan_ram = json.loads(root.stdout.readline())["plan_ram"]
            time.sleep(0.5)
            procs = [("root" if workers else "one node", root.pid, plan_ram[0])]
            if workers:
                procs.append(("worker", worker.pid, plan_ram[1]))
            for name, pid, planned in procs:
                rows.append({"setup": label, "process": name, "plan_ram_bytes": planned, **measure(pid, model)})
            root.stdin.write("\n")
            root.stdin.flush()
            root.wait()
    finally:
        worker.kill()
        worker.wait()
    print(f"1B-shaped q40 model ({model.stat().st_size / 2**20:.0f} MiB file, "
          "f32 embedding included), context 1024, 1 thread")
    print(f"{'setup':>8} {'process':>9} {'plan RAM':>9} {'anon RSS':>9} {'mapped':>8} {'peak RSS':>9}   (MiB)")
    for r in rows:
        print(f"{r['setup']:>8} {r['process']:>9} {r['plan_ram_bytes'] / 2**20:>9.0f} {r['anon_bytes'] / 2**20:>9.0f}"
              f" {r['mapped_model_bytes'] / 2**20:>8.1f} {r['peak_bytes'] / 2**20:>9.0f}")
    print("anon RSS: the process's own memory (weights, KV cache, buffers, Python); mapped: resident pages of the "
          "model file in the process; peak: VmHWM, file pages included")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
