"""Supernet ranking on archs never used to choose a recipe: Kendall's tau of the shipped presets' supernets against
retraining from scratch, on archs drawn for this benchmark alone.

    .venv/bin/python benchmarks/bench_heldout.py --jobs 2        # hours on a 2-core CPU; rerun to continue
    .venv/bin/python benchmarks/bench_heldout.py --report-only   # rewrite the results from the cache

The archs: --archs (10) of 2,000 uniform samples of the space, at evenly spaced quantiles of their latency as the
default CPU runtime's table predicts it (ONNX Runtime, batch 1, 1 thread; search.py profiles it when it is missing),
drawn with --arch-seed (1807; the recipes were chosen on archs of seed 123). They are drawn once and cached.

The ground truth: every arch retrained from scratch with the quick preset's recipe (`python -m experiments.train
retrain --preset quick`, what `make demo` ships) at seeds 0, 1 and 2, seed-major; the mean validation accuracy
(5,000 images) ranks them, and the test accuracy (10,000) is reported beside it. The report gives the spread of the
archs' means next to the seed-to-seed noise: a ground truth whose spread is inside its noise ranks nothing.
--truth NAME=PRESET+KEY=VALUE... retrains it with another recipe (e.g. more epochs), in another --out.

The supernets: each of --presets (quick, full) trained exactly as search.py trains it (its recipe, its replicas, in
the shared supernet store, so search.py and bench_budgets.py --full reuse them), and every arch scored as the preset
scores candidates (BatchNorm recalibrated on its own image count, accuracy on its own validation images, the mean
over its replicas). Nothing is tuned on these archs.

The small-arch bias: tau of the scores against depth (units in all) next to tau of the ground truth against depth,
and tau within latency bins (the archs split at the median predicted latency; pairs within a bin pooled).

--jobs trainings run at once, each at --threads threads (2 x 1 on a 2-core CPU). Every finished training is cached
under --out (state.json, written atomically); a rerun continues, and a training killed midway resumes from its last
checkpoint. Results: benchmarks/results/heldout.md and heldout.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable
from itertools import combinations
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from provenance import commit, machine  # noqa: E402  benchmarks/, the folder of this script
from tqdm import tqdm  # noqa: E402

from experiments.config import load_experiment  # noqa: E402
from search_space import SearchSpace  # noqa: E402
from search_space.arch import Arch  # noqa: E402
from search_space.files import atomic_write  # noqa: E402

CONFIG = ROOT / "experiments" / "fashion_mnist.yaml"
RESULTS = ROOT / "benchmarks" / "results"
ARCH_SEED = 1807
SEEDS = (0, 1, 2)
TRUTH_PRESET = "quick"
POOL = 2000
GOALS = {"full": 0.6, "quick": 0.4}  # tau on the held-out archs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_heldout", help="cache folder")
    parser.add_argument("--config", type=Path, default=CONFIG, help="experiment YAML (default: fashion_mnist)")
    parser.add_argument("--archs", type=int, default=10, help="held-out archs (default 10)")
    parser.add_argument("--arch-seed", type=int, default=ARCH_SEED, help=f"seed of the draw (default {ARCH_SEED})")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="retraining seeds (default 0 1 2)")
    parser.add_argument("--presets", nargs="+", default=["quick", "full"], help="presets whose supernets are scored")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=PRESET+KEY=VALUE...",
                        help="also score a supernet of a preset changed key by key, e.g. "
                        "quick-fair=quick+supernet.sampling=fair+supernet.max_steps_per_epoch=33 (repeatable)")
    parser.add_argument("--truth", default=TRUTH_PRESET, metavar="PRESET | NAME=PRESET+KEY=VALUE...",
                        help=f"the retraining recipe of the ground truth (default: the {TRUTH_PRESET} preset), e.g. "
                        "quick-6ep=quick+retrain.epochs=6; another recipe needs another --out")
    parser.add_argument("--lut", type=Path, default=None, help="latency table that spreads the archs (default: the "
                        "cache folder's ONNX Runtime table for the space, batch 1, 1 thread)")
    parser.add_argument("--supernet-store", type=Path, default=None, help="shared supernets (default: search.py's)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training (default 1)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where heldout.md/.json go")
    parser.add_argument("--report-only", action="store_true", help="rewrite the results from the cache and stop")
    parser.add_argument("--replica", default=None, help=argparse.SUPPRESS)  # PRESET:K, run by the driver
    args = parser.parse_args(argv)
    try:
        if args.replica:
            preset, k = args.replica.split(":")
            train_replica(args, preset, int(k))
            return 0
        return Bench(args).run()
    except (ValueError, FileNotFoundError, BenchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


class BenchError(RuntimeError):
    """A training that failed (its log named); the cache keeps every one finished before it."""


def store_of(args: argparse.Namespace) -> Path:
    from experiments.supernets import default_store

    return args.supernet_store or default_store()


def parse_variant(text: str) -> tuple[str, dict]:
    """NAME=PRESET+SECTION.KEY=VALUE+... as (NAME, {"base": PRESET, "set": {"SECTION.KEY": value}}), values read as
    YAML scalars."""
    name, sep, rest = text.partition("=")
    base, *pairs = rest.split("+")
    if not sep or not name or not base or ":" in name:
        raise ValueError(f"--variant {text}: expected NAME=PRESET+SECTION.KEY=VALUE...")
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key.count(".") != 1:
            raise ValueError(f"--variant {text}: {pair!r} is not SECTION.KEY=VALUE")
        changes[key] = yaml.safe_load(value)
    return name, {"base": base, "set": changes}


def variants_file(config: Path, variants: dict, out: Path) -> Path:
    """The experiment file with one more preset per variant (its base preset's overrides, then its own changes),
    written under `out`; load_experiment validates it as any experiment file."""
    raw = yaml.safe_load(config.read_text())
    raw["space"] = str((config.parent / raw["space"]).resolve())
    presets = raw.setdefault("presets", {}) or {}
    for name, variant in variants.items():
        if name in presets:
            raise ValueError(f"--variant {name}: {config} has a preset of that name")
        if variant["base"] not in presets:
            raise ValueError(f"--variant {name}: {config} has no preset {variant['base']!r}")
        preset = {section: dict(keys or {}) for section, keys in (presets[variant["base"]] or {}).items()}
        for key, value in variant["set"].items():
            section, field = key.split(".")
            preset.setdefault(section, {})[field] = value
        presets[name] = preset
    raw["presets"] = presets
    out.mkdir(parents=True, exist_ok=True)
    path = out / "experiment-variants.yaml"
    atomic_write(path, lambda f: yaml.safe_dump(raw, f, sort_keys=False))
    return path


def replica_config(config: Path, preset: str, k: int):
    """The preset's recipe for replica k alone: seed `seed + k`, one replica (the store keys it as search.py does)."""
    cfg = load_experiment(config, preset)
    return dataclasses.replace(cfg, seed=cfg.seed + k, supernet=dataclasses.replace(cfg.supernet, replicas=1))


def train_replica(args: argparse.Namespace, preset: str, k: int) -> None:
    """Train (or continue) replica k of the preset's supernets in the store: a process of its own, so that replicas
    train side by side."""
    import torch

    from experiments.data import load_splits
    from experiments.supernets import shared_supernets

    torch.set_num_threads(args.threads)
    cfg = replica_config(args.config.resolve(), preset, k)
    space = SearchSpace.from_yaml(cfg.space)
    shared_supernets(space, load_splits(cfg.data, cfg.seed), cfg, store_of(args), device="cpu", progress=False)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        if args.jobs < 1 or args.threads < 1:
            raise ValueError(f"--jobs {args.jobs} --threads {args.threads}: expected >= 1 each")
        if args.archs < 4:
            raise ValueError(f"--archs {args.archs}: expected >= 4 (a ranking needs a few)")
        self.args = args
        self.out: Path = args.out
        self.config: Path = args.config.resolve()
        self.variants = dict(parse_variant(v) for v in args.variant)
        self.presets = list(dict.fromkeys([*args.presets, *self.variants]))
        truth = dict([parse_variant(args.truth)]) if "=" in args.truth else {}
        self.truth = next(iter(truth), args.truth)
        # The experiment file of the supernets and the retraining: the given one, plus a preset for each variant.
        both = {**self.variants, **truth}
        self.variant_config = self.config if not both else variants_file(self.config, both, args.out)
        for preset in [*self.presets, self.truth]:
            load_experiment(self.variant_config, preset)  # an unknown preset or key fails now, not after hours
        self.space = SearchSpace.from_yaml(load_experiment(self.config, None).space)
        self.state_path = self.out / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        wanted = {"name": self.truth, **truth.get(self.truth, {})}
        cached = self.state.get("truth", {"name": TRUTH_PRESET})
        if self.state.get("trainings") and cached != wanted:
            raise ValueError(f"{self.state_path}: its ground truth was retrained with {cached}; use another --out "
                             f"for --truth {args.truth}")
        self.state["truth"] = wanted
        for key in ("trainings", "scores"):
            self.state.setdefault(key, {})
        self.lock = threading.Lock()

    def save(self) -> None:
        atomic_write(self.state_path, lambda f: json.dump(self.state, f, indent=1))

    # ---- the driver ---------------------------------------------------------------------------------------------

    def run(self) -> int:
        if self.args.report_only:
            if "archs" not in self.state:
                raise BenchError(f"{self.state_path}: no cached results (run without --report-only first)")
            self.write_results()
            return 0
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.draw()
        self.state.update(command=" ".join(["python", "benchmarks/bench_heldout.py", *map(shlex.quote,
                                                                                        sys.argv[1:])]),
                          commit=commit(), date=datetime.date.today().isoformat(), machine=machine(),
                          seeds=self.args.seeds)
        self.state["presets"] = list(dict.fromkeys([*self.state.get("presets", []), *self.presets]))
        self.state.setdefault("variants", {}).update(self.variants)
        self.save()
        self.score_ready()
        jobs = self.jobs()
        failed = []
        bar = tqdm(total=len(jobs), desc="trainings", unit="training", file=sys.stderr, dynamic_ncols=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.args.jobs) as pool:
            futures = {pool.submit(job): name for name, job in jobs}
            for future in concurrent.futures.as_completed(futures):
                bar.update()
                bar.set_postfix_str(futures[future])
                try:
                    future.result()
                except BenchError as e:
                    failed.append(str(e))
                    print(f"error: {e}", file=sys.stderr, flush=True)
                    continue
                with self.lock:
                    self.score_ready()
                    self.write_results()
        bar.close()
        self.score_ready()
        self.write_results()
        if failed:
            print(f"error: {len(failed)} training(s) failed; rerun to try again", file=sys.stderr)
            return 1
        return 0

    def draw(self) -> None:
        """The held-out archs, drawn once: evenly spaced quantiles of predicted latency over uniform samples."""
        if "archs" in self.state:
            if self.state["arch_seed"] != self.args.arch_seed or len(self.state["archs"]) != self.args.archs:
                raise ValueError(f"{self.state_path}: holds {len(self.state['archs'])} archs of seed "
                                 f"{self.state['arch_seed']}; use another --out for --archs {self.args.archs} "
                                 f"--arch-seed {self.args.arch_seed}")
            return
        from latency_lut import LatencyTable, Settings
        from latency_lut.profiler import default_out

        lat = load_experiment(self.config, None).latency  # the default CPU runtime's table, as search.py keeps it
        settings = Settings(runtime=lat.runtime or "onnxruntime", batch_size=lat.batch_size, threads=lat.threads,
                            dtype=lat.dtype, statistic=lat.statistic)
        lut = self.args.lut or default_out(self.space, "cpu", settings)
        if not Path(lut).exists():
            raise FileNotFoundError(f"{lut}: no latency table (search.py profiles it when it is missing; or pass "
                                    "--lut)")
        table = LatencyTable.load(lut, allow_mismatch=True)
        rng = np.random.default_rng(self.args.arch_seed)
        pool = [self.space.sample(rng) for _ in range(POOL)]
        ms = table.predict_many(pool)
        order = np.argsort(ms, kind="stable")
        picks = [int(order[int((i + 0.5) / self.args.archs * POOL)]) for i in range(self.args.archs)]
        self.state.update(arch_seed=self.args.arch_seed, lut=str(lut),
                          archs={pool[i].encode(): {"predicted_ms": float(ms[i])} for i in picks})
        self.save()

    def jobs(self) -> list[tuple[str, Callable[[], None]]]:
        """What is left, in the order it is worked on: every arch at the first seed (a ground truth of one seed),
        the supernets, then the other seeds."""
        def retrain(code: str, seed: int) -> tuple[str, Callable[[], None]]:
            return f"{depth(code)}-unit arch s{seed}", lambda: self.retrain(code, seed)

        first, *rest = self.args.seeds
        out = [retrain(code, first) for code in self.state["archs"] if f"{code}@s{first}" not in
                self.state["trainings"]]
        for preset in self.presets:
            if preset in self.state["scores"]:
                continue
            for k in range(load_experiment(self.variant_config, preset).supernet.replicas):
                out.append((f"{preset} supernet {k}", lambda p=preset, k=k: self.replica(p, k)))
        out += [retrain(code, seed) for seed in rest for code in self.state["archs"]
                if f"{code}@s{seed}" not in self.state["trainings"]]
        return out

    def retrain(self, code: str, seed: int) -> None:
        run_dir = self.out / "train" / code / f"s{seed}"
        log = self.out / "logs" / f"retrain-{list(self.state['archs']).index(code)}-s{seed}.log"
        config = self.config if self.truth == self.args.truth else self.variant_config  # a preset, or a variant
        run_logged([sys.executable, "-m", "experiments.train", "retrain", "--config", str(config), "--preset",
                    self.truth, "--seed", str(seed), "--threads", str(self.args.threads), "--run-dir",
                    str(run_dir), "--arch", code, "--no-progress"], log)
        summary = json.loads((run_dir / "retrain.json").read_text())
        seconds = sum(epoch.get("seconds", 0) for epoch in summary["history"])
        with self.lock:
            self.state["trainings"][f"{code}@s{seed}"] = {"val": summary["val_accuracy"],
                                                         "test": summary["test_accuracy"],
                                                         "minutes": round(seconds / 60, 1)}
            self.save()

    def replica(self, preset: str, k: int) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--replica", f"{preset}:{k}", "--config",
               str(self.variant_config), "--threads", str(self.args.threads)]
        if self.args.supernet_store is not None:
            cmd += ["--supernet-store", str(self.args.supernet_store)]
        run_logged(cmd, self.out / "logs" / f"supernet-{preset}-{k}.log")

    def score_ready(self) -> None:
        """Score the archs with every preset whose supernets are all trained (once; cached)."""
        from experiments.supernets import replica_entries

        for preset in self.presets:
            if preset in self.state["scores"]:
                continue
            cfg = load_experiment(self.variant_config, preset)
            entries = replica_entries(store_of(self.args), self.space, cfg, 10)
            if all(e.finished(cfg.supernet.epochs) for e in entries):
                self.state["scores"][preset] = self.score(cfg, [e.checkpoint for e in entries])
                self.save()

    def score(self, cfg, checkpoints: list[Path]) -> dict:
        import torch

        from experiments.checkpoints import load_supernet
        from experiments.data import load_splits
        from experiments.evaluate import Evaluator

        torch.set_num_threads(self.args.threads)
        supernets = [load_supernet(path, device="cpu") for path in checkpoints]
        evaluator = Evaluator(supernets, load_splits(cfg.data, cfg.seed), cfg.evaluate, seed=cfg.seed, device="cpu")
        scores = {}
        for code in tqdm(self.state["archs"], desc="scoring", unit="arch", file=sys.stderr, leave=False):
            record = evaluator.score(Arch.decode(code))
            scores[code] = {"accuracy": record.accuracy, "loss": record.loss}
        return {"supernets": [str(p) for p in checkpoints], "recipe": dataclasses.asdict(cfg.supernet),
                "evaluate": dataclasses.asdict(cfg.evaluate), "archs": scores}

    # ---- results ------------------------------------------------------------------------------------------------

    def rows(self) -> list[dict]:
        rows = []
        for code, info in sorted(self.state["archs"].items(), key=lambda kv: kv[1]["predicted_ms"]):
            runs = [self.state["trainings"].get(f"{code}@s{s}") for s in self.state.get("seeds", SEEDS)]
            runs = [r for r in runs if r is not None]
            cost = self.space.cost(Arch.decode(code), 10)
            rows.append({"arch": code, "depth": depth(code), "mflops": cost.mflops, "params": cost.params,
                         "predicted_ms": info["predicted_ms"], "vals": [r["val"] for r in runs],
                         "tests": [r["test"] for r in runs],
                         "scores": {p: s["archs"][code] for p, s in self.state["scores"].items()}})
        return rows

    def write_results(self) -> None:
        self.args.results.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        analysis = analyse(rows, list(self.state["scores"]))
        summary = {k: self.state.get(k) for k in ("command", "commit", "date", "machine", "arch_seed", "lut",
                                                   "seeds", "presets", "truth", "trainings")}
        scores = {p: {k: v for k, v in s.items() if k != "archs"} for p, s in self.state["scores"].items()}
        summary.update(rows=rows, analysis=analysis, scores=scores)
        atomic_write(self.args.results / "heldout.json", lambda f: json.dump(summary, f, indent=1))
        md = markdown(self.state, rows, analysis)
        atomic_write(self.args.results / "heldout.md", lambda f: f.write(md))


