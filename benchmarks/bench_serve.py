"""dllama-api serving many streams at once (continuous batching): 1 to 16 concurrent clients.

    python benchmarks/bench_serve.py [--clients 1 2 4 8 16] [--tokens 128] [--json PATH] [--no-cluster]

The cached random 1B-shaped q40 model (model_cache.py) with the Llama 3 tokenizer serves, with
`--parallel 16`, on one node with 2 threads and on root + 1 worker (1 thread each: this machine
has 2 cores). Each client streams one /v1/completions request (about 128 prompt tokens, each
client's prompt different from its first word on, so nothing is reused; 128 generated tokens,
greedy, ignore_eos) with httpx, all clients at once. Measured as the clients see it: aggregate
tokens/s (all tokens over the wall time, prompts included), decoding tokens/s (every stream's rate
from its first token to its last, added), each stream's tokens/s (median), time to first token
(p50, p95), and the longest gap between two tokens of one stream. Then the late arrival: the
time to first token of a request that comes while 7 others stream, next to the same request
alone. Ratios are measured in one run (the machine's speed moves between hours).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_api import default_tokenizer  # noqa: E402
from model_cache import llama_1b_q40  # noqa: E402

BIN = Path(sys.executable).parent
BASE = ("The history of the city begins with a small group of farmers who settled along the river. Over the "
        "centuries the village grew into a market town, and later into an industrial centre with factories, "
        "railways and a busy port. The old bridge, built of stone in the fourteenth century, still carries "
        "traffic across the water, and the cathedral on the hill can be seen from every street. Merchants came "
        "from far away to trade wool, grain and salt, and the town hall kept records of every sale. Today the "
        "city is known for its university, its museums and")


def prompt_for(index: int) -> str:
    return f"Client {index} asks: {BASE}"


def start(command: list[str], url: str | None = None, ready: str | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(command, stdout=subprocess.PIPE if ready else subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    if ready:
        for line in proc.stdout:  # type: ignore[union-attr]
            if ready in line:
                threading.Thread(target=proc.stdout.read, daemon=True).start()  # type: ignore[union-attr]
                return proc
        sys.exit(f"error: {' '.join(command)} exited")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"error: {' '.join(command)} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit("error: dllama-api did not start")


def stream(url: str, prompt: str, tokens: int, first: threading.Event | None = None) -> dict:
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    sent = time.perf_counter()
    times = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=900) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                times.append(time.perf_counter())
                if first is not None:
                    first.set()
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"sent": sent, "ttft_s": times[0] - sent, "end": times[-1], "tokens": len(times),
            "tokens_per_s": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0,
            "max_gap_s": max(gaps, default=0.0)}


def clients_at_once(url: str, clients: int, tokens: int, first: int) -> dict:
    results: list[dict] = [{} for _ in range(clients)]

    def run(i: int) -> None:
        results[i] = stream(url, prompt_for(first + i), tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in results) - min(r["sent"] for r in results)
    ttft = sorted(r["ttft_s"] for r in results)
    return {
        "clients": clients,
        "aggregate_tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "stream_tokens_per_s": statistics.median(r["tokens_per_s"] for r in results),
        # every stream's rate from its first token to its last, added: the decoding throughput
        "decode_tokens_per_s": sum(r["tokens_per_s"] for r in results),
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p95_s": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))],
        "max_gap_s": max(r["max_gap_s"] for r in results),
    }


def late_arrival(url: str, tokens: int, first: int) -> dict:
    """TTFT of a request alone, then of the same-sized request arriving while 7 others stream
    (all 7 past their prompts, generating)."""
    alone = stream(url, prompt_for(first), 8)["ttft_s"]
    streaming = [threading.Event() for _ in range(7)]
    others = [threading.Thread(target=stream, args=(url, prompt_for(first + 1 + i), tokens * 2, streaming[i]))
              for i in range(7)]
    for t in others:
        t.start()
    for event in streaming:
        if not event.wait(900):
            sys.exit("error: the 7 streams did not start")
    busy = stream(url, prompt_for(first + 8), 8)["ttft_s"]
    for t in others:
        t.join()
    return {"ttft_alone_s": alone, "ttft_beside_7_s": busy, "ratio": busy / alone}


def measure(name: str, url: str, clients: list[int], tokens: int) -> dict:
    stream(url, prompt_for(999), 4)  # warm-up
    rows, first = [], 0
    for n in clients:
        row = clients_at_once(url, n, tokens, first)
        first += n
        rows.append(row)
        print(f"  {name}: {n:2d} clients: {row['aggregate_tokens_per_s']:6.2f} tok/s in all, "
              f"{row['decode_tokens_per_s']:6.2f} decoding, "
              f"{row['stream_tokens_per_s']:5.2f} per stream, TTFT p50 {row['ttft_p50_s']:.2f} s "
              f"p95 {row['ttft_p95_s']:.2f} s, longest gap {row['max_gap_s']:.2f} s", flush=True)
    late = late_arrival(url, tokens, first)
    one = next((r for r in rows if r["clients"] == 1), None)
    eight = next((r for r in rows if r["clients"] == 8), None)
    ratios = {"late_ttft_ratio": late["ratio"]}
    if one and eight:
        ratios["aggregate_8_over_1"] = eight["aggregate_tokens_per_s"] / one["aggregate_tokens_per_s"]
        ratios["stream_8_over_1"] = eight["stream_tokens_per_s"] / one["stream_tokens_per_s"]
        ratios["decode_8_over_1"] = eight["decode_tokens_per_s"] / one["decode_tokens_per_s"]
    return {"setup": name, "rows": rows, "late_arrival": late, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--no-cluster", action="store_true", help="only the one-node setup")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    model, tokenizer = llama_1b_q40(), default_tokenizer()
    parallel = str(max(max(args.clients), 8))
    setups = [("1 node, 2 threads", [], "2")]
    if not args.no_cluster:
        setups.append(("root + 1 worker, 1 thread each", ["worker"], "1"))
    results = []
    for name, workers, threads in setups:
        port = 21000 + os.getpid() % 10000
        worker_proc = None
        extra = []
        if workers:
            worker_port = port + 1
            worker_proc = start([str(BIN / "dllama"), "worker", "--host", "127.0.0.1", "--port", str(worker_port),
                                 "--nthreads", "1"], ready="waiting")
            extra = ["--workers", f"127.0.0.1:{worker_port}"]
        url = f"http://127.0.0.1:{port}"
        server = start([str(BIN / "dllama-api"), "--model", str(model), "--tokenizer", str(tokenizer), "--port",
                        str(port), "--nthreads", threads, "--max-seq-len", "512", "--parallel", parallel,
                        "--chat-template", "llama3", *extra], url=url)
        try:
            results.append(measure(name, url, args.clients, args.tokens))
        finally:
            server.terminate()
            server.wait(60)
            if worker_proc is not None:
                worker_proc.terminate()
                worker_proc.wait(60)
    print()
    print("| setup | clients | aggregate tok/s | decoding tok/s | per-stream tok/s | TTFT p50 s | TTFT p95 s | "
          "longest gap s |")
    print("|---|---|---|---|---|---|---|---|")
    for result in results:
        for row in result["rows"]:
            print(f"| {result['setup']} | {row['clients']} | {row['aggregate_tokens_per_s']:.2f} | "
                  f"{row['decode_tokens_per_s']:.2f} | "
                  f"{row['stream_tokens_per_s']:.2f} | {row['ttft_p50_s']:.2f} | {row['ttft_p95_s']:.2f} | "
                  f"{row['max_gap_s']:.2f} |")
    print()
    for result in results:
        late, ratios = result["late_arrival"], result["ratios"]
        print(f"{result['setup']}: aggregate 8/1 clients {ratios.get('aggregate_8_over_1', 0):.2f}x (target >= 4), "
              f"decoding 8/1 {ratios.get('decode_8_over_1', 0):.2f}x, "
              f"per stream 8/1 {ratios.get('stream_8_over_1', 0):.2f}x (target >= 0.5), "
              f"TTFT beside 7 streams {late['ttft_beside_7_s']:.2f} s vs {late['ttft_alone_s']:.2f} s alone "
              f"= {late['ratio']:.2f}x (target <= 2)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
