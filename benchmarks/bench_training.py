"""Training figures for benchmarks/results/training.md: throughput, retrained accuracy and supernet ranking quality.

    python benchmarks/bench_training.py throughput [--threads 1] [--device cuda]
        Training images/s of supernet(x, arch) against the plain network of the same arch (forward, backward and an
        SGD step), measured interleaved in one process so that both see the same machine load. The steps run as
        experiments/training.py runs them: channels_last (the recipe's), and on CUDA its autocast dtype (bf16).
    python benchmarks/bench_training.py layout [--threads 1]
        CPU training images/s with NCHW against NHWC (channels_last) tensors, plain and supernet, interleaved: why
        experiments/training.py trains channels_last on the CPU too.
    python benchmarks/bench_training.py accuracy --preset quick [--threads 2]
        Retrains the reference arch (shufflenet_v2_x0_5) with the preset's recipe; records time and accuracy.
    python benchmarks/bench_training.py ranking [--threads 1] [--retrain-seeds 3] [--no-retrain | --report |
            --rescore]
        Kendall tau between the supernet's score (BN recalibrated, validation accuracy; validation loss too) and the
        validation accuracy of the same archs retrained alone for a short equal budget (averaged over
        --retrain-seeds seeds), over archs spread over the space's FLOPs range. Every finished piece is cached under
        --work-dir (a JSON file plus resumable run directories), so rerunning the command after a kill continues
        where it stopped. Two processes may share the cache: one with --no-retrain training and scoring another
        supernet while the other retrains, or both retraining (each claims an arch, under a lock, before it starts).
        --report also prints the consensus of all cached supernets (their standardised scores averaged: what they
        agree on) and the τ of `supernet.replicas: K` for K = 2, 3, 4 (the mean score of K cached supernets of one
        recipe: seeds s to s+K-1 as one such run trains them, and every K of its seeds for the spread). The full
        preset's supernet recipe is `--supernet-sampling fair --supernet-lr 0.1 --supernet-epochs 3
        --supernet-steps 95` with --supernet-seed 0, 1, 2.
    python benchmarks/bench_training.py sharing --vary widths --lr 0.1 --steps 120
        Whether weight sharing learns: the supernet's training loss when only some dimensions of the arch are drawn
        per step (the others stay at the largest arch's), first 20 steps against the last 30.

Run the long ones in the background, e.g.
    nohup .venv/bin/python benchmarks/bench_training.py ranking --threads 1 > runs/bench_ranking.log 2>&1 &
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import fcntl
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments.checkpoints import load_supernet  # noqa: E402
from experiments.config import ExperimentConfig, fingerprint, load_experiment  # noqa: E402
from experiments.data import Splits, load_splits  # noqa: E402
from experiments.evaluate import Evaluator  # noqa: E402
from experiments.training import retrain, train_supernet  # noqa: E402
from search_space import Arch, SearchSpace, Supernet  # noqa: E402
from search_space.files import atomic_write  # noqa: E402

CONFIG = ROOT / "experiments" / "fashion_mnist.yaml"


def speed_archs(space: SearchSpace) -> list[tuple[str, Arch]]:
    """The five archs the speed comparisons time: both ends of the space, the x0.5 reference, two random ones."""
    rng = np.random.default_rng(0)
    return [("smallest", space.smallest()), ("reference x0.5", space.reference("shufflenet_v2_x0_5")),
            ("random 1", space.sample(rng)), ("random 2", space.sample(rng)), ("largest", space.largest())]


def throughput(args: argparse.Namespace) -> None:
    """Median training images/s, plain vs supernet, alternating blocks of steps for each arch."""
    cfg = load_experiment(CONFIG, "quick")
    space = SearchSpace.from_yaml(cfg.space)
    archs = speed_archs(space)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    # As experiments/training.py trains: the supernet recipe's memory format, and on CUDA its autocast dtype.
    recipe = cfg.supernet
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.amp) if cuda else None
    fmt = torch.channels_last if recipe.channels_last else torch.contiguous_format
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    def sync() -> None:  # CUDA runs asynchronously: the clock is read only once the queued steps have finished
        if cuda:
            torch.cuda.synchronize(device)

    torch.manual_seed(0)
    supernet = Supernet(space, 10)
    g = space.geometry
    x = torch.randn(args.batch_size, g.in_channels, g.input_size, g.input_size)
    y = torch.randint(0, 10, (args.batch_size,))
    supernet = supernet.to(device=device, memory_format=fmt)
    x, y = x.to(device).contiguous(memory_format=fmt), y.to(device)
    if cuda:
        print(f"device {device} ({torch.cuda.get_device_name(device)}), autocast {recipe.amp}", flush=True)
    print(f"channels_last {recipe.channels_last}", flush=True)
    print(f"threads {torch.get_num_threads()}, batch {args.batch_size}, {args.steps} steps per block, "
          f"{args.repeats} blocks each, interleaved", flush=True)
    print("| arch | MFLOPs | plain img/s | supernet img/s | supernet / plain |")
    print("|---|---:|---:|---:|---:|")
    for label, arch in archs:
        plain = space.build(arch, 10).to(device=device, memory_format=fmt)
        runs = {
            "plain": (lambda plain=plain: plain(x), torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)),
            "supernet": (lambda arch=arch: supernet(x, arch),
                         torch.optim.SGD(supernet.parameters(), lr=0.01, momentum=0.9)),
        }
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for block in range(args.repeats + 1):  # block 0 warms up
            order = list(runs) if block % 2 == 0 else list(reversed(runs))
            for name in order:
                forward, optimizer = runs[name]
                sync()
                start = time.perf_counter()
                for _ in range(args.steps):
                    optimizer.zero_grad(set_to_none=True)
                    with autocast():
                        logits = forward()
                    scaler.scale(F.cross_entropy(logits.float(), y)).backward()
                    scaler.step(optimizer)
                    scaler.update()
                sync()
                if block:
                    rates[name].append(args.steps * args.batch_size / (time.perf_counter() - start))
        p, s = statistics.median(rates["plain"]), statistics.median(rates["supernet"])
        print(f"| {label} | {space.cost(arch, 10).mflops:.1f} | {p:.0f} | {s:.0f} | {s / p:.2f} |", flush=True)


def layout(args: argparse.Namespace) -> None:
    """CPU training images/s in NCHW (contiguous) against NHWC (channels_last), interleaved, plain and supernet."""
    cfg = load_experiment(CONFIG, "quick")
    space = SearchSpace.from_yaml(cfg.space)
    archs = speed_archs(space)
    g = space.geometry
    x = torch.randn(args.batch_size, g.in_channels, g.input_size, g.input_size)
    y = torch.randint(0, 10, (args.batch_size,))
    torch.manual_seed(0)
    supernets = {"nchw": Supernet(space, 10)}
    supernets["nhwc"] = copy.deepcopy(supernets["nchw"]).to(memory_format=torch.channels_last)
    inputs = {"nchw": x, "nhwc": x.contiguous(memory_format=torch.channels_last)}
    print(f"threads {torch.get_num_threads()}, batch {args.batch_size}, {args.steps} steps per block, "
          f"{args.repeats} blocks each, interleaved", flush=True)
    print("| arch | MFLOPs | plain NCHW img/s | plain NHWC img/s | NHWC / NCHW | supernet NCHW | supernet NHWC | "
          "NHWC / NCHW |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, arch in archs:
        plain = space.build(arch, 10)
        plains = {"nchw": plain, "nhwc": copy.deepcopy(plain).to(memory_format=torch.channels_last)}
        runs = {}
        for fmt in ("nchw", "nhwc"):
            runs[f"plain {fmt}"] = (lambda m=plains[fmt], f=fmt: m(inputs[f]), plains[fmt])
            runs[f"supernet {fmt}"] = (lambda f=fmt, a=arch: supernets[f](inputs[f], a), supernets[fmt])
        optimizers = {name: torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
                      for name, (_, model) in runs.items()}
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for block in range(args.repeats + 1):  # block 0 warms up
            order = list(runs) if block % 2 == 0 else list(reversed(runs))
            for name in order:
                forward, _ = runs[name]
                start = time.perf_counter()
                for _ in range(args.steps):
                    optimizers[name].zero_grad(set_to_none=True)
                    F.cross_entropy(forward(), y).backward()
                    optimizers[name].step()
                if block:
                    rates[name].append(args.steps * args.batch_size / (time.perf_counter() - start))
        r = {name: statistics.median(v) for name, v in rates.items()}
        print(f"| {label} | {space.cost(arch, 10).mflops:.1f} | {r['plain nchw']:.0f} | {r['plain nhwc']:.0f} | "
              f"{r['plain nhwc'] / r['plain nchw']:.2f} | {r['supernet nchw']:.0f} | {r['supernet nhwc']:.0f} | "
              f"{r['supernet nhwc'] / r['supernet nchw']:.2f} |", flush=True)


def accuracy(args: argparse.Namespace) -> None:
    """Retrain the reference arch with a preset; print time and accuracies."""
    cfg = load_experiment(CONFIG, args.preset)
    space = SearchSpace.from_yaml(cfg.space)
    splits = load_splits(cfg.data, cfg.seed)
    arch = space.reference("shufflenet_v2_x0_5")
    run_dir = Path(args.work_dir) / f"accuracy_{args.preset}"
    start = time.perf_counter()
    result = retrain(space, arch, splits, cfg, run_dir, progress=not args.no_progress)
    wall = time.perf_counter() - start
    print(f"preset {args.preset}: {cfg.retrain.epochs} epochs, threads {torch.get_num_threads()}: "
          f"val {result.val_accuracy:.4f} test {result.test_accuracy:.4f}, training {result.seconds / 60:.1f} min "
          f"(this call {wall / 60:.1f} min), {result.history[-1].images_per_s:.0f} img/s")
    for h in result.history:
        print(f"  epoch {h.epoch}: loss {h.loss:.4f} train acc {h.accuracy:.4f} val {h.val_accuracy:.4f} "
              f"{h.seconds:.0f} s")


def sharing(args: argparse.Namespace) -> None:
    """Does weight sharing learn? Training loss of the supernet when only some dimensions vary per step."""
    cfg = load_experiment(CONFIG, "quick")
    splits = load_splits(cfg.data, cfg.seed)
    space = SearchSpace.from_yaml(cfg.space)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    supernet = Supernet(space, splits.num_classes).train()
    opt = torch.optim.SGD(supernet.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-5)
    largest = space.largest().to_dict()

    def pick() -> Arch:
        sample = space.sample(rng)
        if args.vary == "nothing":
            return space.largest()
        if args.vary == "everything":
            return sample
        data = largest if args.vary in ("widths", "splits") else sample.to_dict()
        data = copy.deepcopy(data)
        for stage, drawn in zip(data["stages"], sample.to_dict()["stages"], strict=True):
            if args.vary == "widths":
                stage["width"] = drawn["width"]
            for j, unit in enumerate(stage["units"]):
                if args.vary == "splits":
                    unit["split"] = drawn["units"][j % len(drawn["units"])]["split"]
                elif args.vary == "all-but-splits":
                    unit["split"] = 0.5
        return Arch.from_dict(data)

    channels = splits.in_channels
    mean = torch.tensor(splits.mean).view(1, channels, 1, 1)
    std = torch.tensor(splits.std).view(1, channels, 1, 1)
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        index = torch.from_numpy(rng.integers(0, len(splits.train), args.batch_size))
        images, labels = splits.train.load(index, augment=False, generator=torch.Generator().manual_seed(step))
        x = (images.float() / 255 - mean) / std
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 20)  # 20 warm-up steps
        loss = F.cross_entropy(supernet(x, pick()), labels, label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"vary {args.vary}, lr {args.lr}, {args.steps} steps: loss of the first 20 {np.mean(losses[:20]):.3f}, "
          f"of the last 30 {np.mean(losses[-30:]):.3f} ({time.perf_counter() - start:.0f} s)")


def spread_archs(space: SearchSpace, count: int, seed: int, pool: int = 2000) -> list[Arch]:
    """`count` archs at evenly spaced FLOPs quantiles of `pool` uniform samples: small to large, all typical."""
    rng = np.random.default_rng(seed)
    samples = sorted((space.sample(rng) for _ in range(pool)), key=lambda a: space.cost(a, 10).macs)
    return [samples[int((i + 0.5) / count * pool)] for i in range(count)]


class RankingCache:
    """The ranking benchmark's cache, WORK/ranking/ranking.json: the setup, every arch's retrainings and every
    supernet's scores.

    Two processes may share it (one retraining, one scoring another supernet): each adds what the other has written
    since to its own copy, under a lock, so neither loses the other's results.
    """

    def __init__(self, work: Path, default_seed: int) -> None:
        self.path, self.lock = work / "ranking.json", work / "ranking.lock"
        self.default_seed = default_seed
        self.data: dict = json.loads(self.path.read_text()) if self.path.exists() else {}
        self._upgrade()

    @property
    def rows(self) -> dict:
        """arch code -> {"mflops", "retrains": {seed: {"val", "test", "seconds"}}}"""
        return self.data.setdefault("archs", {})

    @property
    def supernets(self) -> dict:
        """label -> {"recipe", "scores": {arch code: {"val", "loss", "seconds"}}, "training", "results"}"""
        return self.data.setdefault("supernets", {})

    def check_setup(self, setup: dict) -> None:
        """Refuse a cache made with another setup (its figures would not compare); record `setup` in a new one."""
        if self.data.get("setup", setup) != setup:
            raise SystemExit(f"error: {self.path} was made with {self.data['setup']}, not {setup}; use another "
                             f"--work-dir")
        self.data["setup"] = setup

    def save(self) -> None:
        self._sync(write=True)

    def refresh(self) -> None:
        """Take in what another process has written since."""
        self._sync(write=False)

    def _sync(self, *, write: bool) -> None:
        with open(self.lock, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.exists():
                _fill(self.data, json.loads(self.path.read_text()))
            self._upgrade()
            if write:
                atomic_write(self.path, lambda f: f.write(json.dumps(self.data, indent=1) + "\n"))

    def _upgrade(self) -> None:
        # A cache of the single-seed layout keeps one retraining per arch, with the config's seed, at the top level
        # of its row: it becomes that seed's entry.
        for row in self.data.get("archs", {}).values():
            if "retrain_val" in row:
                row.setdefault("retrains", {}).setdefault(str(self.default_seed), {
                    "val": row.pop("retrain_val"), "test": row.pop("retrain_test"),
                    "seconds": row.pop("retrain_seconds")})


def _fill(mine: dict, theirs: dict) -> None:
    """Add to `mine`, in place, what only `theirs` has; where both have a value, mine stays."""
    for key, value in theirs.items():
        if key not in mine:
            mine[key] = value
        elif isinstance(mine[key], dict) and isinstance(value, dict):
            _fill(mine[key], value)


def ranking_config(args: argparse.Namespace) -> tuple[ExperimentConfig, dict]:
    """The preset with the command line's supernet overrides (returned too, for the log), augmentation as asked and
    scoring pinned (not taken from the preset) so that every cached run of this benchmark is comparable."""
    cfg = load_experiment(CONFIG, args.preset)
    overrides = {k: v for k, v in {"lr": args.supernet_lr, "epochs": args.supernet_epochs,
                                   "max_steps_per_epoch": args.supernet_steps,
                                   "sampling": args.supernet_sampling, "ema_decay": args.supernet_ema}.items()
                 if v is not None}
    cfg = dataclasses.replace(cfg, supernet=dataclasses.replace(cfg.supernet, **overrides),
                              evaluate=dataclasses.replace(cfg.evaluate, val_images=None, bn_calibration_images=2000),
                              data=dataclasses.replace(cfg.data, augment=args.augment == "on"))
    return cfg, overrides


@dataclasses.dataclass
class RankingStudy:
    """The archs to rank, the retraining seeds whose mean accuracy is the ground truth, and the cache."""

    cfg: ExperimentConfig
    space: SearchSpace
    splits: Splits
    archs: list[Arch]
    seeds: list[int]
    work: Path
    cache: RankingCache

    @property
    def rows(self) -> dict:
        return self.cache.rows

    def truth(self) -> list[float]:
        """Each arch's validation accuracy averaged over the retraining seeds (the ground truth)."""
        return [statistics.fmean(self.rows[a.encode()]["retrains"][str(seed)]["val"] for seed in self.seeds)
                for a in self.archs]

    def agreement(self, scores: dict) -> dict | None:
        """Kendall tau (and friends) of supernet `scores` against the retrained accuracies; None while incomplete."""
        from scipy.stats import kendalltau, spearmanr

        archs, seeds, rows = self.archs, self.seeds, self.rows
        if any(a.encode() not in scores or str(seed) not in rows.get(a.encode(), {}).get("retrains", {})
               for a in archs for seed in seeds):
            return None
        # The ground truth is each arch's validation accuracy averaged over the retraining seeds: one 400-step
        # retraining moves by about as much as neighbouring archs differ, so a single seed caps the tau it can show.
        runs = [[rows[a.encode()]["retrains"][str(seed)] for seed in seeds] for a in archs]
        sn = [scores[a.encode()]["val"] for a in archs]
        # The validation loss of the same pass, negated so that higher is better (scores cached before it have none)
        sn_loss = [-scores[a.encode()].get("loss", math.nan) for a in archs]
        rt = self.truth()
        rt_test = [statistics.fmean(r["test"] for r in arch_runs) for arch_runs in runs]
        fl = [rows[a.encode()]["mflops"] for a in archs]
        result = {
            "retrain_seeds": seeds,
            "kendall_tau": float(kendalltau(sn, rt).statistic),
            "spearman": float(spearmanr(sn, rt).statistic),
            # The same ranking against the retrained test accuracy (10,000 images, not the 5,000 the supernet is
            # scored on), and how well the ground truth agrees with itself: its ceiling for tau.
            "kendall_tau_vs_retrained_test": float(kendalltau(sn, rt_test).statistic),
            "kendall_tau_retrained_val_vs_test": float(kendalltau(rt, rt_test).statistic),
            "kendall_tau_flops_vs_retrain": float(kendalltau(fl, rt).statistic),
            "kendall_tau_flops_vs_supernet": float(kendalltau(fl, sn).statistic),
            # Ranking by the supernet's validation loss instead of its accuracy (the same images and pass).
            "kendall_tau_loss": float(kendalltau(sn_loss, rt).statistic),
            "kendall_tau_loss_vs_retrained_test": float(kendalltau(sn_loss, rt_test).statistic),
        }
        for k, seed in enumerate(seeds):
            result[f"kendall_tau_vs_seed{seed}_val"] = float(kendalltau(sn, [r[k]["val"] for r in runs]).statistic)
        for k in range(1, len(seeds)):  # how much one retraining's ranking moves with its seed
            result[f"kendall_tau_seed{seeds[k - 1]}_vs_seed{seeds[k]}_val"] = float(
                kendalltau([r[k - 1]["val"] for r in runs], [r[k]["val"] for r in runs]).statistic)
        return result

    def score(self, entry: dict, evaluator: Evaluator, arch: Arch) -> dict:
        """Score `arch` into the supernet's cache `entry` and save it."""
        record = evaluator.score(arch)
        entry["scores"][arch.encode()] = {"val": record.accuracy, "loss": record.loss, "seconds": record.seconds}
        self.cache.save()
        return entry["scores"][arch.encode()]

    def rescore(self) -> None:
        """Score again, from their checkpoints, the cached supernets whose scores lack the loss."""
        for label, entry in list(self.cache.supernets.items()):  # save() may add others
            missing = [a for a in self.archs if "loss" not in entry["scores"].get(a.encode(), {})]
            checkpoint = self.work / f"supernet-{label}" / "supernet.pt"
            if not missing or not checkpoint.exists():
                continue
            evaluator = Evaluator(load_supernet(checkpoint), self.splits, self.cfg.evaluate, seed=self.cfg.seed)
            for arch in missing:
                self.score(entry, evaluator, arch)
            print(f"rescored {len(missing)} archs of supernet {label}", flush=True)

    def report(self) -> None:
        """Every cached supernet against the ground truth, their mean and consensus, and the replica groups."""
        from scipy.stats import kendalltau

        print(f"ground truth: validation accuracy averaged over seeds {self.seeds}, {len(self.archs)} archs")
        print("| supernet | sampling | steps | EMA | seed | minutes | scores | Kendall τ | Spearman ρ | τ vs test "
              "| τ by loss |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        taus: dict[str, list[float]] = {"kendall_tau": [], "kendall_tau_loss": []}
        standardized: dict[str, list[np.ndarray]] = {"val": [], "loss": []}  # each supernet's z-scores over the archs
        for label, entry in list(self.cache.supernets.items()):
            result = self.agreement(entry["scores"])
            if result is None:
                print(f"| {label} | (not scored on every arch, or the ground truth is incomplete) |")
                continue
            recipe, training = entry["recipe"], entry.get("training", {})
            vals = [entry["scores"][a.encode()]["val"] for a in self.archs]
            for key, values in taus.items():
                values.append(result[key])
            for key, sign in (("val", 1), ("loss", -1)):
                z = np.array([sign * entry["scores"][a.encode()][key] for a in self.archs])
                standardized[key].append((z - z.mean()) / z.std())
            print(f"| {label} | {recipe['sampling']} | {training.get('steps', '?')} | {recipe.get('ema_decay') or '-'} "
                  f"| {recipe.get('seed', self.cfg.seed)} "
                  f"| {training.get('minutes', float('nan')):.1f} | {min(vals):.1%}-{max(vals):.1%} "
                  f"| {result['kendall_tau']:.2f} | {result['spearman']:.2f} "
                  f"| {result['kendall_tau_vs_retrained_test']:.2f} | {result['kendall_tau_loss']:.2f} |")
        if not taus["kendall_tau"]:
            return
        pairs = list(zip(taus["kendall_tau"], taus["kendall_tau_loss"], strict=True))
        print(f"mean over {len(pairs)} supernets: τ {statistics.fmean(taus['kendall_tau']):.2f} by accuracy, "
              f"{statistics.fmean(taus['kendall_tau_loss']):.2f} by loss (loss higher in "
              f"{sum(b > a for a, b in pairs)}, lower in {sum(b < a for a, b in pairs)})")
        # What all of them agree on: if averaging away their differences does not rank better than one of them,
        # what keeps tau low is a bias they share, not the noise of one training run.
        truth = self.truth()
        consensus = {key: float(kendalltau(np.mean(z, axis=0), truth).statistic) for key, z in standardized.items()}
        print(f"consensus of the {len(pairs)} supernets (their standardised scores averaged): τ "
              f"{consensus['val']:.2f} by accuracy, {consensus['loss']:.2f} by loss")
        self.replica_groups(truth)

    def _taus_of_mean(self, group: list[dict], truth: list[float]) -> tuple[float, float]:
        """τ by accuracy and by loss of the mean score of the cached supernets `group` (what K replicas give)."""
        from scipy.stats import kendalltau

        val = [statistics.fmean(e["scores"][a.encode()]["val"] for e in group) for a in self.archs]
        loss = [-statistics.fmean(e["scores"][a.encode()]["loss"] for e in group) for a in self.archs]
        return float(kendalltau(val, truth).statistic), float(kendalltau(loss, truth).statistic)

    def replica_groups(self, truth: list[float], sizes: tuple[int, ...] = (2, 3, 4)) -> None:
        """τ of `supernet.replicas: K`, from cached supernets of one recipe: the mean score of the supernets with
        seeds s, s+1, ..., s+K-1 (s a multiple of K, so that the groups are disjoint) is what the Evaluator computes
        from K replicas with seed s (the same calibration and validation images). Beside those exact runs, every
        K of the recipe's n seeds (n choose K groups, overlapping) gives the spread to expect."""
        by_recipe: dict[str, dict[int, dict]] = {}
        for entry in self.cache.supernets.values():
            if self.agreement(entry["scores"]) is None:
                continue
            recipe = {k: v for k, v in entry["recipe"].items() if k != "seed"}
            key = json.dumps(recipe, sort_keys=True)
            by_recipe.setdefault(key, {})[entry["recipe"].get("seed", self.cfg.seed)] = entry
        for size in sizes:
            exact, spread = [], []
            for key, entries in by_recipe.items():
                if len(entries) < size:
                    continue
                recipe, first = json.loads(key), next(iter(entries.values()))
                name = (recipe["sampling"], first.get("training", {}).get("steps", "?"), recipe.get("ema_decay") or "-")
                for s in sorted(entries):
                    block = [s + k for k in range(size)]
                    if s % size == 0 and all(seed in entries for seed in block):
                        exact.append((*name, ", ".join(map(str, block)),
                                      *self._taus_of_mean([entries[seed] for seed in block], truth)))
                every = [self._taus_of_mean([entries[seed] for seed in group], truth)[0]
                         for group in itertools.combinations(sorted(entries), size)]
                spread.append((*name, len(entries), len(every), statistics.fmean(every), min(every),
                               sum(t >= 0.6 - 1e-9 for t in every) / len(every)))
            _print_replica_tables(size, exact, spread)

    def train_and_score(self, supernet_seed: int | None, overrides: dict) -> dict:
        """Train the supernet of the recipe (resumable) and score every arch with it; returns its cache entry.

        Retraining results do not depend on the supernet; supernet scores are kept per supernet recipe. The config's
        seed keeps the label of a recipe alone; another seed joins the recipe.
        """
        cfg, splits = self.cfg, self.splits
        recipe = cfg.supernet.identity()
        supernet_seed = cfg.seed if supernet_seed is None else supernet_seed
        if supernet_seed != cfg.seed:
            recipe["seed"] = supernet_seed
        label = fingerprint(recipe)
        entry = self.cache.supernets.setdefault(label, {"recipe": recipe, "scores": {}})
        torch.manual_seed(supernet_seed)
        supernet = Supernet(self.space, splits.num_classes)
        history = train_supernet(supernet, splits, cfg, self.work / f"supernet-{label}", seed=supernet_seed,
                                 progress=False)
        images = sum(h.images_per_s * h.seconds for h in history)
        entry["training"] = {"steps": round(images / cfg.supernet.batch_size),
                             "minutes": sum(h.seconds for h in history) / 60, "last_loss": history[-1].loss,
                             "last_train_accuracy": history[-1].accuracy}
        self.cache.save()
        print(f"supernet {label} ({overrides or 'preset'}): {len(history)} epochs, "
              f"{entry['training']['minutes']:.1f} min of training, last loss {history[-1].loss:.3f}", flush=True)
        evaluator = Evaluator(supernet.eval(), splits, cfg.evaluate, seed=cfg.seed)
        for arch in self.archs:
            code = arch.encode()
            self.rows.setdefault(code, {"mflops": self.space.cost(arch, 10).mflops})
            if "loss" not in entry["scores"].get(code, {}):
                scored = self.score(entry, evaluator, arch)
                print(f"supernet {scored['val']:.4f} loss {scored['loss']:.4f} ({scored['seconds']:.1f} s) "
                      f"{self.rows[code]['mflops']:5.1f} MFLOPs {code}", flush=True)
        return entry

    def retrain_all(self, cfg_short: ExperimentConfig) -> None:
        """Retrain every arch with every seed not in the cache yet (the ground truth), with the short recipe.

        Two processes retraining at once take turns by arch: each claims one under a lock and skips what the other
        holds.
        """
        for seed in self.seeds:
            for i, arch in enumerate(self.archs):
                row = self.rows[arch.encode()]
                if str(seed) in row.get("retrains", {}):
                    continue
                # cfg.seed's run directories carry no seed suffix (as caches of the single-seed layout name them)
                run_dir = self.work / (f"retrain_{i:02d}" if seed == self.cfg.seed else f"retrain_{i:02d}_seed{seed}")
                with open(self.work / f"{run_dir.name}.lock", "w") as claim:
                    try:
                        fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                    self.cache.refresh()  # picks up what another process has retrained meanwhile
                    if str(seed) in row.get("retrains", {}):
                        continue
                    result = retrain(self.space, arch, self.splits, cfg_short, run_dir, seed=seed, progress=False)
                    row.setdefault("retrains", {})[str(seed)] = {
                        "val": result.val_accuracy, "test": result.test_accuracy, "seconds": result.seconds}
                    self.cache.save()  # before the claim is let go
                print(f"retrain seed {seed} {result.val_accuracy:.4f} ({result.seconds / 60:.1f} min) "
                      f"{row['mflops']:5.1f} MFLOPs {arch.encode()}", flush=True)

    def print_result(self, entry: dict, result: dict) -> None:
        """One supernet's scores beside the retrained accuracies, arch by arch, then its agreement figures."""
        seeds = self.seeds
        print("| # | MFLOPs | supernet val | retrained val (mean) | " + " | ".join(f"seed {s}" for s in seeds)
              + " | retrained test (mean) | arch |")
        print("|---:|---:|---:|---:|" + "---:|" * len(seeds) + "---:|---|")
        for i, arch in enumerate(self.archs):
            row = self.rows[arch.encode()]
            runs = [row["retrains"][str(seed)] for seed in seeds]
            print(f"| {i} | {row['mflops']:.1f} | {entry['scores'][arch.encode()]['val']:.4f} "
                  f"| {statistics.fmean(r['val'] for r in runs):.4f} | "
                  + " | ".join(f"{r['val']:.4f}" for r in runs)
                  + f" | {statistics.fmean(r['test'] for r in runs):.4f} | `{arch.encode()}` |")
        for key, value in result.items():
            if key != "retrain_seeds":
                print(f"{key}: {value:.3f}")


def _print_replica_tables(size: int, exact: list[tuple], spread: list[tuple]) -> None:
    if exact:
        print(f"\nreplicas: {size} ({size} supernets of one recipe, seeds s to s+{size - 1}, scored by their mean)")
        print("| sampling | steps | EMA | seeds | Kendall τ | τ by loss |")
        print("|---|---:|---:|---|---:|---:|")
        for sampling, steps, ema, seeds, tau, tau_loss in exact:
            print(f"| {sampling} | {steps} | {ema} | {seeds} | {tau:.2f} | {tau_loss:.2f} |")
    if spread:
        print(f"\nreplicas: {size}, every {size} of a recipe's seeds (overlapping groups), by accuracy")
        print("| sampling | steps | EMA | seeds | groups | mean τ | lowest τ | share τ >= 0.6 |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for sampling, steps, ema, n, groups, mean, low, share in spread:
            print(f"| {sampling} | {steps} | {ema} | {n} | {groups} | {mean:.2f} | {low:.2f} | {share:.0%} |")


def ranking(args: argparse.Namespace) -> None:
    cfg, overrides = ranking_config(args)
    work = Path(args.work_dir) / "ranking"
    work.mkdir(parents=True, exist_ok=True)
    cache = RankingCache(work, cfg.seed)
    cache.check_setup({"preset": args.preset, "archs": args.archs, "retrain_steps": args.retrain_steps,
                       "augment": args.augment})
    space = SearchSpace.from_yaml(cfg.space)
    study = RankingStudy(cfg=cfg, space=space, splits=load_splits(cfg.data, cfg.seed),
                         archs=spread_archs(space, args.archs, seed=123),
                         seeds=[cfg.seed + k for k in range(args.retrain_seeds)], work=work, cache=cache)
    if args.rescore:  # cached supernets scored before the loss was recorded
        study.rescore()
    if args.report or args.rescore:  # every cached supernet against the ground truth; nothing is trained
        study.report()
        return
    start = time.perf_counter()
    entry = study.train_and_score(args.supernet_seed, overrides)
    if not args.no_retrain:
        short = dataclasses.replace(cfg.retrain, epochs=1, max_steps_per_epoch=args.retrain_steps)
        study.retrain_all(dataclasses.replace(cfg, retrain=short))
    cache.refresh()
    result = study.agreement(entry["scores"])
    if result is None:
        print(f"scored; the ground truth for seeds {study.seeds} is not complete yet: run again without --no-retrain")
        return
    entry.setdefault("results", {})[",".join(map(str, study.seeds))] = result
    cache.save()
    print(f"(this call {(time.perf_counter() - start) / 60:.1f} min)")
    study.print_result(entry, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["throughput", "layout", "accuracy", "ranking", "sharing"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--device", default="cpu", help="throughput: cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--preset", default="quick", help="fashion_mnist preset for accuracy and ranking")
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "bench_training"), help="run directories, cache")
    parser.add_argument("--batch-size", type=int, default=128, help="throughput: images per step")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block (sharing: in all)")
    parser.add_argument("--repeats", type=int, default=5, help="throughput, layout: timed blocks per variant")
    parser.add_argument("--archs", type=int, default=10, help="ranking: number of archs")
    parser.add_argument("--retrain-steps", type=int, default=400, help="ranking: steps of the short retraining")
    parser.add_argument("--retrain-seeds", type=int, default=3,
                        help="ranking: retrainings per arch (seeds cfg.seed, cfg.seed+1, ...), averaged")
    parser.add_argument("--report", action="store_true",
                        help="ranking: tau of every cached supernet against the ground truth; trains nothing")
    parser.add_argument("--rescore", action="store_true",
                        help="ranking: score cached supernets whose scores lack the loss (from their checkpoints), "
                             "then --report")
    parser.add_argument("--no-retrain", action="store_true",
                        help="ranking: only train and score the supernet (another process retrains)")
    parser.add_argument("--augment", choices=["on", "off"], default="on", help="ranking: training augmentation")
    parser.add_argument("--supernet-lr", type=float, default=None, help="ranking: override the preset's supernet lr")
    parser.add_argument("--supernet-epochs", type=int, default=None, help="ranking: override supernet epochs")
    parser.add_argument("--supernet-steps", type=int, default=None, help="ranking: override max steps per epoch")
    parser.add_argument("--supernet-ema", type=float, default=None,
                        help="ranking: score with an average of the supernet's weights of this decay (ema_decay)")
    parser.add_argument("--supernet-seed", type=int, default=None,
                        help="ranking: seed of the supernet's weights, loader and sampler (default: the config's)")
    parser.add_argument("--supernet-sampling", choices=["uniform", "sandwich", "fair"], default=None,
                        help="ranking: override the supernet's sampling rule")
    parser.add_argument("--vary", default="everything",
                        choices=["nothing", "widths", "splits", "all-but-splits", "everything"],
                        help="sharing: what is drawn at random per step (the rest: the largest arch's)")
    parser.add_argument("--lr", type=float, default=0.1, help="sharing: peak learning rate")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"throughput": throughput, "layout": layout, "accuracy": accuracy, "ranking": ranking,
     "sharing": sharing}[args.what](args)


if __name__ == "__main__":
    main()
