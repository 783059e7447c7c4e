"""TPE against random search under the same latency constraint, with the same trained supernet and the same budget
of evaluated candidates, over several seeds; and candidates per minute of each searcher.

    .venv/bin/python benchmarks/bench_searchers.py --run-dir runs/<a search.py run> [--evaluations 30] [--seeds 0 1 2]

It reuses the run's trained supernet, its latency table and its target (run.json), so it measures the searchers,
not the training. Each (sampler, seed) gets its own study in benchmarks/results/searchers/ and is resumable.
Writes benchmarks/results/searchers.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import optuna
import torch

from experiments.checkpoints import load_supernet
from experiments.config import load_experiment
from experiments.data import load_splits
from experiments.evaluate import Evaluator
from latency_lut import LatencyTable
from searchers.objective import Objective
from searchers.optuna_searcher import OptunaSearcher

ROOT = Path(__file__).resolve().parents[1]


class Counting:
    """Counts evaluations (the expensive part) so every sampler gets the same budget of them."""

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator
        self.count = 0
        self.seconds = 0.0

    def evaluate(self, arch):
        start = time.perf_counter()
        self.count += 1
        acc = self.evaluator.evaluate(arch)
        self.seconds += time.perf_counter() - start
        return acc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True, help="a finished (or searched) search.py run directory")
    parser.add_argument("--lut", required=True, help="the latency table that run used")
    parser.add_argument("--evaluations", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samplers", nargs="+", default=["tpe", "random"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    identity = json.loads((run_dir / "run.json").read_text())
    target = float(identity["target_ms"])
    cfg = load_experiment(ROOT / "experiments" / identity["config"], identity["preset"])
    supernet = load_supernet(run_dir / "supernet" / "supernet.pt")
    space = supernet.space
    splits = load_splits(cfg.data, cfg.seed)
    table = LatencyTable.load(args.lut)
    evaluator = Evaluator(supernet, splits, cfg.evaluate, seed=cfg.seed)
    out = ROOT / "benchmarks" / "results"
    rows = []
    for sampler in args.samplers:
        for seed in args.seeds:
            counting = Counting(evaluator)
            searcher = OptunaSearcher(space, table, counting, target, sampler=sampler, seed=seed,
                                      run_dir=out / "searchers", study_name=f"{sampler}-s{seed}",
                                      enqueue_references=False, num_classes=splits.num_classes, progress=False)
            study = searcher.study()
            counting.count = sum(1 for t in study.trials if t.user_attrs.get("feasible"))
            objective = Objective(space, table, counting, target, "single", splits.num_classes)

            def stop(study: optuna.Study, trial: optuna.trial.FrozenTrial, c: Counting = counting) -> None:
                if c.count >= args.evaluations:
                    study.stop()

            start = time.perf_counter()
            if counting.count < args.evaluations:
                study.optimize(objective, callbacks=[stop])
            wall = time.perf_counter() - start
            result = searcher.result()
            done = [t for t in result.trials if t.state == "COMPLETE"]
            best = result.best
            rows.append({
                "sampler": sampler, "seed": seed, "trials": len(done), "evaluated": sum(t.evaluated for t in done),
                "infeasible_share": result.infeasible_share, "best_accuracy": best.accuracy if best else float("nan"),
                "best_ms": best.predicted_ms if best else float("nan"),
                "candidates_per_min": 60 * counting.count / wall if counting.count and wall > 1 else float("nan"),
                "searcher_ms_per_trial": 1e3 * max(0.0, wall - counting.seconds) / max(1, len(done)),
            })
            print(json.dumps(rows[-1]), flush=True)
    lines = [f"Fashion-MNIST space, supernet of `{run_dir.name}`, target {target:g} ms (latency table "
             f"`{Path(args.lut).name}`), {args.evaluations} evaluated candidates per search, "
             f"{args.threads} threads.", "",
             "| sampler | seed | trials | evaluated | infeasible share | best val acc | its predicted ms | "
             "candidates/min | searcher overhead ms/trial |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['seed']} | {r['trials']} | {r['evaluated']} | "
                     f"{100 * r['infeasible_share']:.0f}% | {100 * r['best_accuracy']:.2f}% | {r['best_ms']:.3f} | "
                     f"{r['candidates_per_min']:.1f} | {r['searcher_ms_per_trial']:.1f} |")
    lines.append("")
    for sampler in args.samplers:
        accs = [r["best_accuracy"] for r in rows if r["sampler"] == sampler]
        lines.append(f"- {sampler}: mean best accuracy {100 * float(np.mean(accs)):.2f}% over seeds {args.seeds}")
    lines.append(f"- every best arch's predicted latency within {target:g} ms: "
                 f"{all(r['best_ms'] <= target for r in rows)}")
    (out / "searchers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
