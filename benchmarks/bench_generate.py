"""Generation and prompt speed on one node, against the memory-bandwidth limit.

Model: random weights in Llama 3.2 1B's shape (dim 2048, 16 layers, 32 heads, 8 KV heads,
hidden 8192, vocab 128256), q40 with q80 activations; made once and cached (model_cache.py).
For 1 and 2 threads it measures generation (64 tokens, EOS ignored) and prompt processing (a
128-token prompt), the bandwidth limit (read bandwidth / weight bytes read per token) and the
time the Python side adds per token (the same forward pass on a tiny-width twin model with the
C++ kernels replaced by no-ops; the twin's time with its real kernels, which adds the thread
pool's dispatch, is reported beside it). Prints a table and writes JSON (--json PATH).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import measure_bandwidth  # noqa: E402
from model_cache import llama_1b_q40, tiny_twin  # noqa: E402

from dllama_py.engine.engine import Engine  # noqa: E402
from dllama_py.engine.exchange import ARGMAX, NO_LOGITS
from dllama_py.model import kernels  # noqa: E402
from dllama_py.model.structure import tensor_specs  # noqa: E402


def read_bandwidth(threads: int, repeats: int = 5) -> float:
    return measure_bandwidth(threads, 1.0, repeats)


def weight_bytes_per_token(engine: Engine) -> int:
    """Bytes of weights one generated token reads: every matrix once, one embedding row."""
    c = engine.config
    total = c.dim * 4
    for spec in tensor_specs(c):
        if spec.name != "embedding":
            total += spec.nbytes
    return total


def gen_seconds_per_token(engine: Engine, tokens: int, start: int) -> list[float]:
    times = []
    token = 1
    for i in range(tokens):
        t0 = time.perf_counter()
        engine.step([token], start + i, ARGMAX)
        token = engine.argmax()
        times.append(time.perf_counter() - t0)
    return times


def measure(model: Path, threads: int, gen_tokens: int, prompt_tokens: int, repeats: int) -> dict:
    engine = Engine(model, threads=threads, max_seq_len=1024)
    rng = np.random.default_rng(0)
    prompt = [1] + rng.integers(100, 1000, size=prompt_tokens - 1).tolist()
    gen_rates, prompt_rates = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for pos in range(0, prompt_tokens, 32):
            engine.step(prompt[pos:pos + 32], pos, ARGMAX if pos + 32 >= prompt_tokens else NO_LOGITS)
        prompt_rates.append(prompt_tokens / (time.perf_counter() - t0))
        per_token = gen_seconds_per_token(engine, gen_tokens, prompt_tokens)
        gen_rates.append(1.0 / statistics.median(per_token))
    result = {
        "prompt_tokens_per_s": statistics.median(prompt_rates),
        "gen_tokens_per_s": statistics.median(gen_rates),
        "weight_bytes_per_token": weight_bytes_per_token(engine),
    }
    engine.close()
    return result


KERNEL_CALLS = ("matmul", "matmul_many", "rms_norm", "rope", "attention", "silu", "gelu", "mul", "add",
                "add_q80", "quantize_q80_into", "embedding", "softmax")


def python_overhead_ms(model: Path, threads: int, tokens: int = 200, kernels_off: bool = True) -> float:
    """Median ms per token of the forward pass of a tiny-width twin model. With kernels_off the
    C++ kernels are replaced by no-ops, so what remains is the time the Python side adds;
    without, it also counts the tiny kernels and the thread pool's dispatch."""
    engine = Engine(model, threads=threads, max_seq_len=512)
    engine.step([1], 0, ARGMAX)
    saved = {name: getattr(kernels, name) for name in KERNEL_CALLS}
    try:
        if kernels_off:
            for name in KERNEL_CALLS:
                setattr(kernels, name, lambda *args, **kw: None)
        per_token = gen_seconds_per_token(engine, tokens, 1)
    finally:
        for name, fn in saved.items():
            setattr(kernels, name, fn)
    engine.close()
    return statistics.median(per_token) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="rounds per configuration (median)")
    parser.add_argument("--model", type=Path, default=None, help="a q40 model to use instead of the cached one")
    args = parser.parse_args(argv)

    model = args.model or llama_1b_q40()
    rows = []
    for threads in args.threads:
        bandwidth = read_bandwidth(threads)
        r = measure(model, threads, args.gen_tokens, args.prompt_tokens, args.repeats)
        engine = Engine(model, threads=threads, max_seq_len=8)
        twin = tiny_twin(engine.config)
        engine.close()
        overhead = python_overhead_ms(twin, threads)
        twin_ms = python_overhead_ms(twin, threads, kernels_off=False)
        limit = bandwidth * 1e9 / r["weight_bytes_per_token"]
        row = {"model": model.name, "threads": threads, **r, "python_overhead_ms_per_token": overhead,
               "twin_model_ms_per_token": twin_ms,
               "read_bandwidth_gbs": bandwidth, "bandwidth_limit_tokens_per_s": limit,
               "fraction_of_bandwidth_limit": r["gen_tokens_per_s"] / limit,
               "prompt_vs_gen": r["prompt_tokens_per_s"] / r["gen_tokens_per_s"],
               "python_overhead_fraction": overhead / (1e3 / r["gen_tokens_per_s"])}
        rows.append(row)
    print(f"{'threads':>7} {'gen tok/s':>9} {'limit':>7} {'% limit':>7} {'prompt tok/s':>12} {'prompt/gen':>10}"
          f" {'py ms/tok':>9} {'py %':>5} {'twin ms':>7} {'read GB/s':>9} {'MB/tok':>7}")
    for r in rows:
        print(f"{r['threads']:>7} {r['gen_tokens_per_s']:>9.2f} {r['bandwidth_limit_tokens_per_s']:>7.2f}"
              f" {100 * r['fraction_of_bandwidth_limit']:>6.1f}% {r['prompt_tokens_per_s']:>12.2f}"
              f" {r['prompt_vs_gen']:>10.2f} {r['python_overhead_ms_per_token']:>9.3f}"
              f" {100 * r['python_overhead_fraction']:>4.1f}% {r['twin_model_ms_per_token']:>7.3f}"
              f" {r['read_bandwidth_gbs']:>9.1f}"
              f" {r['weight_bytes_per_token'] / 1e6:>7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
