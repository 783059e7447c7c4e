"""How a validation's timing budget is split, and how well two measurements of the same archs then agree.

    .venv/bin/python benchmarks/bench_validation_budget.py [--lut TABLE.json] [--archs 120]

Builds `--archs` sampled fashion_mnist archs once (in the table's runtime and settings; default: a fresh ONNX Runtime
table of this CPU, profiled into a temporary folder) and measures all of them four times, interleaved as
`latency_lut validate` measures them: a few long blocks, many short blocks, a few long, many short (the same time
per arch for both). For each split it reports how far the two measurements' p50 lie apart, arch by arch, after
dividing out the median ratio of the two (the machine's speed may change between measurements for every arch alike,
which a table's scale absorbs): the noise floor of a validation, which no table can beat. Writes
benchmarks/results/lut_budget.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import commit, machine  # noqa: E402
from latency_lut import LatencyTable  # noqa: E402
from latency_lut.timing import (  # noqa: E402
    Budget,
    Measurement,
    make_runner,
    measure_interleaved,
    pin_allocator,
    thread_count,
)
from latency_lut.validation import DEFAULT_BUDGET, sample_archs  # noqa: E402
from search_space import SearchSpace  # noqa: E402

SPACE = ROOT / "experiments" / "spaces" / "fashion_mnist.yaml"
LONG = Budget(rounds=6, block_s=0.05, min_calls=2, max_calls=30, warmup=2)
OUT = ROOT / "benchmarks" / "results" / "lut_budget.md"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lut", type=Path, help="a fashion_mnist table (default: profile one into a temp folder)")
    parser.add_argument("--archs", type=int, default=120)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    lut = args.lut
    if lut is None:
        lut = Path(tempfile.mkdtemp(prefix="bench_budget-")) / "fashion_mnist-onnxruntime.json"
        subprocess.run([sys.executable, "-m", "latency_lut", "profile", "--space", str(SPACE), "--runtime",
                        "onnxruntime", "--num-classes", "10", "--out", str(lut), "--quiet"], cwd=ROOT, check=True)
    space = SearchSpace.from_yaml(SPACE)
    settings = LatencyTable.load(lut).fingerprint.settings
    archs = sample_archs(space, args.archs, np.random.default_rng(args.seed))
    g = space.geometry
    shape = (settings.batch_size, g.in_channels, g.input_size, g.input_size)
    pin_allocator()
    load = [os.getloadavg()[0]]
    splits = {"few long": LONG, "many short": DEFAULT_BUDGET}
    p50: dict[str, list[np.ndarray]] = {name: [] for name in splits}
    with thread_count(settings.threads):
        torch.manual_seed(args.seed)
        runners = [make_runner(space.build(a, settings.num_classes), shape, "cpu", settings, args.seed)
                   for a in archs]
        for k, name in enumerate(list(splits) * 2):
            blocks = measure_interleaved(runners, splits[name], np.random.default_rng(k))
            p50[name].append(np.array([Measurement.from_blocks(b).value("p50") for b in blocks]))
            print(f"{name}: measurement {len(p50[name])} done", flush=True)
    load.append(os.getloadavg()[0])
    lines = [
        "# Splitting a validation's timing budget",
        "",
        f"`python benchmarks/bench_validation_budget.py` at commit {commit()}, {machine()}, "
        f"{settings.runtime}, {settings.threads} thread(s), batch {settings.batch_size}; load average "
        f"{load[0]:.1f} → {load[1]:.1f}. {len(archs)} sampled fashion_mnist archs (seed {args.seed}) measured four "
        "times in one process, interleaved as `latency_lut validate` measures (every arch once per round, in a new "
        "order): few long blocks, many short blocks, few long, many short. Each row compares an arch's two p50s "
        "(over every call) of one split, after dividing out the median ratio of the two measurements (the "
        "machine's speed between them, shown as the drift).",
        "",
        "| split | rounds x block | drift | run-to-run p50 difference: median | p90 | archs over 5% | archs over 10% |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, budget in splits.items():
        first, second = p50[name]
        ratio = first / second
        drift = float(np.median(ratio))
        diff = np.abs(ratio / drift - 1) * 100
        lines.append(f"| {name} | {budget.rounds} x {budget.block_s * 1e3:g} ms | {(drift - 1) * 100:+.1f}% | "
                     f"{np.median(diff):.1f}% | {np.percentile(diff, 90):.1f}% | {np.mean(diff > 5) * 100:.0f}% | "
                     f"{np.mean(diff > 10) * 100:.0f}% |")
    lines += ["", "*many short* is `latency_lut.validation.DEFAULT_BUDGET`, what `validate` and search.py use.", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
