"""What constrained decoding costs per token, next to a decode step, in one run.

The 1B-shaped q40 model (Llama 3.2 1B's shape, 128,256-token vocabulary; benchmarks/model_cache.py)
decodes greedily with the Llama 3 tokenizer (testdata/llama3_tokenizer, converted here): plain,
and with a sampler whose grammar is a JSON schema (what response_format json_schema and a forced
tool call do). Reported per token: the decode step alone, the grammar's own work (mask,
unpacking it, applying it to every logit, advancing the matcher: timed around the sampler), and
the whole token with the grammar (which also brings every logit to the root: FULL readout),
each the median of the tokens generated; the ratio of the grammar's work to the plain step is
the figure the issue asks to keep under 10%.
Prints a table and writes JSON (--json PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dllama_py.converter.convert_tokenizer import main as convert_tokenizer  # noqa: E402
from model_cache import llama_1b_q40  # noqa: E402

from dllama_py.engine.engine import Engine  # noqa: E402
from dllama_py.engine.sampler import Sampler  # noqa: E402
from dllama_py.generation.grammar import Grammars  # noqa: E402
from dllama_py.text.tokenizer import Tokenizer  # noqa: E402

TESTDATA = Path(os.environ.get("DLLAMA_TESTDATA", Path(__file__).resolve().parents[2] / "shared" / "testdata"))
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 24}, "unit": {"enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                            "maxItems": 5}},
    "required": ["city", "unit", "days"], "additionalProperties": False,
}


class Timed:
    """A constraint wrapper that adds up the time spent in the grammar."""

    def __init__(self, inner) -> None:
        self.inner, self.seconds = inner, []

    def allowed(self, vocab_size: int) -> np.ndarray:
        start = time.perf_counter()
        out = self.inner.allowed(vocab_size)
        self.seconds.append(time.perf_counter() - start)
        return out

    def accept(self, token: int) -> None:
        start = time.perf_counter()
        self.inner.accept(token)
        self.seconds[-1] += time.perf_counter() - start

    @property
    def finished(self) -> bool:
        return self.inner.finished


def run(engine: Engine, sampler: Sampler, prompt: list[int], tokens: int) -> tuple[list[float], list[float]]:
    """Seconds per generated token (step + choice) and the seconds of choosing alone."""
    engine.step(prompt, 0, engine.readout_for(sampler, engine.config.vocab_size))
    sampler.start(prompt)
    whole, choosing = [], []
    pos = len(prompt)
    for _ in range(tokens):
        start = time.perf_counter()
        token = engine.next_token(sampler)
        chosen = time.perf_counter()
        sampler.accept(token)
        if getattr(sampler.constraint, "finished", False):
            break
        engine.step([token], pos, engine.readout_for(sampler, engine.config.vocab_size))
        pos += 1
        whole.append(time.perf_counter() - start)
        choosing.append(chosen - start)
    return whole, choosing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=24, help="tokens generated per run (default 24)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        tok_path = Path(folder) / "llama3.t"
        convert_tokenizer([str(TESTDATA / "llama3_tokenizer" / "tokenizer.model"), "llama3", "--output",
                           str(tok_path)])
        tokenizer = Tokenizer.load(tok_path)
    grammars = Grammars(tokenizer)
    start = time.perf_counter()
    grammar = grammars.json_schema(SCHEMA, [128009])
    compile_s = time.perf_counter() - start
    prompt = tokenizer.encode("Write the weather in Paris as JSON:")
    with Engine(llama_1b_q40(), threads=args.threads, max_seq_len=256, log=lambda _: None) as engine:
        plain, plain_choice = run(engine, Sampler(0.0), prompt, args.tokens)
        timed = Timed(grammar.matcher())
        constrained, constrained_choice = run(engine, Sampler(0.0, constraint=timed), prompt, args.tokens)
    row = {
        "vocab": tokenizer.vocab_size,
        "threads": args.threads,
        "tokens_plain": len(plain),
        "tokens_constrained": len(constrained),
        "grammar_setup_s": round(compile_s, 3),
        "step_plain_ms": round(statistics.median(plain) * 1e3, 2),
        "choice_plain_ms": round(statistics.median(plain_choice) * 1e3, 3),
        "grammar_ms": round(statistics.median(timed.seconds) * 1e3, 3),
        "choice_constrained_ms": round(statistics.median(constrained_choice) * 1e3, 3),
        "step_constrained_ms": round(statistics.median(constrained) * 1e3, 2),
    }
    row["grammar_share_of_step"] = round(row["grammar_ms"] / row["step_plain_ms"], 4)
    row["choice_extra_share_of_step"] = round(
        (row["choice_constrained_ms"] - row["choice_plain_ms"]) / row["step_plain_ms"], 4)
    row["constrained_over_plain_step"] = round(row["step_constrained_ms"] / row["step_plain_ms"], 4)
    print("| vocab | plain token ms | constrained token ms | ratio | grammar ms/token | choosing with grammar ms | "
          "grammar / step | extra choosing / step | setup s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {row['vocab']} | {row['step_plain_ms']} | {row['step_constrained_ms']} | "
          f"{row['constrained_over_plain_step']:.3f} | {row['grammar_ms']} | {row['choice_constrained_ms']} | "
          f"{row['grammar_share_of_step']:.1%} | {row['choice_extra_share_of_step']:.1%} | {row['grammar_setup_s']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
