"""Before and after in one run: a benchmark of this repository run from two checkouts in turn.

Each checkout needs its own virtual environment with dllama-py installed (`CHECKOUT/.venv`).
Rounds alternate A, B, A, B, ... so that the machine's speed, which moves by 2x between hours on
shared hosts, weighs on both alike. Every round writes the benchmark's JSON; this prints, for
each row and each chosen figure, the median of the rounds for A and B and the ratio B / A
(with the spread of the rounds), and writes them as JSON.

    python benchmarks/bench_ab.py --a ../baseline --b . --rounds 3 -- bench_generate.py --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

FIGURES = ("gen_tokens_per_s", "prompt_tokens_per_s")


def run_once(checkout: Path, bench: list[str], out: Path) -> list[dict]:
    python = checkout / ".venv" / "bin" / "python"
    # run outside the checkout, so that `python -m dllama_py...` finds the installed package (with
    # its compiled core), not the source folder
    subprocess.run([str(python), str(checkout / "benchmarks" / bench[0]), *bench[1:], "--json", str(out)],
                   check=True, cwd=out.parent, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def row_key(row: dict) -> str:
    return " ".join(f"{k}={row[k]}" for k in ("name", "config", "nodes", "threads", "link") if k in row)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", type=Path, required=True, help="checkout A (before), with its own .venv")
    parser.add_argument("--b", type=Path, required=True, help="checkout B (after), with its own .venv")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per checkout, alternating (default 3)")
    parser.add_argument("--figure", nargs="+", default=list(FIGURES), help="JSON fields to compare")
    parser.add_argument("--json", metavar="PATH", help="write the comparison as JSON here")
    parser.add_argument("bench", nargs="+", help="the benchmark script (in benchmarks/) and its arguments")
    args = parser.parse_args(argv)
    runs: dict[str, list[list[dict]]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for label, checkout in (("A", args.a), ("B", args.b)):
                print(f"round {i + 1}/{args.rounds}: {label} ({checkout})", flush=True)
                runs[label].append(run_once(checkout.resolve(), args.bench, Path(tmp) / f"{label}{i}.json"))
    table = []
    for index, row in enumerate(runs["A"][0]):
        for figure in args.figure:
            if figure not in row:
                continue
            a = [r[index][figure] for r in runs["A"]]
            b = [r[index][figure] for r in runs["B"]]
            ratios = [y / x for x, y in zip(a, b) if x]
            table.append({"row": row_key(row), "figure": figure, "a_median": statistics.median(a),
                          "b_median": statistics.median(b), "a_runs": a, "b_runs": b,
                          "ratio_median": statistics.median(ratios) if ratios else None,
                          "ratio_min": min(ratios, default=None), "ratio_max": max(ratios, default=None)})
    print(f"{'row':<28} {'figure':<22} {'A median':>9} {'B median':>9} {'B/A':>6} {'B/A range':>13}")
    for t in table:
        spread = f"{t['ratio_min']:.2f}-{t['ratio_max']:.2f}" if t["ratio_min"] is not None else "-"
        ratio = f"{t['ratio_median']:.3f}" if t["ratio_median"] is not None else "-"
        print(f"{t['row']:<28} {t['figure']:<22} {t['a_median']:>9.2f} {t['b_median']:>9.2f} {ratio:>6} {spread:>13}")
    if args.json:
        Path(args.json).write_text(json.dumps({"bench": args.bench, "a": str(args.a), "b": str(args.b),
                                               "rounds": args.rounds, "table": table}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
