"""dllama-api's speed beside `dllama inference`: time to first token and tokens/s, 1 and 4 clients.

    python benchmarks/bench_api.py [--model M --tokenizer T] [--tokens 64] [--threads K] [--json PATH]

Without --model it uses the cached random 1B-shaped q40 model of model_cache.py (made once, as
bench_generate.py does) with the Llama 3 tokenizer from the shared test data (converted once into
the same cache). Random weights make random text; EOS is ignored so every request generates
exactly --tokens tokens. Each request has its own prompt (a different first word), so none reuses
another's KV cache.

Measured as a client sees it, wall clock:
- `dllama inference --json`: time from the prompt line to the first token line (prompt
  evaluation + first token), then time per token between token lines.
- dllama-api, streaming /v1/completions: time from sending the request to the first text chunk,
  then time per token between the first and the last chunk; with 4 clients at once (served one
  after another) also the total tokens/s.
The API's overhead is its time per token over dllama inference's (issue 6 target: under 5 %).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_cache import CACHE, llama_1b_q40

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTDATA = Path(os.environ.get("DLLAMA_TESTDATA", REPO_ROOT.parent / "shared" / "testdata"))
BIN = Path(sys.executable).parent
PROMPT = (
    "The history of the city begins with a small group of farmers who settled along the river. "
    "Over the centuries the village grew into a market town, and later into an industrial centre "
    "with factories, railways and a busy port. Today it is known for"
)


def default_tokenizer() -> Path:
    """The Llama 3 tokenizer (vocabulary 128256, as the 1B-shaped model) as a .t file, converted once."""
    path = CACHE / "dllama_tokenizer_llama3.t"
    if not path.exists():
        source = TESTDATA / "llama3_tokenizer"
        if not source.is_dir():
            sys.exit(f"error: {source} not found; pass --tokenizer (or set DLLAMA_TESTDATA)")
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [str(BIN / "convert-tokenizer"), str(source), "llama3", "--output", str(path)], check=True
        )
    return path


def prompt_for(index: int) -> str:
    words = [
        "Alpha",
        "Bravo",
        "Charlie",
        "Delta",
        "Echo",
        "Foxtrot",
        "Golf",
        "Hotel",
        "India",
        "Juliet",
        "Kilo",
        "Lima",
        "Mike",
        "November",
        "Oscar",
        "Papa",
    ]
    return f"{words[index % len(words)]} {index}. {PROMPT}"


# ---- dllama inference -----------------------------------------------------------------------


def run_inference(args: argparse.Namespace, index: int) -> dict:
    command = [
        str(BIN / "dllama"),
        "inference",
        "--model",
        str(args.model),
        "--tokenizer",
        str(args.tokenizer),
        "--prompt",
        prompt_for(index),
        "--steps",
        str(args.tokens),
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
        "--max-seq-len",
        str(args.max_seq_len),
    ]
    if args.threads:
        command += ["--nthreads", str(args.threads)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    prompt_at, token_times, stats = None, [], {}
    assert process.stdout is not None
    for line in process.stdout:
        now = time.perf_counter()
        record = json.loads(line)
        if "prompt_ids" in record:
            prompt_at = now
            prompt_tokens = len(record["prompt_ids"])
        elif "id" in record:
            token_times.append(now)
        elif "stats" in record:
            stats = record["stats"]
    if process.wait() != 0:
        sys.exit(f"error: {' '.join(command)} failed with {process.returncode}")
    return {
        "ttft_s": token_times[0] - prompt_at,
        "s_per_token": per_token(token_times),
        "tokens": len(token_times),
        "prompt_tokens": prompt_tokens,
        "engine_ms_per_token": stats["gen_ms_per_token"],
    }


def per_token(times: list[float]) -> float:
    return (times[-1] - times[0]) / max(1, len(times) - 1)


# ---- dllama-api -----------------------------------------------------------------------------


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    url = f"http://127.0.0.1:{args.port}"
    command = [
        str(BIN / "dllama-api"),
        "--model",
        str(args.model),
        "--tokenizer",
        str(args.tokenizer),
        "--port",
        str(args.port),
        "--max-seq-len",
        str(args.max_seq_len),
        "--chat-template",
        "llama3",
    ]
    if args.threads:
        command += ["--nthreads", str(args.threads)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"error: dllama-api exited with {server.returncode}: {' '.join(command)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    sys.exit("error: dllama-api did not start in 300 s")


def stream_completion(url: str, prompt: str, tokens: int) -> dict:
    """One streaming request; client-side times of the request, first text chunk and each chunk."""
    body = {
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    chunk_times, usage = [], None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                chunk_times.append(time.perf_counter())
    return {
        "ttft_s": chunk_times[0] - sent,
        "s_per_token": per_token(chunk_times),
        "end": chunk_times[-1],
        "sent": sent,
        "tokens": usage["completion_tokens"] if usage else len(chunk_times),
    }


def run_clients(url: str, clients: int, tokens: int, first_index: int) -> dict:
    results: list[dict] = [{}] * clients

    def client(i: int) -> None:
        results[i] = stream_completion(url, prompt_for(first_index + i), tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in results) - min(r["sent"] for r in results)
    return {
        "ttft_s": [r["ttft_s"] for r in results],
        "s_per_token": [r["s_per_token"] for r in results],
        "total_tokens_per_s": sum(r["tokens"] for r in results) / wall,
    }


# ---- report ---------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="model (.m); default: the cached 1B-shaped q40"
    )
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer (.t); default: Llama 3's")
    parser.add_argument("--tokens", type=int, default=64, help="tokens each request generates (default 64)")
    parser.add_argument("--threads", type=int, default=None, help="--nthreads for both (default: all cores)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of the 1-client cases, median taken (default 3)"
    )
    parser.add_argument("--max-seq-len", type=int, default=1024, help="context of both (default 1024)")
    parser.add_argument("--port", type=int, default=9991, help="port for dllama-api (default 9991)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.model is None:
        args.model = llama_1b_q40()
    if args.tokenizer is None:
        args.tokenizer = default_tokenizer()

    index = 0
    inference, one = [], []
    server, url = start_server(args)
    try:
        stream_completion(url, prompt_for(999), 4)  # warm-up
        for _ in range(args.repeats):  # alternated, so both see the same machine state
            inference.append(run_inference(args, index))
            one.append(run_clients(url, 1, args.tokens, index + 1))
            index += 2
        four = run_clients(url, 4, args.tokens, index)
    finally:
        server.terminate()
        server.wait(timeout=30)

    med = statistics.median
    rows = {
        "dllama inference": {
            "ttft_ms": med(r["ttft_s"] for r in inference) * 1e3,
            "ms_per_token": med(r["s_per_token"] for r in inference) * 1e3,
            "engine_ms_per_token": med(r["engine_ms_per_token"] for r in inference),
        },
        "dllama-api, 1 client": {
            "ttft_ms": med(r["ttft_s"][0] for r in one) * 1e3,
            "ms_per_token": med(r["s_per_token"][0] for r in one) * 1e3,
            "total_tokens_per_s": med(r["total_tokens_per_s"] for r in one),
        },
        "dllama-api, 4 clients": {
            "ttft_ms": med(four["ttft_s"]) * 1e3,
            "ttft_max_ms": max(four["ttft_s"]) * 1e3,
            "ms_per_token": med(four["s_per_token"]) * 1e3,
            "total_tokens_per_s": four["total_tokens_per_s"],
        },
    }
    for row in rows.values():
        row["tokens_per_s"] = 1e3 / row["ms_per_token"]
    base = rows["dllama inference"]["ms_per_token"]
    overhead = {
        name: rows[name]["ms_per_token"] / base - 1
        for name in ("dllama-api, 1 client", "dllama-api, 4 clients")
    }

    print(
        f"model {args.model.name}, {args.tokens} tokens per request, prompt {inference[0]['prompt_tokens']} "
        f"tokens, threads {args.threads or 'all'}, {platform.processor() or platform.machine()}"
    )
    print(f"{'':24}{'first token ms':>16}{'ms/token':>10}{'tokens/s':>10}{'total tokens/s':>16}")
    for name, row in rows.items():
        ttft = f"{row['ttft_ms']:.0f}" + (f" (max {row['ttft_max_ms']:.0f})" if "ttft_max_ms" in row else "")
        total = f"{row['total_tokens_per_s']:.1f}" if "total_tokens_per_s" in row else "-"
        if "engine_ms_per_token" in row:
            name += " *"
        print(f"{name:24}{ttft:>16}{row['ms_per_token']:>10.2f}{row['tokens_per_s']:>10.1f}{total:>16}")
    print(f"* its own step timer says {rows['dllama inference']['engine_ms_per_token']:.2f} ms/token")
    for name, value in overhead.items():
        print(f"{name}: {value * 100:+.1f}% time per token over dllama inference (target under +5%)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": str(args.model),
                    "tokens": args.tokens,
                    "threads": args.threads,
                    "rows": rows,
                    "overhead": overhead,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
