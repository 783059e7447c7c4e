"""Does a process that has trained time networks slower than a fresh one? (why search.py measures in a fresh one)

    .venv/bin/python benchmarks/bench_fresh.py [--steps 200] [--archs 6] [--rounds 4]

Trains the fashion_mnist supernet for --steps steps in this process (2 threads, as search.py trains before it
measures), then times the same archs three ways, interleaved round by round so that machine load touches all alike:
  - in this process (what search.py did before it measured in a fresh process);
  - in this process after `gc.collect()` and glibc's `malloc_trim(0)` (is it the heap?);
  - with `latency_lut.measure_model_fresh` (a child forked from a server that only imported torch).
Each estimate is the fastest round's median (the table's statistic); the result is each arch's lowest estimate
over the rounds, and its ratio to the fresh one. Writes benchmarks/results/fresh_process.md.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from experiments.config import load_experiment  # noqa: E402
from experiments.data import load_splits  # noqa: E402
from experiments.train import train_supernet  # noqa: E402
from latency_lut import Settings, measure_model, measure_model_fresh  # noqa: E402
from search_space import SearchSpace, Supernet  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "fashion_mnist.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="supernet training steps before measuring")
    parser.add_argument("--archs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    cfg = load_experiment(CONFIG, "quick")
    space = SearchSpace.from_yaml(cfg.space)
    settings = Settings(threads=1, num_classes=10)
    rng = np.random.default_rng(5)
    archs = [space.sample(rng) for _ in range(args.archs)]
    shape = (1, 28, 28)

    torch.set_num_threads(2)
    cfg = dataclasses.replace(cfg, supernet=dataclasses.replace(cfg.supernet, epochs=1,
                                                                max_steps_per_epoch=args.steps))
    splits = load_splits(cfg.data, cfg.seed)
    torch.manual_seed(0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        train_supernet(Supernet(space, 10), splits, cfg, work, progress=False)
    trained_s = time.perf_counter() - start

    def here():
        return [measure_model(space.build(a, 10), shape, "cpu", settings).p50_ms for a in archs]

    def trimmed():
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return here()

    def fresh():
        return [measure_model_fresh(space.build(a, 10), shape, "cpu", settings).p50_ms for a in archs]

    ways = {"this process": here, "after malloc_trim": trimmed, "fresh process": fresh}
    results: dict[str, list[list[float]]] = {name: [] for name in ways}
    for r in range(args.rounds):
        order = list(ways) if r % 2 == 0 else list(reversed(ways))
        for name in order:
            results[name].append(ways[name]())
    best = {name: np.min(np.array(rows), axis=0) for name, rows in results.items()}
    lines = [
        "# Timing in a process that has trained vs a fresh one",
        "",
        f"`python benchmarks/bench_fresh.py --steps {args.steps} --archs {args.archs} --rounds {args.rounds}`: "
        f"{args.steps} supernet steps ({trained_s:.0f} s, 2 threads), then {args.archs} random fashion_mnist archs "
        f"timed three ways in {args.rounds} interleaved rounds (batch 1, 1 thread, eager). Lowest estimate per arch "
        "over the rounds, in ms, and its ratio to the fresh process's.",
        "",
        "| arch | " + " | ".join(ways) + " | this / fresh | trimmed / fresh |",
        "|---|" + "---:|" * (len(ways) + 2),
    ]
    for i, arch in enumerate(archs):
        f = best["fresh process"][i]
        lines.append(f"| `{arch.encode()}` | " + " | ".join(f"{best[n][i]:.2f}" for n in ways)
                     + f" | {best['this process'][i] / f:.2f} | {best['after malloc_trim'][i] / f:.2f} |")
    ratio = best["this process"] / best["fresh process"]
    trim = best["after malloc_trim"] / best["fresh process"]
    lines += ["", f"Geometric mean: this process / fresh **{np.exp(np.mean(np.log(ratio))):.2f}** "
                  f"(range {ratio.min():.2f}-{ratio.max():.2f}); after malloc_trim / fresh "
                  f"{np.exp(np.mean(np.log(trim))):.2f} ({trim.min():.2f}-{trim.max():.2f}).", ""]
    text = "\n".join(lines)
    (ROOT / "benchmarks" / "results" / "fresh_process.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
