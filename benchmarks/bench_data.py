"""ImageFolder input pipeline figures on the Fashion-MNIST JPEG tree: decoding throughput and scoring without decoding.

    python benchmarks/bench_data.py            # writes benchmarks/results/data.md (about 3 minutes on 2 cores)

1. Decode + augment throughput at 224 px: the training pipeline (JPEG decode, RandomResizedCrop, flip; uint8 batches
   of 64) over the tree's training split with 0 (in the calling process), 1 and 2 worker processes. The settings
   run alternately, --rounds times, and each keeps its best round (the least disturbed by other work on the machine);
   the goal is 2 workers >= 1.7x 1 worker.
2. Candidate scoring: `experiments.evaluate.Evaluator` on a seeded, untrained imagenet-space supernet with the cpu
   preset's evaluate settings, with `data.eval_cache: memory` (images decoded once, when the evaluator is built)
   against `off` (decoded again for every candidate), the same archs in the same order. The decoding share is what
   the cache saves per candidate.

The tree is written first when --root does not hold one (benchmarks/make_jpeg_tree.py, 300 + 50 images per class).
--job RUN_DIR adds the per-step seconds of a finished search.py run on the tree (its steps.json and report.md), e.g.
of `python search.py --config experiments/imagenet.yaml --preset cpu --device cpu --target-ms 40`.
Without --job, the whole-job section of the existing results file is kept as it is (with its own commit).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.make_jpeg_tree import make_tree  # noqa: E402
from benchmarks.provenance import commit  # noqa: E402
from experiments.config import load_experiment  # noqa: E402
from experiments.data import DEFAULT_FASHION_MNIST, load_splits, make_loader  # noqa: E402
from experiments.evaluate import Evaluator  # noqa: E402
from search_space import SearchSpace, Supernet  # noqa: E402

CONFIG = ROOT / "experiments" / "imagenet.yaml"
PRESET = "cpu"


def throughput(root: Path, workers: int, batch_size: int, epoch: int) -> float:
    """Training images per second (decode + augment, uint8 batches) over one pass of the training split."""
    cfg = load_experiment(CONFIG, PRESET)
    data = dataclasses.replace(cfg.data, root=str(root), workers=workers)
    train = load_splits(data, cfg.seed).train
    batches = make_loader(train, batch_size=batch_size, shuffle=True, augment=True, seed=0, epoch=epoch,
                          drop_last=True).uint8_batches()
    next(batches)  # the workers start (once per data set) and fill their queues: not part of the steady rate
    start, count = time.perf_counter(), 0
    for images, _ in batches:
        count += len(images)
    return count / (time.perf_counter() - start)


def scoring(root: Path, archs: int) -> dict[str, dict]:
    """Build time and seconds per candidate of the evaluator with and without the decoded cache."""
    cfg = load_experiment(CONFIG, PRESET)
    space = SearchSpace.from_yaml(cfg.space)
    torch.manual_seed(0)
    supernet = Supernet(space, 10).eval()
    rng = np.random.default_rng(0)
    chosen = [space.smallest()]
    while len(chosen) < archs:  # small archs: the decoding share is largest where the forward passes are cheapest
        arch = space.sample(rng)
        if space.cost(arch, 10).mflops < 120:
            chosen.append(arch)
    evaluators, out = {}, {}
    for mode in ("memory", "off"):
        data = dataclasses.replace(cfg.data, root=str(root), eval_cache=mode)
        splits = load_splits(data, cfg.seed)
        start = time.perf_counter()
        evaluators[mode] = Evaluator(supernet, splits, cfg.evaluate, seed=cfg.seed)
        out[mode] = {"build": time.perf_counter() - start, "seconds": [], "data": []}
    for arch in chosen:  # alternately, so both settings see the same share of the machine
        for mode, evaluator in evaluators.items():
            out[mode]["seconds"].append(evaluator.score(arch).seconds)
            start = time.perf_counter()  # what one candidate reads: the calibration and validation batches
            for _ in evaluator.calibration:
                pass
            for _ in evaluator._val:
                pass
            out[mode]["data"].append(time.perf_counter() - start)
    for mode, row in out.items():
        print(f"eval_cache {mode:<6}  build {row['build']:5.2f} s  per candidate {row['seconds']}  "
              f"data {row['data']}", flush=True)
        row.update(first=row["seconds"][0], later=statistics.fmean(row["seconds"][1:]),
                   data_mean=statistics.fmean(row["data"]))
    return out


def job_section(run_dir: Path) -> list[str]:
    """The steps of a finished search.py run: its command, each step's seconds (steps.json) and the winner."""
    steps = json.loads((run_dir / "steps.json").read_text())
    report = (run_dir / "report.md").read_text().splitlines()
    command = next((line.removeprefix("Command: ").strip("`") for line in report if line.startswith("Command:")), "?")
    winners = [line for line in report if line.startswith("| 1 |")]
    stamp = datetime.fromtimestamp((run_dir / "report.md").stat().st_mtime, UTC)
    lines = [
        "## The whole job on the JPEG tree",
        "",
        f"`{command}`, finished {stamp:%Y-%m-%d %H:%M} UTC on this machine. Seconds per step (the run's steps.json; "
        "a latency table already profiled shows as 0):",
        "",
        "| " + " | ".join(steps) + " | total |",
        "|" + "---:|" * (len(steps) + 1),
        # "step: part" entries time a part of a step, already inside the step's own figure
        "| " + " | ".join(f"{v:.0f}" for v in steps.values())
        + f" | **{sum(v for k, v in steps.items() if ':' not in k):.0f}** |",
        "",
    ]
    if winners:
        lines += ["Winner row of its report.md (the cpu preset trains 40 supernet steps and 20 retraining steps of 32 "
                  "images: it checks the pipeline end to end, not accuracy):", "", report[report.index(winners[0]) - 2],
                  report[report.index(winners[0]) - 1], winners[0], ""]
    return lines


