"""Does the search beat hand design? Search winners against torchvision's x0.5 scaled in width, and against
random search, at budgets that bind.

    .venv/bin/python benchmarks/bench_budgets.py --threads 1            # hours on a 2-core CPU; rerun to continue
    .venv/bin/python benchmarks/bench_budgets.py --report-only          # rewrite the results from the cache
    .venv/bin/python benchmarks/bench_budgets.py --full --threads 1     # also the full preset's supernet winner

Budgets: 0.75x, 1x and 1.25x the latency of `shufflenet_v2_x0_5` in the space, measured once (exported as the
default CPU runtime's file, model.onnx, timed in ONNX Runtime in a fresh process: p50, batch 1, 1 thread) and cached.
At each budget, these networks:
  search     `search.py --target-ms <budget ms> --preset quick`: the default sampler (TPE) over the quick supernet;
  random     the same command with `--sampler random`: as many trials, the same supernet (the shared store trains it
             once for every run), the best feasible candidate;
  x0.5       torchvision's x0.5 shape with its stage widths scaled by hand (--scales, default x2/3, x1, x4/3): the
             widest scale within the budget, judged on its latency relative to x0.5's in one interleaved measurement
             of all scales (ratio <= the budget's factor; separate measurements disagree by tens of percent on a
             shared machine, one measurement's ratios do not); the narrowest, marked over, when none fits;
  full       with --full: `search.py --preset full` (three replicas of the full recipe's supernet, ~40 min to train
             on 2 cores); its own retraining is cut to a few steps, as only its arch is used here.
Every network is retrained with the quick preset's recipe at seeds 0, 1 and 2 (`python -m experiments.train retrain`),
seed-major: every network at seed 0, then at seed 1, then at seed 2, so that a partial run holds complete layers.
A search run retrains its winner at seed 0 with the same recipe: that training is the network's seed 0. Once every
network of the run is known, all are timed in one interleaved measurement in ONNX Runtime (the fastest round's median
over many rounds: load on the shared machine falls on some rounds, and the fastest is the least touched).

Every step is cached under --out (default runs/bench_budgets; state.json is written atomically) and a rerun continues
where the last one stopped. The results go to benchmarks/results/budgets.md, budgets.png and budgets.json (the cached
figures, without checkpoints). budgets.md also shows the supernet's bias towards small archs: the scores of every
search run's trials (trials.csv) against depth, overall and within latency bins.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import datetime
import json
import math
import multiprocessing
import os
import shlex
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's packages, as the search.py and training runs it starts see them

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from provenance import git, machine  # noqa: E402  benchmarks/, the folder of this script
from tqdm import tqdm  # noqa: E402

from experiments.config import load_experiment  # noqa: E402
from latency_lut import FILE_BUDGET, Settings, measure_file_fresh  # noqa: E402
from latency_lut.timing import Budget  # noqa: E402
from latency_lut.validation import measure_archs  # noqa: E402
from search_space import SearchSpace  # noqa: E402
from search_space.arch import Arch, Stage  # noqa: E402
from search_space.files import atomic_write  # noqa: E402

CONFIG = ROOT / "experiments" / "fashion_mnist.yaml"
RESULTS = ROOT / "benchmarks" / "results"
REFERENCE = "shufflenet_v2_x0_5"
FACTORS = (1.0, 0.75, 1.25)  # in the order they are worked on: the reference's own budget first
SEEDS = (0, 1, 2)
BUDGET_TRIES = 3  # fresh-process measurements of each reference when budgets are set (the lowest is kept)
FINAL_BUDGET = Budget(rounds=30, block_s=0.2, min_calls=20, max_calls=200, warmup=10)  # the interleaved measurement
GOAL_POINTS = 1.0  # the winner's mean test accuracy must beat the hand-scaled x0.5's by this many points
FULL_PRESET = "full-arch-only"  # the derived preset of --full: the full preset, retraining cut to a few steps
KINDS = {"search": "search (TPE, quick supernet)", "random": "random search (quick supernet)",
         "x0.5": "x0.5, stage widths", "full": "search (TPE, full supernet)"}
MARKERS = {"search": "o", "random": "s", "x0.5": "^", "full": "D"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_budgets", help="cache folder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training and scoring (latency is "
                        "always timed with the config's latency.threads)")
    parser.add_argument("--factors", type=float, nargs="+", default=list(FACTORS),
                        help=f"budgets as multiples of {REFERENCE}'s latency, worked on in this order "
                        "(default: 1 0.75 1.25)")
    parser.add_argument("--scales", type=Fraction, nargs="+", default=[Fraction(2, 3), Fraction(1), Fraction(4, 3)],
                        help="width scales of the hand-made references (default: 2/3 1 4/3)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="retraining seeds (default 0 1 2)")
    parser.add_argument("--trials", type=int, default=None, help="search trials (default: the quick preset's)")
    parser.add_argument("--full", action="store_true", help="also the full preset's supernet winner (~40 min for "
                        "its supernets on 2 cores, once)")
    parser.add_argument("--supernet-store", type=Path, default=None,
                        help="folder of shared supernets (default: search.py's, the cache folder's)")
    parser.add_argument("--config", type=Path, default=CONFIG, help="experiment YAML with a quick preset (default: "
                        "the fashion_mnist one; its space must hold x0.5)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where budgets.md/.png/.json go")
    parser.add_argument("--report-only", action="store_true", help="rewrite the results from the cache and stop")
    args = parser.parse_args(argv)
    try:
        return Bench(args).run()
    except (ValueError, BenchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


class BenchError(RuntimeError):
    """A step that failed (its log named); the cache keeps every step done before it."""


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads}: expected >= 1")
        if not args.factors or any(f <= 0 for f in args.factors):
            raise ValueError(f"--factors {args.factors}: expected positive multiples")
        self.config: Path = args.config.resolve()
        self.cfg = load_experiment(self.config, "quick")
        self.space = SearchSpace.from_yaml(self.cfg.space)
        lat = self.cfg.latency
        # The default CPU runtime: what search.py ships and promises on a CPU.
        self.settings = Settings(runtime=lat.runtime or "onnxruntime", batch_size=lat.batch_size,
                                 threads=lat.threads, dtype=lat.dtype, num_classes=10, statistic=lat.statistic)
        self.state_path = self.out / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        for key in ("latency", "searches", "trainings"):
            self.state.setdefault(key, {})
        self.scaled = scaled_references(self.space, args.scales)
        self.failed: dict[str, str] = {}  # searches that failed in this process, by key

    # ---- the driver ---------------------------------------------------------------------------------------------

    def run(self) -> int:
        if self.args.report_only:
            if not self.state_path.exists():
                raise BenchError(f"{self.state_path}: no cached results (run without --report-only first)")
            self.write_results()
            return 0
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "logs").mkdir(exist_ok=True)
        self.state.update(command=" ".join(["python", "benchmarks/bench_budgets.py",
                                            *map(shlex.quote, sys.argv[1:])]),
                          commit=git("rev-parse", "--short", "HEAD"), date=datetime.date.today().isoformat(),
                          machine=machine(), factors=self.args.factors, seeds=self.args.seeds,
                          scales=[str(s) for s in self.args.scales])
        self.measure_budgets()
        self.measure_scalings()
        kinds = ["search", "random", "x0.5"] + (["full"] if self.args.full else [])
        for seed in self.args.seeds:
            todo = [(f, k) for f in self.args.factors for k in kinds]
            bar = tqdm(todo, desc=f"seed {seed}", unit="network", file=sys.stderr, dynamic_ncols=True)
            for factor, kind in bar:
                bar.set_postfix_str(f"{factor:g}x {kind}")
                if self.train(factor, kind, seed):
                    # A new network is timed with all the others again (one interleaved measurement of every
                    # network known), and the results are rewritten: a partial run's figures are up to date.
                    self.measure_final()
                    self.write_results()
            bar.close()
        self.measure_final()
        self.write_results()
        if self.failed:
            print(f"error: {len(self.failed)} search(es) failed ({', '.join(self.failed)}); rerun to try again",
                  file=sys.stderr)
            return 1
        return 0

    def save(self) -> None:
        atomic_write(self.state_path, lambda f: json.dump(self.state, f, indent=1))

    # ---- budgets and the hand-made references -------------------------------------------------------------------

    def measure_budgets(self) -> None:
        """The reference's and every scaled reference's latency: each exported and timed in a fresh process, in
        BUDGET_TRIES interleaved passes over all of them, the lowest statistic kept (a shared machine only ever adds
        time; search.py's verdicts take the lowest of their tries too)."""
        todo = [n for n in self.scaled if n not in self.state["latency"]]
        if not todo:
            return
        tries: dict[str, list] = {n: [] for n in todo}
        bar = tqdm(total=BUDGET_TRIES * len(todo), desc="budgets", unit="measurement", file=sys.stderr)
        for _ in range(BUDGET_TRIES):
            for name in todo:
                tries[name].append(measure_exported(self.space, self.scaled[name], self.settings, self.out))
                bar.update()
        bar.close()
        stat = self.settings.statistic
        for name in todo:
            best = min(tries[name], key=lambda m: m.value(stat))
            self.state["latency"][name] = {"arch": self.scaled[name].encode(), "ms": best.value(stat),
                                           "tries_ms": [m.value(stat) for m in tries[name]], **best.summary()}
            print(f"{name}: {best.value(stat):.4f} ms ({stat}, lowest of {BUDGET_TRIES})", file=sys.stderr,
                  flush=True)
        self.save()

    def budget_ms(self, factor: float) -> float:
        return factor * self.state["latency"]["x0.5*1"]["ms"]

    def measure_scalings(self) -> None:
        """x0.5's scalings against x0.5 itself, in one interleaved measurement (a fresh process, the fastest round's
        median): which scaling fits a budget is decided on these ratios, as one measurement's ratios hold under
        load that makes separate measurements disagree by tens of percent on the shared machine."""
        if "scaling_ratios" in self.state:
            return
        names = list(self.scaled)
        print(f"timing x0.5's {len(names)} scalings in {FINAL_BUDGET.rounds} interleaved rounds", file=sys.stderr,
              flush=True)
        timed = time_fresh(self.cfg.space, [self.scaled[n].encode() for n in names], self.settings)
        base = timed[names.index("x0.5*1")]["best_round_ms"]
        self.state["scaling_ratios"] = {n: t["best_round_ms"] / base for n, t in zip(names, timed, strict=True)}
        self.save()

    def hand_scaled(self, factor: float) -> str | None:
        """The widest scaled reference within the budget (its latency at most `factor` times x0.5's in one
        interleaved measurement); the narrowest one when none is (it is marked over)."""
        def scale(n: str) -> Fraction:
            return Fraction(n.split("*")[1])

        if "scaling_ratios" not in self.state:
            return None
        within = [n for n in self.scaled if not self.over(factor, n)]
        return max(within, key=scale) if within else min(self.scaled, key=scale)

    def over(self, factor: float, name: str) -> bool:
        return self.state["scaling_ratios"][name] > factor * (1 + 1e-9)

    # ---- the networks -------------------------------------------------------------------------------------------

    def network(self, factor: float, kind: str) -> str | None:
        """The arch code of one network (running its search first when it is a search's winner)."""
        if kind == "x0.5":
            name = self.hand_scaled(factor)
            return None if name is None else self.state["latency"][name]["arch"]
        key = f"{kind}@{factor:g}x"
        try:
            return self.search(factor, kind)["arch"]
        except BenchError as e:
            # One failed search (an infeasible budget, a crash) costs its network, not the rest of the run; a rerun
            # tries it again. The report names it.
            self.failed[key] = str(e)
            print(f"error: {key}: {e}", file=sys.stderr, flush=True)
            return None

    def search(self, factor: float, kind: str) -> dict:
        key = f"{kind}@{factor:g}x"
        if key in self.state["searches"]:
            return self.state["searches"][key]
        if key in self.failed:
            raise BenchError(self.failed[key])
        budget = self.budget_ms(factor)
        run_dir = self.out / "runs" / key.replace("@", "-")
        seed = self.args.seeds[0]
        cmd = [sys.executable, "search.py", "--target-ms", f"{budget:.4f}", "--device", "cpu", "--config",
               str(self.config),
               "--seed", str(seed), "--threads", str(self.args.threads), "--run-dir", str(run_dir)]
        if kind == "full":
            cmd[cmd.index("--config") + 1] = str(self.full_config())
            cmd += ["--preset", FULL_PRESET]
        else:
            cmd += ["--preset", "quick"]
        if kind == "random":
            cmd += ["--sampler", "random"]
        if self.args.trials is not None:
            cmd += ["--trials", str(self.args.trials)]
        if self.args.supernet_store is not None:
            cmd += ["--supernet-store", str(self.args.supernet_store)]
        start = time.time()
        run_logged(cmd, self.out / "logs" / f"{key.replace('@', '-')}.log")
        ship = json.loads((run_dir / "ship.json").read_text())
        # The winner: shipped and measured within the budget after training (ship.json keeps the rejected too).
        shipped = [(k.split("/")[-1], c) for k, c in ship["shipped"].items() if c["measured_ms"] <= c["target_ms"]]
        if not shipped:
            raise BenchError(f"{run_dir}: no winner within {budget:.4f} ms (see its report.md)")
        code, card = shipped[0]
        entry = {"arch": code, "budget_ms": budget, "run_dir": str(run_dir.relative_to(self.out)),
                 "minutes": round((time.time() - start) / 60, 1), "search_measured_ms": card["measured_ms"],
                 "search_accuracy": card["search_accuracy"], "seed": card["seed"], "recipe": card["recipe"],
                 "val": card["val_accuracy"], "test": card["test_accuracy"], "command": " ".join(cmd[1:])}
        self.state["searches"][key] = entry
        # search.py retrained its winner at its seed with the quick recipe: that is this network's first training.
        quick = self.cfg.to_dict()["retrain"]
        if kind != "full" and card["seed"] == seed and card["recipe"] == quick:
            self.state["trainings"].setdefault(f"{code}@s{seed}", {
                "val": card["val_accuracy"], "test": card["test_accuracy"], "by": f"{key} (search.py)"})
        self.save()
        return entry

    def train(self, factor: float, kind: str, seed: int) -> bool:
        """The network's training at `seed` (its search first, if it has one); whether anything was done."""
        searched = kind != "x0.5" and f"{kind}@{factor:g}x" not in self.state["searches"]
        code = self.network(factor, kind)
        if code is None or f"{code}@s{seed}" in self.state["trainings"]:
            return searched
        run_dir = self.out / "train" / code / f"s{seed}"
        start = time.time()
        run_logged([sys.executable, "-m", "experiments.train", "retrain", "--config", str(self.config), "--preset",
                    "quick", "--seed", str(seed), "--threads", str(self.args.threads), "--run-dir", str(run_dir),
                    "--arch", code], self.out / "logs" / f"train-{kind}-{factor:g}x-s{seed}.log")
        summary = json.loads((run_dir / "retrain.json").read_text())
        self.state["trainings"][f"{code}@s{seed}"] = {"val": summary["val_accuracy"],
                                                     "test": summary["test_accuracy"],
                                                     "by": f"{kind}@{factor:g}x retrain",
                                                     "minutes": round((time.time() - start) / 60, 1)}
        self.save()
        return True

    def full_config(self) -> Path:
        """The experiment file with one more preset: the full one, its retraining cut to a few steps (only the
        winner's arch is used; the supernets and the search are the full preset's, so the store shares them)."""
        raw = yaml.safe_load(self.config.read_text())
        raw["space"] = str((self.config.parent / raw["space"]).resolve())
        if "full" not in (raw.get("presets") or {}):
            raise ValueError(f"--full: {self.config} has no full preset")
        full = dict(raw["presets"]["full"] or {})
        full["retrain"] = {**full.get("retrain", {}), "epochs": 1, "max_steps_per_epoch": 5}
        full["search"] = {**full.get("search", {}), "top_k": 1}
        raw["presets"][FULL_PRESET] = full
        path = self.out / "full-arch-only.yaml"
        atomic_write(path, lambda f: yaml.safe_dump(raw, f, sort_keys=False))
        return path

    # ---- the final measurement ----------------------------------------------------------------------------------

    def codes(self) -> list[str]:
        """Every network known so far (a search not yet run is not)."""
        out = []
        for factor in self.args.factors:
            for kind in KINDS:
                code = self.known(factor, kind)
                if code is not None and code not in out:
                    out.append(code)
        return out

    def known(self, factor: float, kind: str) -> str | None:
        if kind == "x0.5":
            return self.hand_scaled(factor) and self.state["latency"][self.hand_scaled(factor)]["arch"]
        entry = self.state["searches"].get(f"{kind}@{factor:g}x")
        return entry and entry["arch"]

    def measure_final(self) -> None:
        """Every network in one interleaved measurement in the runtime, in a fresh process (random weights: latency
        does not depend on them); measured again only when the set of networks has changed."""
        codes = self.codes()
        if sorted(codes) == sorted(self.state.get("final", {}).get("archs", {})):
            return
        print(f"timing {len(codes)} networks in {FINAL_BUDGET.rounds} interleaved rounds", file=sys.stderr,
              flush=True)
        timed = time_fresh(self.cfg.space, codes, self.settings)
        self.state["final"] = {"rounds": FINAL_BUDGET.rounds, "date": datetime.date.today().isoformat(),
                               "archs": dict(zip(codes, timed, strict=True))}
        self.save()

    # ---- results ------------------------------------------------------------------------------------------------

    def rows(self) -> list[dict]:
        rows = []
        final = self.state.get("final", {}).get("archs", {})
        for factor in sorted(self.state.get("factors", self.args.factors)):
            if "x0.5*1" not in self.state["latency"]:
                break
            for kind in KINDS:
                code = self.known(factor, kind)
                if code is None:
                    continue
                tests = [self.state["trainings"][f"{code}@s{s}"]["test"] for s in self.state.get("seeds", SEEDS)
                         if f"{code}@s{s}" in self.state["trainings"]]
                cost = self.space.cost(Arch.decode(code), 10)
                over = False
                if kind == "x0.5":
                    name = self.hand_scaled(factor)
                    over = self.over(factor, name)
                    name = f"x{name.split('*')[1]}"
                else:
                    name = kind
                rows.append({"over": over, "factor": factor, "budget_ms": self.budget_ms(factor), "kind": kind,
                             "name": name,
                             "arch": code, "params": cost.params, "mflops": cost.mflops,
                             "ms": final.get(code, {}).get("best_round_ms"),
                             "p50_ms": final.get(code, {}).get("p50_ms"),
                             "tests": tests, "mean": float(np.mean(tests)) if tests else None,
                             "std": float(np.std(tests, ddof=1)) if len(tests) > 1 else None})
        return rows

    def write_results(self) -> None:
        self.args.results.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        bias = small_arch_bias(self.out, self.state["searches"])
        summary = {k: self.state.get(k) for k in ("command", "commit", "date", "machine", "factors", "seeds",
                                                   "scales", "latency", "searches", "trainings", "final")}
        summary["rows"] = rows
        summary["bias"] = bias
        atomic_write(self.args.results / "budgets.json", lambda f: json.dump(summary, f, indent=1))
        md = markdown(self.state, rows, bias, self.settings, self.failed)
        atomic_write(self.args.results / "budgets.md", lambda f: f.write(md))
        plot(rows, self.args.results / "budgets.png", self.state)
        print(md)


# ---- helpers ------------------------------------------------------------------------------------------------------


def scaled_references(space: SearchSpace, scales: list[Fraction]) -> dict[str, Arch]:
    """x0.5's shape with each stage width times `scale` (named `x0.5*<scale>`); scale 1 is the reference itself."""
    base = space.reference(REFERENCE)
    out = {}
    for scale in sorted(set(scales) | {Fraction(1)}):
        widths = [stage.width * scale for stage in base.stages]
        if any(w.denominator != 1 for w in widths):
            raise ValueError(f"--scales {scale}: widths {[float(w) for w in widths]} are not whole channels")
        arch = Arch(stem=base.stem, stages=tuple(Stage(width=int(w), units=s.units)
                                                 for w, s in zip(widths, base.stages, strict=True)), head=base.head)
        try:
            space.validate(arch)
        except ValueError as e:
            raise ValueError(f"--scales {scale}: x0.5 scaled so is not in space {space.name!r} ({e})") from None
        out[f"x0.5*{scale}"] = arch
    return out


def measure_exported(space: SearchSpace, arch: Arch, settings: Settings, out: Path):
    """`arch` exported as the runtime's shipped file (model.onnx) and timed in a fresh process, as search.py times
    its reference budgets and its shipped files."""
    import torch

    from experiments.export import export_onnx

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = space.build(arch, settings.num_classes)
    with tempfile.TemporaryDirectory(dir=out, prefix=".measure-") as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(model.eval(), path)
        return measure_file_fresh(path, "cpu", settings, FILE_BUDGET, seed=0)


def time_fresh(space_path: str, codes: list[str], settings: Settings) -> list[dict]:
    """`measure_archs` (interleaved rounds, FINAL_BUDGET) in a fresh process: each arch's summary."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_measure_archs, space_path, codes, settings).result()


def _measure_archs(space_path: str, codes: list[str], settings: Settings) -> list[dict]:
    space = SearchSpace.from_yaml(space_path)
    timed = measure_archs(space, [Arch.decode(c) for c in codes], "cpu", settings, budget=FINAL_BUDGET, seed=0)
    return [m.summary() for m in timed]


def run_logged(cmd: list[str], log: Path) -> None:
    print(f"$ {' '.join(cmd[1:])}  (log: {log})", file=sys.stderr, flush=True)
    with log.open("a") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        raise BenchError(f"exit code {done.returncode}: {' '.join(cmd[1:])} ({tail[0]}; see {log})")


def small_arch_bias(out: Path, searches: dict) -> dict:
    """The supernet's scores against depth (total units) over every scored trial of the search runs: Kendall's tau
    overall and within latency bins (quartiles of the predicted latency, for a bias not explained by speed)."""
    from scipy.stats import kendalltau

    depth, score, ms = [], [], []
    for key, entry in searches.items():
        path = out / entry["run_dir"] / "trials.csv"
        if key.startswith("full@") or not path.exists():  # the quick supernet's bias only
            continue
        with path.open() as f:
            for row in csv.DictReader(f):
                if row["state"] != "COMPLETE" or row["accuracy"] in ("", "nan"):
                    continue
                arch = Arch.decode(row["arch"])
                depth.append(sum(len(s.units) for s in arch.stages))
                score.append(float(row["accuracy"]))
                ms.append(float(row["predicted_ms"]))
    if len(depth) < 8:
        return {"n": len(depth)}
    depth_a, score_a, ms_a = np.array(depth), np.array(score), np.array(ms)
    tau, p = kendalltau(depth_a, score_a)
    bins = []
    edges = np.quantile(ms_a, [0, 0.25, 0.5, 0.75, 1])
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (ms_a >= lo) & (ms_a <= hi)
        if inside.sum() >= 6 and len(set(depth_a[inside])) > 1:
            t, pb = kendalltau(depth_a[inside], score_a[inside])
            bins.append({"lo_ms": float(lo), "hi_ms": float(hi), "n": int(inside.sum()), "tau": float(t),
                         "p": float(pb)})
    return {"n": len(depth), "tau": float(tau), "p": float(p), "bins": bins,
            "depth_range": [int(depth_a.min()), int(depth_a.max())],
            "tau_latency": float(kendalltau(ms_a, score_a)[0])}


def markdown(state: dict, rows: list[dict], bias: dict, settings: Settings, failed: dict[str, str]) -> str:
    final = state.get("final", {})
    ratios = state.get("scaling_ratios", {})
    scaled = ", ".join(f"x{k.split('*')[1]} {ratios[k]:.2f}x x0.5's latency" for k in ratios)
    lines = [
        "# Search against hand design: winners, random search and x0.5 scaled by hand, at budgets that bind",
        "",
        f"Measured by `{state.get('command')}` at commit {state.get('commit')} on {state.get('date')}, "
        f"{state.get('machine')} (2-core shared CPU, no GPU). Runtime: the default on a CPU, `model.onnx` in ONNX "
        f"Runtime, batch {settings.batch_size}, {settings.threads} thread, {settings.dtype}.",
        "",
        f"Budgets: {', '.join(f'{f:g}x' for f in sorted(state.get('factors', FACTORS)))} the latency of {REFERENCE} "
        f"({_ms(state, 'x0.5*1')}; {settings.statistic} of a fresh-process measurement of its exported file). "
        "The hand-made reference is x0.5 with its stage widths scaled; the widest scale whose latency relative to "
        f"x0.5 in one interleaved measurement of the scales ({scaled}) is within the budget's factor. "
        "Every network is retrained with the quick preset's recipe at seeds "
        f"{', '.join(map(str, state.get('seeds', SEEDS)))}; test accuracy is the mean ± standard deviation over the "
        "seeds done. Measured ms: the fastest round's median over "
        f"{final.get('rounds', FINAL_BUDGET.rounds)} interleaved rounds of all networks together (one process, "
        "random weights), which is what 'equal or lower latency' compares. Fresh ms: the exported file timed "
        f"in a fresh process ({settings.statistic}), as budgets are: search.py's verdict on its shipped winner, the "
        f"lowest of {BUDGET_TRIES} for x0.5's scalings.",
        "",
    ]
    for factor in sorted(state.get("factors", FACTORS)):
        here = [r for r in rows if r["factor"] == factor]
        if not here or not any(r["kind"] != "x0.5" for r in here):  # nothing searched at this budget yet
            continue
        lines += [f"## {factor:g}x {REFERENCE}: {here[0]['budget_ms']:.3f} ms", "",
                  "| network | arch | units | params | MFLOPs | measured ms | fresh ms | test acc | n seeds |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in here:
            search = state["searches"].get(f"{r['kind']}@{factor:g}x", {}).get("search_measured_ms")
            if r["kind"] == "x0.5":
                search = state["latency"][f"x0.5*{r['name'][1:]}"]["ms"]
            acc = "—" if r["mean"] is None else f"{100 * r['mean']:.2f}%" + (
                f" ± {100 * r['std']:.2f}" if r["std"] is not None else "")
            name = KINDS[r["kind"]] + (f" {r['name']}" if r["kind"] == "x0.5" else "") + (
                " (over the budget)" if r["over"] else "")
            units = sum(len(stage.units) for stage in Arch.decode(r["arch"]).stages)
            lines.append(f"| {name} | `{r['arch']}` | {units} | "
                         f"{r['params']:,} | {r['mflops']:.1f} | {_f(r['ms'])} | {_f(search)} | {acc} | "
                         f"{len(r['tests'])} |")
        lines += [f"\n{KINDS[key.split('@')[0]]} failed: {why}" for key, why in failed.items()
                  if key.endswith(f"@{factor:g}x")]
        if any(r["over"] for r in here):
            lines += ["", "No width-scaled x0.5 is within this budget: the narrowest is shown, over it."]
        lines += ["", *goal_lines(here), ""]
    lines += ["## The supernet's bias towards small archs", ""]
    if "tau" not in bias:
        lines.append(f"Too few scored trials yet ({bias['n']}).")
    else:
        lines.append(f"Over the {bias['n']} trials that the quick searches scored (trials.csv of the TPE and random "
                     f"runs; depth {bias['depth_range'][0]}-{bias['depth_range'][1]} units), Kendall's tau between "
                     f"the supernet's score and depth is {bias['tau']:+.2f} (p {_f(bias['p'], 2)}); between score and "
                     f"predicted latency {bias['tau_latency']:+.2f}. Within latency quartiles:")
        if bias["bins"]:
            lines += ["", "| predicted ms | trials | tau(depth, score) | p |", "|---|---:|---:|---:|"]
            lines += [f"| {b['lo_ms']:.3f}-{b['hi_ms']:.3f} | {b['n']} | {b['tau']:+.2f} | {b['p']:.2g} |"
                      for b in bias["bins"]]
        else:
            lines += ["", "No latency quartile holds enough trials (6) of more than one depth."]
        lines += ["", "A negative tau: at a like latency, the supernet scores shallower archs higher."]
    return "\n".join(lines) + "\n"


def goal_lines(here: list[dict]) -> list[str]:
    by = {r["kind"]: r for r in here}
    win, ref, rnd = by.get("search"), by.get("x0.5"), by.get("random")
    if win is None or win["mean"] is None:
        return ["Goal: not decided yet (no winner trained)."]
    out = []
    if ref is not None and ref["mean"] is not None and win["ms"] is not None and ref["ms"] is not None:
        gain = 100 * (win["mean"] - ref["mean"])
        faster = win["ms"] <= ref["ms"]
        holds = gain >= GOAL_POINTS and faster
        out.append(f"- Against x0.5 with widths {ref['name']}: {gain:+.2f} points at {win['ms']:.3f} ms against "
                   f"{ref['ms']:.3f} ms (means over {len(win['tests'])} and {len(ref['tests'])} seeds): goal "
                   f"(>= +{GOAL_POINTS:g} point at equal or lower latency) {'holds' if holds else 'does not hold'}.")
    else:
        out.append("- Against the width-scaled x0.5: not decided (none within the budget, or not trained/timed yet).")
    if rnd is not None and rnd["mean"] is not None:
        gain = 100 * (win["mean"] - rnd["mean"])
        out.append(f"- Against random search's winner: {gain:+.2f} points (means over {len(win['tests'])} and "
                   f"{len(rnd['tests'])} seeds): goal (>= random search) {'holds' if gain >= 0 else 'does not hold'}.")
    full = by.get("full")
    if full is not None and full["mean"] is not None:
        out.append(f"- The full supernet's winner: {100 * (full['mean'] - win['mean']):+.2f} points against the "
                   f"quick supernet's ({len(full['tests'])}/{len(win['tests'])} seeds).")
    return out


def plot(rows: list[dict], path: Path, state: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = dict(zip(sorted(state.get("factors", FACTORS)), plt.rcParams["axes.prop_cycle"].by_key()["color"],
                      strict=False))
    from matplotlib.lines import Line2D

    seen: dict[str, Line2D] = {}
    for r in rows:
        if r["mean"] is None or r["ms"] is None:
            continue
        seen.setdefault(r["kind"], Line2D([], [], ls="", marker=MARKERS[r["kind"]], color="gray", mec="black",
                                          label=KINDS[r["kind"]]))
        ax.errorbar(r["ms"], 100 * r["mean"], yerr=100 * (r["std"] or 0), fmt=MARKERS[r["kind"]],
                    color=colors.get(r["factor"]), mec="black", ms=7, capsize=3)
    for factor, color in colors.items():
        here = [r for r in rows if r["factor"] == factor]
        if here:
            ax.axvline(here[0]["budget_ms"], color=color, ls=":", lw=1)
            ax.text(here[0]["budget_ms"], ax.get_ylim()[0] if ax.has_data() else 0, f" {factor:g}x", color=color,
                    va="bottom", fontsize=8)
    ax.set_xlabel("measured latency, ms (fastest round, ONNX Runtime, batch 1, 1 thread)")
    ax.set_ylabel("test accuracy, % (mean ± std over seeds)")
    ax.set_title("Fashion-MNIST: search against x0.5 scaled by hand\n(dotted: budgets, p50 of a fresh process)",
                 fontsize=10)
    if seen:
        ax.legend(handles=list(seen.values()), fontsize=8, title="colour: budget", title_fontsize=8)
    ax.grid(alpha=0.3)
    fig.text(0.01, 0.01, f"{state.get('command')} | {state.get('commit')} {state.get('date')} | 2-core shared CPU",
             fontsize=6, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ms(state: dict, name: str) -> str:
    entry = state.get("latency", {}).get(name)
    return "—" if entry is None else f"{entry['ms']:.3f} ms"


def _f(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}g}" if (
        digits != 3) else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
