"""Searched winners against hand-made width scaling, at the budgets the hand-made networks set.

    .venv/bin/python benchmarks/bench_budgets.py --source-run runs/<a finished search.py run> [--threads 2]

The references are torchvision's x0.5 shape in the fashion_mnist space (stem 24, depths 4/8/4, split 0.5, kernel 3,
head 1024) with every stage width scaled by the same factor: what a person would do by hand. For each reference:
  1. its latency is measured on this machine with the table's settings: that is the budget;
  2. it is retrained with the preset's recipe (the recipe every winner gets) and tested;
  3. `search.py --target-ms <budget>` runs with the same preset, seed, table and trained supernet (copied from
     --source-run, so the supernet is not trained again), retrains its winner and measures it.
The search wins a budget when its winner, measured at or under the budget, has the higher test accuracy.

Every finished piece is cached in --work-dir (budgets.json plus run directories): rerunning continues.
Writes benchmarks/results/budgets.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments.config import load_experiment  # noqa: E402
from experiments.data import load_splits  # noqa: E402
from experiments.train import retrain  # noqa: E402
from latency_lut import Settings, default_out, measure_model  # noqa: E402
from search_space import Arch, SearchSpace  # noqa: E402
from search_space.files import atomic_write  # noqa: E402

CONFIG = ROOT / "experiments" / "fashion_mnist.yaml"
REFERENCE = "shufflenet_v2_x0_5"
SCALES = {"x0.5 widths x2/3": (32, 64, 128), "x0.5": (48, 96, 192)}


def scaled_reference(space: SearchSpace, widths: tuple[int, ...]) -> Arch:
    """torchvision's x0.5 shape with other stage widths."""
    data = space.reference(REFERENCE).to_dict()
    for stage, width in zip(data["stages"], widths, strict=True):
        stage["width"] = width
    arch = Arch.from_dict(data)
    space.validate(arch)
    return arch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source-run", required=True, help="a finished search.py run: its supernet is reused")
    p.add_argument("--preset", default="quick")
    p.add_argument("--threads", type=int, default=2, help="torch threads for training (latency: the table's)")
    p.add_argument("--repeats", type=int, default=15, help="rounds of each reference's latency measurement")
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "bench_budgets"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "budgets.md"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    source = Path(args.source_run).resolve()
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache_path = work / "budgets.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}

    def save() -> None:
        atomic_write(cache_path, lambda f: json.dump(cache, f, indent=1))

    cfg = load_experiment(CONFIG, args.preset)
    space = SearchSpace.from_yaml(cfg.space)
    splits = load_splits(cfg.data, cfg.seed)
    lat = cfg.latency
    settings = Settings(runtime=lat.runtime, batch_size=lat.batch_size, threads=lat.threads, dtype=lat.dtype,
                        num_classes=splits.num_classes)
    run_info = json.loads((source / "run.json").read_text())
    if run_info["preset"] != args.preset or run_info["seed"] != cfg.seed:
        raise SystemExit(f"error: {source} was run with preset {run_info['preset']} and seed {run_info['seed']}")
    lut = ROOT / default_out(space, "cpu", settings)
    if not lut.exists():
        raise SystemExit(f"error: no table {lut}; run search.py once first")

    for label, widths in SCALES.items():
        row = cache.setdefault(label, {"widths": list(widths)})
        arch = scaled_reference(space, widths)
        row["reference"] = arch.encode()
        g = space.geometry
        if "reference_ms" not in row:
            m = measure_model(space.build(arch, splits.num_classes), (g.in_channels, g.input_size, g.input_size),
                              "cpu", settings, repeats=args.repeats, seed=cfg.seed)
            row.update(reference_ms=m.median_ms, reference_p90_ms=m.p90_ms)
            save()
        print(f"{label}: {arch.encode()} measured {row['reference_ms']:.3f} ms", flush=True)
        if "reference_test" not in row:
            result = retrain(space, arch, splits, cfg, work / f"ref-{'-'.join(map(str, widths))}", progress=False)
            row.update(reference_val=result.val_accuracy, reference_test=result.test_accuracy,
                       reference_minutes=result.seconds / 60)
            save()
        print(f"  reference: test {row['reference_test']:.4f}", flush=True)
        budget = round(row["reference_ms"], 3)
        run_dir = work / f"search-{budget:g}ms"
        if "winner_test" not in row:
            if not (run_dir / "supernet").exists():
                run_dir.mkdir(parents=True, exist_ok=True)
                shutil.copytree(source / "supernet", run_dir / "supernet")
            command = [sys.executable, str(ROOT / "search.py"), "--target-ms", str(budget), "--device", "cpu",
                       "--preset", args.preset, "--run-dir", str(run_dir), "--lut", str(lut),
                       "--threads", str(args.threads)]
            start = time.perf_counter()
            subprocess.run(command, check=True)
            ship = json.loads((run_dir / "ship.json").read_text())
            shipped = [dict(s, arch=code) for code, s in ship["shipped"].items() if s["measured_ms"] <= budget]
            best = max(shipped, key=lambda s: s["val_accuracy"])
            row.update(budget_ms=budget, winner=best["arch"], winner_ms=best["measured_ms"],
                       winner_predicted_ms=best["predicted_ms"], winner_val=best["val_accuracy"],
                       winner_test=best["test_accuracy"], search_minutes=(time.perf_counter() - start) / 60,
                       rejected=sum(1 for m in ship["measured"].values() if m["median_ms"] > budget))
            save()
        print(f"  winner: {row['winner']} measured {row['winner_ms']:.3f} ms, test {row['winner_test']:.4f}",
              flush=True)

    lines = [
        "# Searched winners against hand-made width scaling",
        "",
        f"`python benchmarks/bench_budgets.py --source-run {args.source_run} --threads {args.threads}` on this"
        f" machine (CPU, latency at {lat.threads} thread, batch {lat.batch_size}),"
        f" preset `{args.preset}`, seed {cfg.seed}. Each budget is a reference's measured latency"
        f" ({args.repeats} rounds); the reference and the winner are retrained with the same recipe"
        f" ({cfg.retrain.epochs} epochs) and tested on the Fashion-MNIST test split.",
        "",
        "| budget | reference (width scaling of x0.5) | ref. measured | ref. test | winner | winner measured "
        "| winner test | difference |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for label, row in cache.items():
        lines.append(
            f"| {row['budget_ms']:.3f} ms | {label} `{row['reference']}` | {row['reference_ms']:.3f} ms | "
            f"{100 * row['reference_test']:.2f}% | `{row['winner']}` | {row['winner_ms']:.3f} ms | "
            f"{100 * row['winner_test']:.2f}% | {100 * (row['winner_test'] - row['reference_test']):+.2f} |")
    lines += ["", "Per budget: candidates the latency promise rejected, minutes of each part:", ""]
    for label, row in cache.items():
        lines.append(f"- {label}: {row['rejected']} rejected; reference retraining {row['reference_minutes']:.1f} "
                     f"min; search.py (search, ship, retrain, export, report) {row['search_minutes']:.1f} min")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