def kept_job_section(out: Path) -> list[str]:
    """The whole-job section of an earlier results file, so a rerun without --job does not drop that figure."""
    if not out.is_file():
        return []
    text = out.read_text()
    heading = "## The whole job on the JPEG tree"
    return text[text.index(heading):].splitlines() if heading in text else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(ROOT / "data" / "fmnist-jpeg"), help="the JPEG tree (made if missing)")
    parser.add_argument("--rounds", type=int, default=4, help="passes per worker count, alternating (best kept)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--archs", type=int, default=4, help="candidates scored per cache setting")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data.md"))
    parser.add_argument("--job", default=None, help="a finished search.py run directory to report the steps of")
    args = parser.parse_args()
    root = Path(args.root)
    if not (root / "train").is_dir():
        make_tree(Path(DEFAULT_FASHION_MNIST), root, per_class=300, val_per_class=50)
    torch.set_num_threads(2)
    load_before = os.getloadavg()
    rates: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for r in range(args.rounds):
        for workers in rates:
            rates[workers].append(throughput(root, workers, args.batch_size, epoch=r))
            print(f"round {r}  workers {workers}  {rates[workers][-1]:7.1f} images/s", flush=True)
    load_during = os.getloadavg()
    scores = scoring(root, args.archs)
    load_after = os.getloadavg()

    best = {w: max(v) for w, v in rates.items()}
    median = {w: statistics.median(v) for w, v in rates.items()}
    mem, off = scores["memory"], scores["off"]
    decode_share = (off["data_mean"] - mem["data_mean"]) / off["later"]
    command = "python benchmarks/bench_data.py" + (f" --rounds {args.rounds}" if args.rounds != 4 else "")
    lines = [
        "# Input pipeline (ImageFolder JPEG tree)",
        "",
        f"Command: `{command}` (tree: `python benchmarks/make_jpeg_tree.py --out data/fmnist-jpeg --per-class 300 "
        "--val-per-class 50`, 3,000 training and 500 val JPEGs of Fashion-MNIST at 224 px).",
        f"Commit {commit()}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {platform.machine()} CPU, "
        f"{os.cpu_count()} cores shared with other work, no GPU; torch {torch.__version__}.",
        f"Load average (1, 5, 15 min) before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}; "
        f"after the throughput rounds: {load_during[0]:.2f} {load_during[1]:.2f} {load_during[2]:.2f}; "
        f"at the end: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} "
        "(above 0 means other processes took part of the 2 cores).",
        "",
        "## Decode + augment throughput at 224 px",
        "",
        f"Training pipeline (JPEG decode, RandomResizedCrop, flip), batches of {args.batch_size}, one pass over "
        f"the 2,500 training images per round, {args.rounds} rounds alternating.",
        "",
        "| decoding | best images/s | median images/s | every round |",
        "|---|---:|---:|---|",
    ]
    for workers, label in ((0, "in the calling process"), (1, "1 worker"), (2, "2 workers")):
        lines.append(f"| {label} | {best[workers]:.0f} | {median[workers]:.0f} | "
                     f"{', '.join(f'{x:.0f}' for x in rates[workers])} |")
    lines += [
        "",
        f"2 workers / 1 worker: **{best[2] / best[1]:.2f}x** (best rounds), {median[2] / median[1]:.2f}x (medians); "
        "goal >= 1.7x.",
        "",
        "## Candidate scoring with and without the decoded cache",
        "",
        f"`Evaluator` with the cpu preset's evaluate settings (BatchNorm calibration on "
        f"{load_experiment(CONFIG, PRESET).evaluate.bn_calibration_images} training images, scoring on "
        f"{load_experiment(CONFIG, PRESET).evaluate.val_images} validation images), an untrained imagenet-space "
        f"supernet, {args.archs} small archs in the same order; seconds per candidate, each the whole score() "
        "(extraction, recalibration, scoring).",
        "",
        "| data.eval_cache | building the evaluator (s) | first candidate (s) | later candidates, mean (s) | "
        "reading one candidate's images (s) |",
        "|---|---:|---:|---:|---:|",
        f"| memory (decoded once) | {mem['build']:.2f} | {mem['first']:.2f} | {mem['later']:.2f} | "
        f"{mem['data_mean']:.3f} |",
        f"| off (decoded per candidate) | {off['build']:.2f} | {off['first']:.2f} | {off['later']:.2f} | "
        f"{off['data_mean']:.3f} |",
        "",
        "The last column times one pass over the batches a candidate reads (calibration and validation), apart "
        f"from the network: {off['data_mean']:.2f} s of decoding per candidate without the cache, "
        f"{mem['data_mean'] * 1000:.0f} ms with it. Per candidate the cache saves {decode_share:.0%} here "
        "(the rest is the forward passes of the extracted network, which the cache does not change).",
        "",
    ]
    if args.job:
        lines += job_section(Path(args.job))
    else:
        lines += kept_job_section(Path(args.out))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
