"""Does the search beat hand-made width scaling? Search winners against the width-scaled references, per budget.

    .venv/bin/python benchmarks/bench_budgets.py [--scales 2/3 1 4/3] [--supernet DIR] [--threads 1]

The references are torchvision's x0.5 shape in the space (depths 4/8/4, kernel 3, split 0.5) with its stage widths
scaled by each factor, as one would scale a network by hand. For each one:
  1. its latency is measured on this CPU with the latency table's settings; that is the budget;
  2. `search.py --target-ms <budget> --preset quick` searches, retrains, exports and re-measures a winner;
  3. the reference itself is retrained with the same recipe (`experiments.train retrain --preset quick`, same seed).
Finally every network is timed again in one interleaved session (the fastest of many rounds each, so load on the
shared machine touches all of them alike), and the table goes to benchmarks/results/budgets.md.

Every step is cached under --out (default runs/bench_budgets) and reruns continue where they stopped. With
--supernet, each search run starts from a copy of that trained supernet directory (it must come from the same
config and seed) instead of training its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


from experiments.config import load_experiment  # noqa: E402
from latency_lut import Settings  # noqa: E402
from latency_lut.timing import Budget, Measurement  # noqa: E402
from latency_lut.validation import measure_archs  # noqa: E402
from search_space import SearchSpace  # noqa: E402
from search_space.arch import Arch, Stage  # noqa: E402
from search_space.files import atomic_write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "fashion_mnist.yaml"
BUDGET_ROUNDS = 5  # rounds when a reference's latency becomes a budget
FINAL_ROUNDS = 15  # interleaved rounds of the final comparison


def scaled_references(space: SearchSpace, scales: list[Fraction]) -> dict[str, Arch]:
    """x0.5's shape with each stage width times `scale`, for the scales whose widths the space offers."""
    base = space.reference("shufflenet_v2_x0_5")
    out = {}
    for scale in scales:
        widths = [stage.width * scale for stage in base.stages]
        if any(w.denominator != 1 for w in widths):
            raise SystemExit(f"scale {scale}: widths {[float(w) for w in widths]} are not whole channels")
        arch = Arch(stem=base.stem, stages=tuple(Stage(width=int(w), units=s.units)
                                                 for w, s in zip(widths, base.stages, strict=True)), head=base.head)
        try:
            space.validate(arch)
        except ValueError as e:
            raise SystemExit(f"scale {scale}: not in the space ({e})") from None
        out[f"x0.5*{scale}"] = arch
    return out


def time_all(space: SearchSpace, archs: dict[str, Arch], settings: Settings, rounds: int,
             seed: int) -> dict[str, Measurement]:
    """Interleaved rounds of every arch (`latency_lut.validation.measure_archs`), by name."""
    budget = Budget(rounds=rounds, block_s=0.2, max_calls=50, warmup=3)
    timed = measure_archs(space, list(archs.values()), "cpu", settings, budget=budget, seed=seed, progress=False)
    return dict(zip(archs, timed, strict=True))