# ---- analysis -----------------------------------------------------------------------------------------------------


def depth(code: str) -> int:
    return sum(len(stage.units) for stage in Arch.decode(code).stages)


def tau(x, y) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(x, y).statistic)


def pooled_tau(x: list[float], y: list[float], groups: list[int]) -> tuple[float, int]:
    """Kendall's tau-a over the pairs within the same group only: concordant minus discordant, over those pairs."""
    pairs = [(i, j) for i, j in combinations(range(len(x)), 2) if groups[i] == groups[j]]
    if not pairs:
        return float("nan"), 0
    s = sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i, j in pairs)
    return float(s / len(pairs)), len(pairs)


def analyse(rows: list[dict], presets: list[str]) -> dict:
    """The ground truth's spread and noise, and each preset's tau: overall, within latency bins, against depth."""
    seeds = min((len(r["vals"]) for r in rows), default=0)
    if seeds == 0:
        return {"seeds": 0}
    vals = np.array([r["vals"][:seeds] for r in rows]) * 100
    tests = np.array([r["tests"][:seeds] for r in rows]) * 100
    truth, truth_test = vals.mean(axis=1), tests.mean(axis=1)
    depths = [r["depth"] for r in rows]
    ms = np.array([r["predicted_ms"] for r in rows])
    bins = [int(m > np.median(ms)) for m in ms]
    out = {"seeds": seeds, "truth_range": [float(truth.min()), float(truth.max())],
           "truth_std_over_archs": float(truth.std(ddof=1)),
           "tau_truth_depth": tau(depths, truth), "tau_truth_latency": tau(ms, truth),
           "tau_val_test": tau(truth, truth_test)}
    if seeds > 1:
        noise = vals.std(axis=1, ddof=1)
        out.update(seed_std=float(noise.mean()), seed_std_of_mean=float(noise.mean() / np.sqrt(seeds)),
                   # how much one retraining's ranking agrees with another seed's: the ground truth's own ceiling
                   tau_between_seeds=float(np.mean([tau(vals[:, a], vals[:, b])
                                                    for a, b in combinations(range(seeds), 2)])))
    out["presets"] = {}
    for preset in presets:
        score = np.array([r["scores"][preset]["accuracy"] for r in rows]) * 100
        loss = np.array([r["scores"][preset]["loss"] for r in rows])
        within, pairs = pooled_tau(list(score), list(truth), bins)
        out["presets"][preset] = {
            "tau": tau(score, truth), "tau_test": tau(score, truth_test), "tau_loss": tau(-loss, truth),
            "tau_within_bins": within, "pairs_within_bins": pairs, "tau_score_depth": tau(depths, score),
            "score_range": [float(score.min()), float(score.max())]}
    return out


