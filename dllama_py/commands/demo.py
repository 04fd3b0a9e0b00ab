"""`dllama demo`: a small random Llama model run on two local nodes, no download needed.

It writes a random q40 model and a small word-level tokenizer with this project's own writers
into a temporary folder, starts one worker process on 127.0.0.1, runs `dllama inference`
across the nodes (root + worker), and removes everything afterwards. The text is random words:
the weights are random; what the demo shows is the plan, the traffic and the speed.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dllama_py.formats.model_file import write_model
from dllama_py.formats.tokenizer_file import TokenizerFile, write_tokenizer_file
from dllama_py.model.config import ArchType, FloatType, ModelConfig
from dllama_py.model.structure import tensor_specs

WORDS = (
    "the a and to of in was is it he she they you I that with for on his her had but at one day "
    "little big dog cat bird tree house ball park sun moon friend mom dad happy sad play run jump "
    "look see saw found went came said wanted loved liked time once upon there named girl boy "
    "toy box red blue green small fast slow good bad new old water food home school garden flower "
    "sky rain snow wind river hill car book story laugh smile help share bright dark warm cold"
).split()


def demo_config() -> ModelConfig:
    """The demo model: a Llama with 4 KV heads, so 1 to 4 nodes can run it."""
    return ModelConfig(arch=ArchType.LLAMA, dim=256, hidden_dim=768, n_layers=4, n_heads=8, n_kv_heads=4,
                       vocab_size=512, max_seq_len=512, weight_float_type=FloatType.Q40, rope_theta=10000)


def make_tokenizer() -> TokenizerFile:
    """<unk>, <s>, </s>, the 256 bytes, then words with a leading space (sentencepiece style)."""
    vocab = [b"<unk>", b"<s>", b"</s>"] + [bytes([b]) for b in range(256)]
    vocab += [(" " + w).encode() for w in WORDS]
    vocab += [f" w{i}".encode() for i in range(512 - len(vocab))]
    scores = [0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(len(vocab) - 259)]
    return TokenizerFile(tuple(vocab), tuple(scores), 1, (2,), True, None, max(len(v) for v in vocab))


def make_model(path: Path, seed: int = 0) -> None:
    """Write the random demo model: weights N(0, 0.05), norms 1, a sharper classifier."""
    config = demo_config()
    rng = np.random.default_rng(seed)

    def tensors():
        for spec in tensor_specs(config):
            rows, cols = spec.shape
            if spec.name.endswith("norm"):
                yield spec.name, np.ones((rows, cols), dtype=np.float32)
            elif spec.name == "classifier":  # only word tokens get a say, so the text is words
                weights = rng.standard_normal((rows, cols), dtype=np.float32) * 0.5
                weights[:259] = 0.0
                weights[259 + len(WORDS):] = 0.0
                yield spec.name, weights
            else:
                yield spec.name, rng.standard_normal((rows, cols), dtype=np.float32) * 0.05

    write_model(path, config, tensors())


def start_worker(threads: int) -> tuple[subprocess.Popen, str]:
    """Start `dllama worker` on a free port of 127.0.0.1; returns it once it listens, and its address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = subprocess.Popen(
        [sys.executable, "-m", "dllama_py.commands.cli", "worker", "--host", "127.0.0.1", "--port", str(port),
         "--nthreads", str(threads), "--once"], stderr=subprocess.PIPE, text=True)
    assert worker.stderr is not None
    for line in worker.stderr:  # wait for its "listening" line, then pass its log through
        sys.stderr.write(line)
        if "listening on" in line:
            threading.Thread(target=_copy_lines, args=(worker.stderr,), daemon=True).start()
            return worker, f"127.0.0.1:{port}"
    raise RuntimeError(f"the demo worker did not start (exit status {worker.wait()})")


def _copy_lines(stream) -> None:
    for line in stream:
        sys.stderr.write(line)


def run_demo(run_inference: Callable[[list[str]], int], nodes: int = 2, steps: int = 32, threads: int = 1) -> int:
    """Make the model, start nodes-1 workers, run `dllama inference` (given as the function that
    runs a command line) across all nodes, clean up."""
    if not 1 <= nodes <= demo_config().n_kv_heads:
        print(f"error: --nodes must be between 1 and {demo_config().n_kv_heads}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="dllama-demo-") as folder:
        model = Path(folder) / "dllama_model_demo_q40.m"
        tokenizer = Path(folder) / "dllama_tokenizer_demo.t"
        print(f"demo: writing a random {demo_config().n_layers}-layer Llama (q40) to {folder}", file=sys.stderr)
        make_model(model)
        write_tokenizer_file(tokenizer, make_tokenizer())
        workers: list[subprocess.Popen] = []
        addresses = []
        try:
            for _ in range(nodes - 1):
                worker, address = start_worker(threads)
                workers.append(worker)
                addresses.append(address)
            print(f"demo: {len(workers)} worker process(es) on {', '.join(addresses) or '(none)'}", file=sys.stderr)
            argv = ["inference", "--model", str(model), "--tokenizer", str(tokenizer), "--prompt",
                    "Once upon a time", "--steps", str(steps), "--nthreads", str(threads),
                    "--buffer-float-type", "q80", "--temperature", "0.7", "--seed", "42", "--ignore-eos"]
            if addresses:
                argv += ["--workers", *addresses]
            return run_inference(argv)
        finally:
            for worker in workers:
                try:
                    worker.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()