def run(cmd: list[str], log: Path) -> None:
    print(f"$ {' '.join(cmd)}  (log: {log})", file=sys.stderr, flush=True)
    with log.open("a") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"failed with exit code {done.returncode}: {' '.join(cmd)} (see {log})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", nargs="+", type=Fraction, default=[Fraction(2, 3), Fraction(1), Fraction(4, 3)])
    parser.add_argument("--supernet", type=Path, help="a trained supernet directory to start every search from")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_budgets")
    parser.add_argument("--threads", type=int, default=1, help="training threads (latency is always the table's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true", help="rewrite budgets.md from the cached results")
    args = parser.parse_args()
    cfg = load_experiment(CONFIG, "quick")
    space = SearchSpace.from_yaml(cfg.space)
    settings = Settings(runtime=cfg.latency.runtime, batch_size=cfg.latency.batch_size, threads=cfg.latency.threads,
                        dtype=cfg.latency.dtype, num_classes=10)
    args.out.mkdir(parents=True, exist_ok=True)
    state_path = args.out / "budgets.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"budgets": {}, "refs": {}, "wins": {}}

    def save() -> None:
        atomic_write(state_path, lambda f: json.dump(state, f, indent=1))

    refs = scaled_references(space, args.scales)
    if args.report_only:
        write_markdown(space, refs, state, ROOT / "benchmarks" / "results" / "budgets.md")
        return
    todo = {n: a for n, a in refs.items() if n not in state["budgets"]}
    if todo:
        timed = time_all(space, todo, settings, BUDGET_ROUNDS, args.seed)
        for name, m in timed.items():
            state["budgets"][name] = round(m.p50_ms, 2)
        save()
    py = sys.executable
    for name, arch in refs.items():
        budget = state["budgets"][name]
        run_dir = args.out / f"search-{budget:g}ms"
        if name not in state["wins"]:
            if args.supernet and not (run_dir / "supernet" / "supernet.pt").exists():
                shutil.copytree(args.supernet, run_dir / "supernet", dirs_exist_ok=True)
            # A winner already retrained for another budget is the same training (same arch, recipe and seed, bit
            # for bit on a CPU): its checkpoint is offered where search.py retrains rank 1, and removed if unused.
            offered = []
            for other in state["wins"].values():
                folder = run_dir / "winners" / f"1-{other['arch']}"
                if not folder.exists():
                    shutil.copytree(args.out / other["train"], folder / "train")
                    offered.append(folder)
            start = time.time()
            run([py, "search.py", "--target-ms", f"{budget:g}", "--device", "cpu", "--preset", "quick",
                 "--seed", str(args.seed), "--threads", str(args.threads), "--run-dir", str(run_dir)],
                args.out / f"search-{budget:g}ms.log")
            ship = json.loads((run_dir / "ship.json").read_text())
            # The winner: shipped and measured within the budget after export (search.py keeps the others' records).
            shipped = next((code, card) for code, card in ship["shipped"].items() if card["measured_ms"] <= budget)
            for folder in offered:
                if folder.name != f"1-{shipped[0]}":
                    shutil.rmtree(folder)
            train = (run_dir / shipped[1]["folder"] / "train").relative_to(args.out)
            state["wins"][name] = {"arch": shipped[0], "minutes": round((time.time() - start) / 60, 1),
                                   "train": str(train),
                                   "search_measured_ms": shipped[1]["measured_ms"],
                                   "val": shipped[1]["val_accuracy"], "test": shipped[1]["test_accuracy"]}
            save()
        if name not in state["refs"]:
            ref_dir = args.out / f"ref-{name.replace('*', 'x').replace('/', '_')}"
            start = time.time()
            run([py, "-m", "experiments.train", "retrain", "--config", str(CONFIG), "--preset", "quick",
                 "--seed", str(args.seed), "--threads", str(args.threads), "--run-dir", str(ref_dir),
                 "--arch", arch.encode(), "--no-progress"], args.out / f"{ref_dir.name}.log")
            summary = json.loads((ref_dir / "retrain.json").read_text())
            state["refs"][name] = {"arch": arch.encode(), "minutes": round((time.time() - start) / 60, 1),
                                   "val": summary["val_accuracy"], "test": summary["test_accuracy"]}
            save()

    # One interleaved session for all of them: latency does not depend on the weights, so the plain builds time the
    # same networks the runs exported.
    archs = {}
    for name in refs:
        archs[f"ref {name}"] = Arch.decode(state["refs"][name]["arch"])
        archs[f"win {name}"] = Arch.decode(state["wins"][name]["arch"])
    timed = time_all(space, archs, settings, FINAL_ROUNDS, args.seed)
    state["final_ms"] = {k: round(m.p50_ms, 3) for k, m in timed.items()}
    save()
    write_markdown(space, refs, state, ROOT / "benchmarks" / "results" / "budgets.md")


def write_markdown(space: SearchSpace, refs: dict[str, Arch], state: dict, path: Path) -> None:
    rows = []
    for name in refs:
        ref, win = state["refs"][name], state["wins"][name]
        for kind, entry in (("reference " + name, ref), ("search winner", win)):
            arch = Arch.decode(entry["arch"])
            cost = space.cost(arch, 10)
            key = ("ref " if kind.startswith("reference") else "win ") + name
            rows.append(f"| {state['budgets'][name]:g} | {kind} | `{entry['arch']}` | {cost.params:,} | "
                        f"{cost.mflops:.1f} | {state['final_ms'][key]:.2f} | {100 * entry['val']:.2f}% | "
                        f"{100 * entry['test']:.2f}% |")
    gains = []
    for name in refs:
        ref, win = state["refs"][name], state["wins"][name]
        speed = state["final_ms"][f"ref {name}"] / state["final_ms"][f"win {name}"]
        gains.append(f"- {state['budgets'][name]:g} ms: the winner {100 * (win['test'] - ref['test']):+.2f} points of "
                     f"test accuracy against x0.5 scaled by {name.split('*')[1]}, and {speed:.2f}x as fast")
    text = "\n".join([
        "# Search winners against hand-made width scaling",
        "",
        "`python benchmarks/bench_budgets.py` (see its docstring). Budget: the reference's measured latency "
        "(batch 1, 1 thread, eager, float32). Both networks of a budget are retrained with the quick preset "
        "and the same seed; latency is the fastest round's median over "
        f"{FINAL_ROUNDS} interleaved rounds of all networks together.",
        "",
        "| budget ms | network | arch | params | MFLOPs | measured ms | val acc | test acc |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        *gains,
        "",
    ])
    path.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
