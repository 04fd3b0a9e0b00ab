"""Soak: many mixed requests against a live dllama-api; its memory at the start and the end.

    python benchmarks/bench_soak.py [--requests 1000] [--clients 4] [--json PATH]

A dllama-api process serves stories260K (converted from the shared test data into a temporary
folder). After a warm-up of 50 requests its resident memory (VmRSS) is read, then `--requests`
requests are sent by `--clients` threads, each kind in turn from a seeded random choice:
- chat: a whole chat answer (8 to 24 tokens);
- stream: a streamed completion read to its [DONE];
- cancel: a streamed chat whose client hangs up after the first chunk;
- invalid: bad JSON, a wrong type, an unknown model, max_tokens over the context, an unknown role
  (each must be a 4xx in OpenAI's error shape);
- json: a json_object answer (constrained decoding);
- logprobs: a completion with top-3 log-probabilities.
Then the memory is read again and /health must say the model is loaded. Prints a table (count,
failures, latency per kind, RSS before and after) and writes JSON. tests/test_soak.py runs the same
at a smaller count and asserts that the memory stays flat.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTDATA = Path(os.environ.get("DLLAMA_TESTDATA", REPO_ROOT.parent / "shared" / "testdata"))
BIN = Path(sys.executable).parent
KINDS = ("chat", "stream", "cancel", "invalid", "json", "logprobs")
HI = [{"role": "user", "content": "Tell me a story."}]
INVALID = [
    (b"{not json", 400),
    (json.dumps({"messages": "hello"}).encode(), 400),
    (json.dumps({"model": "no-such-model", "messages": HI}).encode(), 404),
    (json.dumps({"messages": HI, "max_tokens": 10**6}).encode(), 400),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400),
]


def resident_bytes(pid: int) -> int:
    """VmRSS of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def one_request(client: httpx.Client, url: str, kind: str, rng: random.Random) -> str | None:
    """Send one request of `kind`; returns None when the answer is what it should be, else why not."""
    if kind == "chat":
        r = client.post(f"{url}/v1/chat/completions", json={"messages": HI, "max_tokens": rng.randint(8, 24)})
        return None if r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None \
            else f"chat: {r.status_code} {r.text[:200]}"
    if kind == "stream":
        body = {"prompt": "Once upon a time", "max_tokens": rng.randint(8, 24), "stream": True}
        with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            text = "".join(r.iter_text())
        return None if r.status_code == 200 and text.endswith("data: [DONE]\n\n") else f"stream: {r.status_code}"
    if kind == "cancel":
        body = {"messages": HI, "max_tokens": 200, "stream": True}
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            for _ in r.iter_bytes():
                break  # hang up after the first chunk
        return None if r.status_code == 200 else f"cancel: {r.status_code}"
    if kind == "invalid":
        payload, status = rng.choice(INVALID)
        r = client.post(f"{url}/v1/chat/completions", content=payload, headers={"Content-Type": "application/json"})
        error = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
        ok = r.status_code == status and set(error) == {"message", "type", "param", "code"}
        return None if ok else f"invalid: {r.status_code} {r.text[:200]}"
    if kind == "json":
        r = client.post(f"{url}/v1/chat/completions", json={"messages": HI, "max_tokens": 24, "temperature": 0.8,
                                                            "response_format": {"type": "json_object"}})
        return None if r.status_code == 200 else f"json: {r.status_code} {r.text[:200]}"
    r = client.post(f"{url}/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 8, "logprobs": 3})
    return None if r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["tokens"]) <= 8 \
        else f"logprobs: {r.status_code} {r.text[:200]}"


def soak(url: str, requests: int, clients: int = 4, seed: int = 0) -> dict:
    """Send `requests` mixed requests from `clients` threads; per kind: count, failures, latencies."""
    lock = threading.Lock()
    latencies: dict[str, list[float]] = defaultdict(list)
    failures: list[str] = []
    counter = iter(range(requests))

    def client_loop(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        with httpx.Client(timeout=120) as client:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                kind = rng.choice(KINDS)
                start = time.perf_counter()
                try:
                    problem = one_request(client, url, kind, rng)
                except httpx.HTTPError as error:
                    problem = f"{kind}: {type(error).__name__}: {error}"
                with lock:
                    latencies[kind].append(time.perf_counter() - start)
                    if problem:
                        failures.append(problem)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": dict(latencies), "failures": failures}


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    model, tok = folder / "stories260K.m", folder / "tok512.t"
    subprocess.run([str(BIN / "convert-hf"), str(TESTDATA / "stories260K_hf"), "f32", "stories", "--output",
                    str(model), "--quiet"], check=True)
    subprocess.run([str(BIN / "convert-tokenizer"), str(TESTDATA / "stories260K" / "tok512.model"), "tok512",
                    "--output", str(tok)], check=True, capture_output=True)
    port = 20000 + os.getpid() % 20000
    proc = subprocess.Popen([str(BIN / "dllama-api"), "--model", str(model), "--tokenizer", str(tok), "--port",
                             str(port), "--nthreads", "1", "--chat-template", "chatml", "--max-queued", "64"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("dllama-api did not start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        proc, url = start_server(Path(folder))
        try:
            soak(url, 50, args.clients, seed=99)  # warm-up: every path once, caches filled
            before = resident_bytes(proc.pid)
            start = time.perf_counter()
            result = soak(url, args.requests, args.clients)
            seconds = time.perf_counter() - start
            after = resident_bytes(proc.pid)
            health = httpx.get(f"{url}/health", timeout=10).json()
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"{args.requests} requests from {args.clients} clients in {seconds:.1f} s; "
          f"{len(result['failures'])} failures; model loaded after: {health['model_loaded']}")
    print("| kind | requests | median s | max s |")
    print("|---|---|---|---|")
    for kind in KINDS:
        values = result["latencies"].get(kind, [])
        if values:
            print(f"| {kind} | {len(values)} | {statistics.median(values):.3f} | {max(values):.3f} |")
    print(f"RSS before {before / 2**20:.1f} MiB, after {after / 2**20:.1f} MiB, "
          f"growth {(after - before) / 2**20:+.1f} MiB")
    for failure in result["failures"][:10]:
        print("failure:", failure)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "requests": args.requests, "clients": args.clients, "seconds": seconds,
            "failures": result["failures"], "rss_before": before, "rss_after": after,
            "served": health["requests"],
            "latency": {k: {"n": len(v), "median_s": statistics.median(v), "max_s": max(v)}
                        for k, v in result["latencies"].items()},
        }, indent=1))
        print(f"wrote {args.json}")
    return 1 if result["failures"] or not health["model_loaded"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
