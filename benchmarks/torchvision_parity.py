"""Parity and speed of our plain ShuffleNet V2 against torchvision's, for the four reference archs.

Runs in a side environment that has torchvision (it is not a dependency of shufflenas):

    python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy pyyaml
    PYTHONPATH=. /tmp/tvenv/bin/python benchmarks/torchvision_parity.py [--write-fixture]

For each reference it loads torchvision's state_dict into ours with strict=True and compares logits (eval mode),
then times both at CPU, 1 thread, batch 1, 224x224 in interleaved rounds; the statistic is the fastest round's
median, which agreed within 5% across runs on this noisy machine where a single median moved 20%.
`--write-fixture` refreshes tests/search_space/data/torchvision_shapes.json (names and shapes of every tensor), which
the test suite checks without needing torchvision.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torchvision
from torch.utils.benchmark import Timer

from search_space import REFERENCES, SearchSpace

ROOT = Path(__file__).resolve().parents[1]


def fastest_median(models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int, seconds: float) -> dict:
    best = {name: float("inf") for name in models}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, model in models.items():  # interleaved: both see the same machine conditions
                m = Timer("model(x)", globals={"model": model, "x": x}, num_threads=1).blocked_autorange(
                    min_run_time=seconds
                )
                best[name] = min(best[name], m.median)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--write-fixture", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    space = SearchSpace.from_yaml(ROOT / "experiments/spaces/imagenet.yaml")
    shapes = {}
    lines = [f"torch {torch.__version__}, torchvision {torchvision.__version__}, CPU, 1 thread, batch 1, 224x224",
             "", "| arch | max abs logit diff | ours (ms) | torchvision (ms) | ratio ours/tv |",
             "|---|---|---|---|---|"]
    for name in REFERENCES:
        torch.manual_seed(0)
        tv = getattr(torchvision.models, name)(weights=None).eval()
        ours = space.build(space.reference(name), num_classes=1000).eval()
        ours.load_state_dict(tv.state_dict(), strict=True)
        shapes[name] = {k: list(v.shape) for k, v in tv.state_dict().items()}
        x = torch.randn(1, 3, 224, 224)
        with torch.inference_mode():
            diff = (ours(x) - tv(x)).abs().max().item()
        t = fastest_median({"ours": ours, "tv": tv}, x, args.rounds, args.seconds)
        lines.append(f"| {name} | {diff:.1e} | {t['ours'] * 1e3:.2f} | {t['tv'] * 1e3:.2f} | "
                     f"{t['ours'] / t['tv']:.3f} |")
        print(lines[-1], flush=True)
    out = ROOT / "benchmarks/results/torchvision_parity.md"
    out.write_text("\n".join(lines) + "\n")
    if args.write_fixture:
        (ROOT / "tests/search_space/data/torchvision_shapes.json").write_text(json.dumps(shapes, indent=0) + "\n")


if __name__ == "__main__":
    main()