def markdown(state: dict, rows: list[dict], a: dict) -> str:
    presets = list(state["scores"])
    lines = ["# Supernet ranking on held-out archs", "",
             f"Measured by `{state.get('command')}` at commit {state.get('commit')} on {state.get('date')}, "
             f"{state.get('machine')}. Archs: {len(rows)} drawn with seed {state.get('arch_seed')} at evenly spaced "
             f"quantiles of predicted latency (`{Path(state.get('lut', '')).name}`, ONNX Runtime, batch 1, 1 thread) "
             "over 2,000 uniform samples; none was used to choose a recipe. Ground truth: each retrained from scratch "
             f"with {recipe_text(state)} at seeds {', '.join(map(str, state['seeds']))}; "
             "the mean validation accuracy ranks them, the mean test accuracy is shown beside it. Supernet "
             "scores: as each preset scores candidates (its recipe, replicas and evaluation image counts).", ""]
    head = "| arch | units | MFLOPs | predicted ms | val % (seeds) | mean val | mean test |"
    rule = "|---|---:|---:|---:|---|---:|---:|"
    for p in presets:
        head += f" {p} score |"
        rule += "---:|"
    lines += [head, rule]
    for r in rows:
        vals = ", ".join(f"{v * 100:.2f}" for v in r["vals"]) or "-"
        line = (f"| `{r['arch']}` | {r['depth']} | {r['mflops']:.1f} | {r['predicted_ms']:.3f} | {vals} | "
                f"{_mean(r['vals'])} | {_mean(r['tests'])} |")
        for p in presets:
            line += f" {r['scores'][p]['accuracy'] * 100:.2f} |"
        lines.append(line)
    lines.append("")
    if a.get("seeds", 0) == 0:
        lines.append("No arch has finished a retraining yet.")
        return "\n".join(lines) + "\n"
    lines += [f"Ground truth over {a['seeds']} seed(s) per arch:", "",
              f"- the archs' mean validation accuracies span {a['truth_range'][0]:.2f}-{a['truth_range'][1]:.2f}% "
              f"(standard deviation over archs {a['truth_std_over_archs']:.2f} points)"]
    if "seed_std" in a:
        lines += [f"- seed-to-seed noise: standard deviation {a['seed_std']:.2f} points per arch, "
                  f"{a['seed_std_of_mean']:.2f} for the mean of {a['seeds']}; spread over archs / noise of the mean "
                  f"= {a['truth_std_over_archs'] / a['seed_std_of_mean']:.1f}",
                  f"- tau between the rankings of two retraining seeds: {a['tau_between_seeds']:.2f} (mean over "
                  "pairs of seeds): what one retraining can agree with another"]
    lines += [f"- tau of the ground truth against depth {a['tau_truth_depth']:.2f}, against predicted latency "
              f"{a['tau_truth_latency']:.2f}; validation against test {a['tau_val_test']:.2f}", ""]
    if presets:
        lines += ["| preset | tau (val) | tau (test) | goal | tau of -loss | tau within latency halves (pairs) | "
                  "tau score vs depth (ground truth's) | score range |", "|---|---:|---:|---|---:|---:|---:|---|"]
        for p in presets:
            s = a["presets"][p]
            goal = GOALS.get(p)
            verdict = "-" if goal is None else f">= {goal}: {'met' if s['tau'] >= goal else 'missed'}"
            lines.append(f"| {p} | **{s['tau']:.2f}** | {s['tau_test']:.2f} | {verdict} | {s['tau_loss']:.2f} | "
                         f"{s['tau_within_bins']:.2f} ({s['pairs_within_bins']}) | {s['tau_score_depth']:.2f} "
                         f"({a['tau_truth_depth']:.2f}) | {s['score_range'][0]:.1f}-{s['score_range'][1]:.1f}% |")
        lines.append("")
    for name, variant in state.get("variants", {}).items():
        changes = ", ".join(f"`{k}: {v}`" for k, v in variant["set"].items())
        lines.append(f"- `{name}` is not a shipped preset: the {variant['base']} preset with {changes}.")
    missing = [p for p in state.get("presets", []) if p not in presets]
    if missing:
        lines += ["", f"Supernets not trained yet: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def recipe_text(state: dict) -> str:
    truth = state.get("truth", {"name": TRUTH_PRESET})
    if "base" not in truth:
        return f"the {truth['name']} preset's recipe"
    changes = ", ".join(f"`{k}: {v}`" for k, v in truth["set"].items())
    return f"the {truth['base']} preset's recipe with {changes}"


def _mean(values: list[float]) -> str:
    return f"{np.mean(values) * 100:.2f}" if values else "-"


def run_logged(cmd: list[str], log: Path) -> None:
    with log.open("a") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        raise BenchError(f"exit code {done.returncode}: {' '.join(cmd[1:])} ({tail[0]}; see {log})")


if __name__ == "__main__":
    sys.exit(main())
