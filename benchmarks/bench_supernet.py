"""One training step (forward + backward) of `supernet(x, arch)` against the same step on `supernet.extract(arch)`.

    .venv/bin/python benchmarks/bench_supernet.py [--archs 5] [--rounds 5]

Fashion-MNIST space, CPU, 1 thread, batch 64. Each arch is timed in interleaved rounds; the statistic is the fastest
round's median (robust to the noise of a shared machine). Goal: ratio supernet/plain <= 1.15.
Writes benchmarks/results/supernet_step.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from provenance import header  # benchmarks/, the folder of this script
from torch.utils.benchmark import Timer

from search_space import SearchSpace, Supernet

ROOT = Path(__file__).resolve().parents[1]


def step_timer(stmt: str, env: dict, seconds: float) -> float:
    return Timer(stmt, globals=env, num_threads=1).blocked_autorange(min_run_time=seconds).median


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    space = SearchSpace.from_yaml(ROOT / "experiments/spaces/fashion_mnist.yaml")
    supernet = Supernet(space, num_classes=10).train()
    rng = np.random.default_rng(0)
    archs = [space.reference("shufflenet_v2_x0_5"), space.largest()] + [space.sample(rng) for _ in range(args.archs)]
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    loss = torch.nn.functional.cross_entropy
    lines = [f"torch {torch.__version__}, CPU, 1 thread, batch {args.batch}, 28x28x1, forward+backward, "
             f"fastest of {args.rounds} interleaved rounds", "",
             "| arch | supernet (ms) | plain (ms) | ratio |", "|---|---|---|---|"]
    ratios = []
    for arch in archs:
        plain = supernet.extract(arch).train()
        env = {"supernet": supernet, "plain": plain, "arch": arch, "x": x, "y": y, "loss": loss}
        best_s = best_p = float("inf")
        for _ in range(args.rounds):
            best_s = min(best_s, step_timer("loss(supernet(x, arch), y).backward()", env, args.seconds))
            best_p = min(best_p, step_timer("loss(plain(x), y).backward()", env, args.seconds))
        ratios.append(best_s / best_p)
        lines.append(f"| `{arch.encode()}` | {best_s * 1e3:.1f} | {best_p * 1e3:.1f} | {best_s / best_p:.3f} |")
        print(lines[-1], flush=True)
    lines += ["", f"geometric mean ratio: {float(np.exp(np.mean(np.log(ratios)))):.3f} (goal <= 1.15)"]
    print(lines[-1])
    lines = ["# One supernet training step against the plain network's", "", header(), "", *lines]
    (ROOT / "benchmarks/results/supernet_step.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
