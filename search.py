"""From a latency budget to a trained, exported ShuffleNet V2 that really meets it on the device, with the evidence.

    python search.py --target-ms 10 --device cuda
    python search.py --target-ms shufflenet_v2_x0_5 --device cpu --preset quick      # as fast as x0.5, measured now
    python search.py --target-ms 0.3,0.4,0.5 --device cpu                             # a family: winners per budget

Steps, each resumable: rerun the same command after a kill, and every step whose artifact is there and current (a
measurement: taken on this machine) is loaded, not redone:
  lut        the device's latency table for the runtime, shared by every run on this machine (in the cache folder)
  target     a budget relative to a reference arch: that arch exported and measured now, on the device
  check      every budget is met by at least one arch of the space (else: one line naming the fastest)
  supernet   the weight-sharing supernet(s), trained once per space, data, recipe and seed in the shared store
  calibrate  a few archs near each budget are exported and timed now; the table's predictions are rescaled by the
             lowest measured / predicted ratio
  search     Optuna or Ray Tune, constrained by the table; candidates scored with inherited weights
  ship       the best candidates, in order, are exported and their shipped file measured; over the budget: not
             shipped, the next one is taken; the shipped ones are retrained, exported into a staging folder, their
             shipped file measured again, and only then moved into winners/
  report     report.md, pareto.png, trials.csv in the run directory

Data-parallel: under `torchrun --nproc_per_node N search.py ...` the supernet(s) and the winners' retraining run on
N processes (DDP); rank 0 alone does every other step, and tells the others what to train (see `follow`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, TypeVar

# Idle OpenMP threads sleep instead of spinning: with spinning, two threads on two cores that another process also
# uses ran training 10x slower here (20 vs 200 images/s). Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from experiments.steps import MachineFile, Pipeline, Step  # noqa: E402

if TYPE_CHECKING:
    from experiments.distributed import Crew, DistContext

CONFIGS = Path(__file__).resolve().parent / "experiments"
DEFAULT_CONFIG = CONFIGS / "fashion_mnist.yaml"
CALIBRATION_ARCHS = 60  # archs measured end to end to fit a new table's correction (half of them; the rest check it)
MAX_SEARCH_ROUNDS = 3  # a search rerun with a tighter table target when no candidate measures under the budget
VERDICT_TRIES = 3  # measurements at most before a candidate is called over the budget
RETRY_BAND = 1.6  # ... when the first one is over it by less than this factor
FAMILY_TRIALS = 1.5  # a family of budgets searches once, with this many times the trials of one budget
CALIBRATE_WINDOW = 0.25  # an arch measured before calibrates for a budget when predicted within this share of it
MEASURE_BUDGET = None  # None: latency_lut.FILE_BUDGET (hundreds of calls per measurement); tests shrink it
RUN_FILE = "run.json"
T = TypeVar("T")


class UsageError(ValueError):
    """Bad input: reported as one line on stderr with exit code 2."""


# ---- the job: what the user asked for, typed ------------------------------------------------------------------------


_TARGET = re.compile(r"^(?:(?P<ms>\d+(?:\.\d*)?|\.\d+)(?:ms)?|(?:(?P<factor>\d+(?:\.\d*)?|\.\d+)\s*[x*]\s*)?"
                     r"(?P<reference>[A-Za-z_]\w*))$")


@dataclass(frozen=True)
class Target:
    """One latency budget: milliseconds, or a multiple of a reference arch's latency as measured in the run."""

    ms: float | None = None
    factor: float = 1.0
    reference: str | None = None

    @property
    def label(self) -> str:
        if self.reference is None:
            return f"{self.ms:g}ms"
        return self.reference if self.factor == 1.0 else f"{self.factor:g}x{self.reference}"


def parse_targets(text: str) -> tuple[Target, ...]:
    """`8`, `8ms`, `shufflenet_v2_x0_5`, `0.75xshufflenet_v2_x0_5`, or several of them, comma-separated, ascending.

    Raises:
        UsageError: an empty list, an item that is neither, a budget that is not positive, or an unsorted list.
    """
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise UsageError(f"--target-ms {text!r}: expected milliseconds or a reference arch, comma-separated")
    targets = []
    for item in items:
        m = _TARGET.match(item)
        if m is None:
            raise UsageError(f"--target-ms {item!r}: expected milliseconds (8, 8ms) or a reference arch "
                             f"(shufflenet_v2_x0_5, 0.75xshufflenet_v2_x0_5)")
        if m["ms"] is not None:
            target = Target(ms=float(m["ms"]))
        else:
            target = Target(factor=float(m["factor"] or 1.0), reference=m["reference"])
        if not (target.ms or target.factor) > 0:
            raise UsageError(f"--target-ms {item!r}: a budget must be positive")
        targets.append(target)
    kinds = {t.reference for t in targets}
    if len(kinds) > 1:
        raise UsageError(f"--target-ms {text!r}: give every budget in milliseconds, or every one relative to the same "
                         f"reference")
    values = [t.ms if t.reference is None else t.factor for t in targets]
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise UsageError(f"--target-ms {text!r}: list the budgets in ascending order, each once")
    return tuple(targets)


@dataclass(frozen=True)
class Job:
    """Everything a run needs from the command line; the argparse namespace ends here (see `job_from_args`)."""

    targets: tuple[Target, ...]
    config: Path
    preset: str
    device: str | None
    runtime: str | None
    statistic: str | None
    search: dict[str, Any]  # overrides of the config's search section (searcher, sampler, trials, ...)
    run_dir: Path | None
    storage: str | None
    ray_address: str | None
    lut: Path | None
    allow_lut_mismatch: bool
    seed: int | None
    threads: int | None
    supernets: tuple[Path, ...]  # trained supernets to use (one per replica); empty: the shared store
    supernet_store: Path | None
    compare_references: str | None = None  # None: off; "": the budgets' reference; else comma-separated names
    argv: tuple[str, ...] = ()

    @property
    def target_text(self) -> str:
        return ",".join(t.label for t in self.targets)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python search.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--target-ms", required=True,
                   help="latency budget per batch on the device, in the run's runtime and statistic: milliseconds "
                        "(8), a reference arch of the space measured now (shufflenet_v2_x0_5; also smallest, "
                        "largest), or a multiple of one (0.75xshufflenet_v2_x0_5); several, comma-separated and "
                        "ascending, give one family of winners per budget (0.3,0.4,0.5)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the config's device)")
    p.add_argument("--runtime", choices=("onnxruntime", "eager", "cudagraph", "ort-cuda", "ort-tensorrt"), default=None,
                   help="what runs the shipped model, and so what latency means: onnxruntime (model.onnx; the "
                        "default on cpu) or eager (PyTorch, model.pt2; the default on cuda); on cuda also cudagraph "
                        "(model.pt2 captured as a CUDA graph), ort-cuda or ort-tensorrt (model.onnx on ONNX "
                        "Runtime's CUDA or TensorRT provider: onnxruntime-gpu)")
    p.add_argument("--statistic", choices=("p50", "p90", "p99"), default=None,
                   help="what the budget promises: a percentile over every call of a measurement (default: the "
                        "config's, p50)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML (default: the fashion_mnist one)")
    p.add_argument("--preset", default="quick", help="preset of the experiment file: quick (minutes) or full")
    p.add_argument("--searcher", choices=("optuna", "ray"), default=None, help="search driver (default: config's)")
    p.add_argument("--sampler", choices=("tpe", "nsga2", "gp", "random"), default=None,
                   help="Optuna sampler (default: the config's, tpe)")
    p.add_argument("--objectives", choices=("single", "multi"), default=None,
                   help="single: accuracy under the budget; multi: accuracy and latency, the Pareto front")
    p.add_argument("--trials", type=int, default=None, help="candidates to score in total (default: config's)")
    p.add_argument("--top-k", type=int, default=None, help="winners per budget to retrain and export (default: "
                                                           "config's)")
    p.add_argument("--run-dir", default=None, help="where everything of this run goes (default: ./runs/<name>)")
    p.add_argument("--supernet", action="append", default=None, metavar="PATH",
                   help="a trained supernet (supernet.pt or its folder) to search with instead of the shared store; "
                        "repeat once per replica. Its space, data and recipe must be this experiment's")
    p.add_argument("--supernet-store", default=None,
                   help="folder of shared supernets (default: $SHUFFLENAS_HOME/supernets, ~/.cache/shufflenas)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage shared by several processes or machines: a journal file path or a database "
                        "URL (postgresql://..., mysql://...); default: a journal file in the run directory")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster ('auto' or host:port); with --searcher ray")
    p.add_argument("--ray-mode", choices=("supernet", "asha"), default=None,
                   help="with --searcher ray: score candidates with the supernet's weights (default), or train each "
                        "from scratch for search.asha_epochs with ASHA stopping the weak early (no supernet; "
                        "single objective)")
    p.add_argument("--lut", default=None,
                   help="latency table file, profiled into when missing (default: the cache folder's "
                        "luts/<space>-<device>-<runtime>-....json)")
    p.add_argument("--allow-lut-mismatch", action="store_true",
                   help="use a latency table measured on another device or with other settings (not recommended)")
    p.add_argument("--compare-references", nargs="?", const="", default=None, metavar="NAMES",
                   help="also retrain reference archs with the winners' recipe and report them side by side with "
                        "the winners (measured latency, test accuracy): the budgets' reference (with no NAMES), or "
                        "the named ones, comma-separated (shufflenet_v2_x0_5,shufflenet_v2_x1_0)")
    p.add_argument("--seed", type=int, default=None, help="seed of everything (default: the config's)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for training and scoring (default: all cores); latency is always timed with "
                        "the config's latency.threads")
    return p.parse_args(argv)


def job_from_args(args: argparse.Namespace, argv: Sequence[str]) -> Job:
    search = {k: v for k, v in {"searcher": args.searcher, "sampler": args.sampler, "objectives": args.objectives,
                                "trials": args.trials, "top_k": args.top_k, "ray_mode": args.ray_mode}.items()
              if v is not None}
    for name in ("trials", "top_k", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    return Job(
        targets=parse_targets(args.target_ms), config=Path(args.config), preset=args.preset, device=args.device,
        runtime=args.runtime, statistic=args.statistic, search=search,
        run_dir=Path(args.run_dir) if args.run_dir else None, storage=args.storage, ray_address=args.ray_address,
        lut=Path(args.lut) if args.lut else None, allow_lut_mismatch=args.allow_lut_mismatch, seed=args.seed,
        threads=args.threads, supernets=tuple(Path(p) for p in args.supernet or ()),
        supernet_store=Path(args.supernet_store) if args.supernet_store else None,
        compare_references=args.compare_references, argv=tuple(argv),
    )


# ---- the run: settings, paths, step timings -------------------------------------------------------------------------


@dataclass
class Run:
    """What the steps share: the job, the resolved config and device, paths, notes and the time of each step."""

    job: Job
    cfg: Any
    device: str
    run_dir: Path
    notes: list[str] = field(default_factory=list)
    crew: Crew | None = None  # this process among torchrun's; None: a single process
    fine_tune_from: tuple[Any, str] | None = None  # retrain.from_supernet: the supernet winners start from, its path
    pipeline: Pipeline = field(init=False)  # runs the steps of PIPELINE and keeps their seconds in steps.json

    def __post_init__(self) -> None:
        self.pipeline = Pipeline(PIPELINE, self.run_dir / "steps.json")

    @property
    def steps(self) -> dict[str, float]:
        """Seconds per step, as steps.json holds them."""
        return self.pipeline.seconds

    @property
    def ctx(self) -> DistContext:
        """This process's DistContext (rank 0 of 1 without torchrun)."""
        from experiments.distributed import DistContext

        return self.crew.ctx if self.crew is not None else DistContext()

    @property
    def runtime(self) -> str:
        return self.cfg.latency.runtime

    @property
    def statistic(self) -> str:
        return self.cfg.latency.statistic

    @property
    def family(self) -> bool:
        return len(self.job.targets) > 1

    def step(self, step: Step[T], key: str | None = None) -> T:
        """Load `step`'s artifact when it is done, else make it (see `experiments.steps.Pipeline.run`)."""
        return self.pipeline.run(step, key)


def configure(job: Job, crew: Crew | None = None) -> Run:
    """Config, device, runtime and run directory, each checked before any work (the run directory by rank 0 only:
    every rank of a torchrun job calls this)."""
    from experiments.config import load_experiment
    from latency_lut import default_runtime, resolve_device

    cfg = load_experiment(job.config, job.preset)
    search = replace(cfg.search, **job.search)
    cfg = replace(cfg, search=search, seed=cfg.seed if job.seed is None else job.seed,
                  device=job.device or cfg.device)
    device = str(resolve_device(cfg.device))  # `cuda` without CUDA fails here, in one line, on every rank
    if crew is not None and crew.ctx.distributed and device.startswith("cuda"):
        device = str(resolve_device(f"cuda:{crew.ctx.local_rank}"))  # torchrun: each process its own GPU
    runtime = job.runtime or cfg.latency.runtime or default_runtime(device)
    if runtime == "onnxruntime" and device != "cpu":
        raise UsageError(f"--runtime onnxruntime is measured on the cpu only, not on {device}; use --runtime eager, "
                         f"cudagraph, ort-cuda or ort-tensorrt")
    if runtime in ("cudagraph", "ort-cuda", "ort-tensorrt") and not device.startswith("cuda"):
        raise UsageError(f"--runtime {runtime} runs on a cuda device only, not on {device}; use --runtime onnxruntime "
                         f"or eager")
    _check_runtime_installed(runtime)
    cfg = replace(cfg, latency=replace(cfg.latency, runtime=runtime, statistic=job.statistic or cfg.latency.statistic,
                                       target_ms=None))
    if job.ray_address and cfg.search.searcher != "ray":
        raise UsageError("--ray-address needs --searcher ray")
    # A database or cluster that cannot be reached fails here, in one line, before any training.
    if job.storage and "://" in job.storage:
        from searchers.optuna_searcher import open_database

        open_database(job.storage)
    if job.ray_address:
        from searchers.ray_searcher import check_cluster

        check_cluster(job.ray_address)
    if cfg.search.ray_mode == "asha" and cfg.search.searcher != "ray":
        raise UsageError("ray_mode asha needs --searcher ray")
    if cfg.search.ray_mode == "asha" and (cfg.search.objectives != "single" or len(job.targets) > 1):
        raise UsageError("ray_mode asha is single-objective with one budget: truncated trainings would mislead a "
                         "Pareto front")
    if len(job.targets) > 1:  # one multi-objective study serves every budget (see `search_step`)
        cfg = replace(cfg, search=replace(cfg.search, objectives="multi",
                                          trials=math.ceil(FAMILY_TRIALS * cfg.search.trials)))
    name = (f"{job.config.stem}-{job.preset}-{device.replace(':', '')}-{runtime}-{job.target_text}-"
            f"{cfg.latency.statistic}-s{cfg.seed}")
    run_dir = (job.run_dir or Path.cwd() / "runs" / name).resolve()
    run = Run(job=job, cfg=cfg, device=device, run_dir=run_dir, crew=crew)
    if run.ctx.is_main:
        check_run_dir(run)
    if job.threads:
        torch.set_num_threads(job.threads)
    return run


def _check_runtime_installed(runtime: str) -> None:
    if runtime in ("onnxruntime", "ort-cuda", "ort-tensorrt"):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            extra = "export" if runtime == "onnxruntime" else "gpu"
            raise UsageError(f"runtime {runtime}: onnxruntime is not installed: pip install -e \".[{extra}]\" (or "
                             f"choose --runtime eager)") from None
        from latency_lut.fingerprint import check_runtime_installed

        check_runtime_installed(runtime)  # onnxruntime without the runtime's execution provider


def check_run_dir(run: Run) -> None:
    """A run directory belongs to one experiment: refuse to mix, before anything is written to it."""
    from experiments.config import fingerprint
    from search_space.files import atomic_write

    cfg = run.cfg
    identity = {
        "config": Path(cfg.source).name,
        "preset": cfg.preset,
        # Where the data lies, and how many workers decode it, do not make another experiment.
        "fingerprint": fingerprint({**cfg.to_dict(), "source": None, "search": None, "data": cfg.data.identity()}),
        "search": {k: v for k, v in cfg.search.__dict__.items() if k not in ("trials", "top_k")},
        "targets": run.job.target_text,
        "device": run.device,
        "seed": cfg.seed,
        "world_size": run.ctx.world_size,  # N data-parallel processes train other supernets (see experiments.supernets)
    }
    path = run.run_dir / RUN_FILE
    if path.exists():
        stored = {"world_size": 1, **json.loads(path.read_text())}
        diffs = sorted(k for k in identity if stored.get(k) != identity[k])
        if diffs:
            raise UsageError(f"run directory {run.run_dir} holds another experiment (differs in {', '.join(diffs)}); "
                             f"use another --run-dir")
    else:
        atomic_write(path, lambda f: json.dump(identity, f, indent=1))
    run.pipeline.load()


def latency_settings(run: Run, num_classes: int):
    from latency_lut import Settings

    lat = run.cfg.latency
    return Settings(runtime=lat.runtime, batch_size=lat.batch_size, threads=lat.threads, dtype=lat.dtype,
                    num_classes=num_classes, statistic=lat.statistic)


def machine(run: Run, settings) -> dict[str, Any]:
    """The fingerprint of what measures now (device, software, settings): stored with every cached verdict."""
    from latency_lut import Fingerprint

    return Fingerprint.machine(run.device, settings)


# ---- lut ----------------------------------------------------------------------------------------------------------


def table_path(run: Run, space, settings) -> Path:
    """The latency table's file: --lut, or the shared cache's table for this device and settings."""
    from latency_lut import default_out

    return run.job.lut or default_out(space, run.device, settings)


@dataclass(frozen=True)
class LutStep(Step):
    """The device's latency table: loaded when it covers the space and has a fitted correction; else profiled
    (resumable: entries measured before are kept) and calibrated."""

    name: ClassVar[str] = "lut"
    artifact: ClassVar[str] = "the latency table file (complete, with a fitted correction; --lut or the cache folder's)"
    path: Path
    space: Any
    device: str
    settings: Any
    seed: int
    allow_mismatch: bool  # --allow-lut-mismatch: a table measured elsewhere or with other settings is used anyway

    def _read(self):
        from latency_lut import LatencyTable

        return LatencyTable.load(self.path, expect=self.settings, device=self.device,
                                 allow_mismatch=self.allow_mismatch)

    def started(self) -> bool:
        return self.path.exists()

    def done(self) -> bool:
        if not self.path.exists():
            return False
        table = self._read()  # a table measured elsewhere is refused here, before it is extended
        if table.geometry != self.space.geometry:
            raise UsageError(f"{self.path}: measured for another input geometry ({table.geometry}), not "
                             f"{self.space.geometry}")
        return not table.missing(self.space) and bool(table.correction.fitted_on)

    def load(self):
        return self._read()

    def make(self):
        from latency_lut import profile, validate

        path, mismatch = self.path, self.allow_mismatch
        profile(self.space, path, self.device, self.settings, allow_mismatch=mismatch, seed=self.seed)
        table = self._read()
        if not table.correction.fitted_on:
            validate(path, self.space, n=CALIBRATION_ARCHS, seed=self.seed, calibrate_frac=0.5,
                     report_dir=path.parent / f"{path.stem}-validation", device=self.device, allow_mismatch=mismatch)
            table = self._read()
        return table


# ---- measuring the shipped file -----------------------------------------------------------------------------------


def export_shipped(model: torch.nn.Module, runtime: str, folder: Path) -> Path:
    """Export `model` as the one file `runtime` runs (model.onnx or model.pt2), exactly as shipping does."""
    from experiments.export import export_onnx, export_program
    from latency_lut import SHIPPED_FILES

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SHIPPED_FILES[runtime]
    (export_onnx if path.suffix == ".onnx" else export_program)(model.cpu().eval(), path)
    return path


def measure_shipped(run: Run, path: Path, settings) -> Any:
    """Time a shipped file on the run's device, in a fresh process, with the table's settings.

    A fresh process, as the table was profiled and as the model is deployed: a process that has just trained timed
    the same networks 1.26x slower on a 2-core CPU (see `latency_lut.measure_model_fresh`).
    """
    from latency_lut import FILE_BUDGET, measure_file_fresh

    return measure_file_fresh(path, run.device, settings, MEASURE_BUDGET or FILE_BUDGET, seed=run.cfg.seed)


def measure_model(run: Run, model: torch.nn.Module, settings, purpose: str = "verdict") -> Any:
    """Export `model` as the runtime's file into a temporary folder and measure that (random weights will do:
    latency does not depend on them). `purpose`: "verdict", "calibrate" or "reference", for the record."""
    with tempfile.TemporaryDirectory(dir=run.run_dir, prefix=".measure-") as folder:
        return measure_shipped(run, export_shipped(model, run.runtime, Path(folder)), settings)


def measured_archs(run: Run, space, settings):
    """This machine's whole-arch measurements kept beside the table (`latency_lut.MeasuredArchs`).

    The measurements that do not decide shipping (a reference, the calibration archs) go there: every later run with
    the same table on the same machine reads them instead of measuring again. (Delete `<table>-measured.json` to
    have them measured again.)
    """
    from latency_lut import MeasuredArchs

    return MeasuredArchs(table_path(run, space, settings), machine(run, settings))


def measure_arch(run: Run, space, arch, settings, num_classes: int, purpose: str, shared,
                 keep: bool = True) -> tuple[dict[str, Any], bool]:
    """An arch's shipped-file measurement on this machine: from `shared` (True: taken earlier), or taken now (False;
    kept in `shared` when `keep`, else the caller keeps it once it is sure of it). The network is built with the
    run's seed; latency does not depend on its weights."""
    record = shared.get(arch.encode(), num_classes)
    if record is not None:
        return record, True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.cfg.seed)
        model = space.build(arch, num_classes)
    record = {**measure_model(run, model, settings, purpose=purpose).summary(), "purpose": purpose}
    if keep:
        shared.put(arch.encode(), num_classes, record)
    return record, False


def verdict(run: Run, measure_once: Callable[[], Any], target_ms: float) -> dict[str, Any]:
    """A measurement that decides shipping: the lowest of up to VERDICT_TRIES, taken while it is over the budget.

    A shared machine only ever adds time, in phases that last seconds (one thread on a 2-core machine: the same
    network measured 3.5 and 6.0 ms a minute apart). A measurement within the budget is believed at once; one over
    it, but by less than RETRY_BAND, is taken again, up to VERDICT_TRIES in all, and the one with the lowest
    statistic decides. Each is a clean measurement (a fresh process, warm-up, hundreds of calls); every try is kept.
    """
    stat = run.statistic
    tries = [measure_once()]
    while len(tries) < VERDICT_TRIES and target_ms < tries[-1].value(stat) < RETRY_BAND * target_ms:
        tries.append(measure_once())
    best = min(tries, key=lambda m: m.value(stat))
    return {"statistic": stat, "ms": best.value(stat), **best.summary(),
            "tries_ms": [m.value(stat) for m in tries]}


# ---- target: budgets relative to a reference, measured now --------------------------------------------------------


@dataclass(frozen=True)
class TargetStep(Step):
    """A budget relative to a reference arch: that arch exported and measured on this machine (kept in
    targets.json, and beside the table for every later run on this machine). Budgets in milliseconds measure
    nothing (the step returns None)."""

    name: ClassVar[str] = "target"
    artifact: ClassVar[str] = "targets.json (the reference measured, with the machine that measured it)"
    file: MachineFile
    reference: str | None  # the reference arch's name; None: every budget is in milliseconds
    arch: Any  # that arch
    statistic: str
    measure: Callable[[Any], tuple[dict[str, Any], bool]]  # an arch's record, and whether an earlier run took it

    def done(self) -> bool:
        return self.reference is not None and self.file.current()

    def load(self) -> dict[str, Any] | None:
        return self.file.read()

    def make(self) -> dict[str, Any] | None:
        if self.reference is None:
            return None
        record, earlier = self.measure(self.arch)
        return self.file.write({"reference": self.reference, "arch": self.arch.encode(),
                                "measured": {"ms": record[f"{self.statistic}_ms"], **record}, "earlier": earlier})


def budgets_ms(targets: Sequence[Target], reference: dict[str, Any] | None) -> list[float]:
    """Each budget in milliseconds, given the reference's measurement (targets.json) when they are relative."""
    if reference is None:
        return [float(t.ms) for t in targets]
    return [t.factor * reference["measured"]["ms"] for t in targets]


def reference_note(reference: dict[str, Any], statistic: str, runtime: str) -> str:
    when = "by an earlier run with this table" if reference.get("earlier") else "now"
    return (f"{reference['reference']} measured {reference['measured']['ms']:.3f} ms ({statistic}, {runtime}) on this "
            f"device {when}; the budgets are multiples of that")


def reference_points(space) -> dict[str, Any]:
    """The archs a budget can be relative to: the torchvision shapes the space holds, its smallest and its largest."""
    return {**space.contained_references(), "smallest": space.smallest(), "largest": space.largest()}


def check_reference(run: Run, space) -> None:
    """A budget relative to an arch the space does not name, or a comparison with one, fails before any work."""
    known = reference_points(space)
    for t in run.job.targets:
        if t.reference is not None and t.reference not in known:
            raise UsageError(f"--target-ms {t.label}: {t.reference!r} is not a reference arch of space {space.name!r} "
                             f"(it has: {', '.join(known)})")
    for name in compared_names(run.job):
        if name not in known:
            raise UsageError(f"--compare-references: {name!r} is not a reference arch of space {space.name!r} "
                             f"(it has: {', '.join(known)})")


def compared_names(job: Job) -> list[str]:
    """The references `--compare-references` retrains: the named ones, or the budgets' reference.

    Raises:
        UsageError: the flag without names when the budgets are in milliseconds.
    """
    if job.compare_references is None:
        return []
    names = [n.strip() for n in job.compare_references.split(",") if n.strip()]
    if names:
        return list(dict.fromkeys(names))
    refs = [t.reference for t in job.targets if t.reference is not None]
    if not refs:
        raise UsageError("--compare-references without names needs a budget relative to a reference "
                         "(--target-ms shufflenet_v2_x0_5); with budgets in milliseconds, name the references: "
                         "--compare-references shufflenet_v2_x0_5")
    return refs[:1]


@dataclass(frozen=True)
class CheckStep(Step):
    """Whether each budget binds; a budget no arch meets fails here, naming which of several it was."""

    name: ClassVar[str] = "check"
    artifact: ClassVar[str] = "nothing: the budgets are checked against the table every run"
    table: Any
    space: Any
    targets_ms: tuple[float, ...]
    specs: tuple[Target, ...]

    def make(self) -> tuple[list[bool], list[str]]:
        """Whether each budget binds, and the notices of those that do not."""
        from searchers.base import InfeasibleTarget, check_target

        binds, notices = [], []
        for target, spec in zip(self.targets_ms, self.specs, strict=True):
            try:
                notice = check_target(self.table, self.space, target)
            except InfeasibleTarget as e:
                which = f"budget {spec.label} ({target:.3f} ms): " if len(self.specs) > 1 or spec.reference else ""
                raise UsageError(f"{which}{e}") from None
            if notice:
                notices.append(notice.removeprefix("notice: "))
            binds.append(notice is None)
        return binds, notices


# ---- supernet -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SupernetStep(Step):
    """The supernets to score with: given by path (checked against the experiment), or the store's, trained there
    once per space, data, recipe and seed (a store entry another process is training is waited for)."""

    name: ClassVar[str] = "supernet"
    artifact: ClassVar[str] = "<store>/<space>-<data>-<recipe>-s<seed>/supernet.pt, finished (or the --supernet files)"
    space: Any
    splits: Any
    cfg: Any
    device: str
    given: tuple[Path, ...]  # --supernet: trained supernets to use; empty: the store's
    store: Path
    ctx: DistContext
    announce: Callable[[Any], None] | None  # told each store entry just before it is trained (torchrun's rank 0)

    def entries(self) -> list:
        from experiments.supernets import replica_entries

        return replica_entries(self.store, self.space, self.cfg, self.splits.num_classes, self.ctx.world_size)

    def done(self) -> bool:
        return bool(self.given) or all(e.finished(self.cfg.supernet.epochs) for e in self.entries())

    def started(self) -> bool:
        return any(e.checkpoint.exists() for e in self.entries())

    def load(self) -> tuple[list, list[str]]:
        from experiments.checkpoints import load_supernet
        from experiments.supernets import given_supernets

        if self.given:
            nets = given_supernets(self.given, self.space, self.cfg, self.splits.num_classes)
            return [n.to(self.device) for n in nets], [str(p) for p in self.given]
        entries = self.entries()
        return [load_supernet(e.checkpoint, self.device) for e in entries], [str(e.checkpoint) for e in entries]

    def make(self) -> tuple[list, list[str]]:
        from experiments.supernets import shared_supernets

        nets, paths = shared_supernets(self.space, self.splits, self.cfg, self.store, device=self.device,
                                       ctx=self.ctx, announce=self.announce)
        return nets, [str(p) for p in paths]


def announcer(crew: Crew | None) -> Callable[[Any], None] | None:
    """Under torchrun, rank 0 tells the other ranks which store entry to train with it (it holds the entry's lock)."""
    if crew is None:
        return None

    def announce(entry) -> None:
        order = {"do": "supernet", "folder": str(entry.folder), "seed": entry.identity["seed"]}
        crew.order(**order, sees=sees(order))

    return announce


# ---- calibrate ----------------------------------------------------------------------------------------------------


def calibration_picks(space, table, binding: Sequence[float], count: int, seed: int,
                      measured: dict[str, Any]) -> list[tuple[Any, float]]:
    """`count` archs (and their predictions) just under the binding budgets, where their winners will be, shared
    out between the budgets. Among the archs close enough to a budget (CALIBRATE_WINDOW), the ones this machine
    has measured before come first, so a repeated or nearby budget measures nothing new."""
    from search_space import Arch

    rng = np.random.default_rng(seed)
    sampled = (space.sample(rng) for _ in range(2000))
    pool = list({a.encode(): a for a in [*sampled, *(Arch.decode(c) for c in sorted(measured))]}.values())
    predicted = table.predict_many(pool)
    known = np.array([a.encode() in measured for a in pool])
    picks: list[int] = []
    for i, target in enumerate(binding):
        share = max(count // len(binding) + (i < count % len(binding)), 1)
        distance = np.abs(predicted - 0.95 * target)
        near = distance <= CALIBRATE_WINDOW * target
        order = np.lexsort((distance, ~(near & known), ~near))  # near and measured, near, then the rest
        picks += [int(j) for j in order if j not in picks][:share]
    return [(pool[j], float(predicted[j])) for j in picks]


@dataclass(frozen=True)
class CalibrateStep(Step):
    """The ratio the table's predictions are rescaled by: what the device measures near the budgets.

    The table was profiled and corrected earlier (maybe under another load); the archs that matter are the ones near
    the budgets, so `latency.calibrate_archs` of them have their shipped file timed on this machine (each in a fresh
    process), and the table's predictions are multiplied by the lowest measured / predicted ratio. The measurements
    are kept beside the table (`shared`), so a later budget near one measured before reuses them; the result is kept
    in RUN_DIR/calibration.json with the measuring machine, for a resumed run. Nothing is measured (ratio 1, nothing
    stored) when `latency.calibrate_archs` is 0 or no budget binds.
    """

    name: ClassVar[str] = "calibrate"
    artifact: ClassVar[str] = "calibration.json (with the machine that measured it)"
    file: MachineFile
    space: Any
    table: Any
    binding: tuple[float, ...]  # the budgets that bind, in milliseconds
    count: int  # latency.calibrate_archs
    seed: int
    statistic: str
    num_classes: int
    shared: Any  # this machine's whole-arch measurements beside the table (`measured_archs`)
    measure: Callable[[Any], tuple[dict[str, Any], bool]]  # an arch's record, and whether an earlier run took it

    def done(self) -> bool:
        return self.file.current()

    def load(self) -> dict[str, Any]:
        return self.file.read()

    def make(self) -> dict[str, Any]:
        """Raises:
            UsageError: at that ratio not even the fastest arch meets the smallest budget (nothing is stored then:
                a rerun measures again, when the machine may be quieter).
        """
        if self.count == 0 or not self.binding:
            return {"ratio": 1.0, "archs": []}
        rows, new = self._measure()
        # A shared machine only ever adds time, in phases that can last seconds: the lowest ratio is the one least
        # touched by them.
        ratio = float(min(r["measured_ms"] / r["predicted_ms"] for r in rows))
        fastest = self.table.min_latency(self.space) * ratio
        if fastest > min(self.binding):
            measured_ms = [r["measured_ms"] for r in rows]
            predicted_ms = [r["predicted_ms"] for r in rows]
            raise UsageError(
                f"budget {min(self.binding):.3f} ms cannot be met as the device measures now: {len(rows)} archs the "
                f"table puts at {min(predicted_ms):.2f}-{max(predicted_ms):.2f} ms measured {min(measured_ms):.2f}-"
                f"{max(measured_ms):.2f} ms (at least {ratio:.2f}x), so the fastest arch would take {fastest:.2f} ms; "
                f"raise --target-ms, or rerun when the machine is quieter (the trained supernet is kept)")
        for code, record in new.items():
            self.shared.put(code, self.num_classes, record)
        return self.file.write({"ratio": ratio, "archs": rows})

    def _measure(self) -> tuple[list[dict[str, Any]], dict[str, dict]]:
        """One row per calibration arch, and the records measured now (kept once the ratio is accepted)."""
        picks = calibration_picks(self.space, self.table, self.binding, self.count, self.seed,
                                  self.shared.all(self.num_classes))
        rows, new = [], {}
        for n, (arch, predicted) in enumerate(picks, start=1):
            record, earlier = self.measure(arch)
            if not earlier:
                new[arch.encode()] = record
            rows.append({"arch": arch.encode(), "predicted_ms": predicted,
                         "measured_ms": record[f"{self.statistic}_ms"], "earlier": earlier})
            print(f"  calibrate {n}/{len(picks)}: predicted {predicted:.3f} ms, measured "
                  f"{rows[-1]['measured_ms']:.3f} ms{' (earlier)' if earlier else ''}", file=sys.stderr, flush=True)
        return rows, new


def calibrated(table, calibration: dict[str, Any]):
    """The table with its predictions rescaled by the calibration's ratio (the table itself when none measured)."""
    return table.scaled(calibration["ratio"]) if calibration["archs"] else table


# ---- search -------------------------------------------------------------------------------------------------------


def make_searcher(run: Run, space, table, evaluator, target_ms: float, study_name: str, num_classes: int,
                  supernet_paths: Sequence[str]):
    cfg = run.cfg.search
    common = {"sampler": cfg.sampler, "objectives": cfg.objectives, "storage": run.job.storage,
              "run_dir": run.run_dir / "search", "study_name": study_name, "seed": run.cfg.seed,
              "num_classes": num_classes}
    if cfg.searcher == "ray":
        from experiments.factories import ScratchTrainerFactory, SupernetEvaluatorFactory
        from searchers.ray_searcher import RaySearcher

        source = str(Path(run.cfg.source).resolve())
        resources = {"ray_address": run.job.ray_address, "max_concurrent": cfg.workers,
                     "gpus_per_trial": 1.0 / cfg.workers if "cuda" in run.device else 0.0}
        if cfg.ray_mode == "asha":
            trainer = ScratchTrainerFactory(source, run.cfg.preset, seed=run.cfg.seed, device=run.device)
            return RaySearcher(space, table, target_ms, trainer_factory=trainer, mode="asha",
                               asha_epochs=cfg.asha_epochs, asha_grace=cfg.asha_grace, **resources, **common)
        first, *others = supernet_paths
        factory = SupernetEvaluatorFactory(source, run.cfg.preset, first, seed=run.cfg.seed, device=run.device,
                                           replica_checkpoints=tuple(others))
        return RaySearcher(space, table, target_ms, evaluator_factory=factory, **resources, **common)
    if cfg.searcher != "optuna":
        raise UsageError(f"search.searcher {cfg.searcher!r}: expected optuna or ray")
    from searchers.optuna_searcher import OptunaSearcher

    return OptunaSearcher(space, table, evaluator, target_ms, **common)


@dataclass(frozen=True)
class SearchStep(Step):
    """One study: done when its storage holds `trials` complete trials; otherwise searched (or resumed) to that."""

    name: ClassVar[str] = "search"
    artifact: ClassVar[str] = "search/ (the study: a journal file, a database or Ray Tune's experiment), trials.csv"
    searcher: Any
    trials: int

    def _feasible(self) -> bool:  # else `make` raises, before the study's storage is made
        from searchers.base import InfeasibleTarget, check_target

        try:
            check_target(self.searcher.predictor, self.searcher.space, self.searcher.target_ms)
        except InfeasibleTarget:
            return False
        return True

    def done(self) -> bool:
        return self._feasible() and self.searcher.completed() >= self.trials

    def started(self) -> bool:
        return self._feasible() and self.searcher.completed() > 0

    def load(self):
        return self.searcher.result()

    def make(self):
        return self.searcher.run(self.trials)


# ---- ship ---------------------------------------------------------------------------------------------------------


@dataclass
class Shipping:
    """ship.json: verdicts by arch (before training, with random weights) and shipped winners by budget and arch.

    Every verdict keeps the machine that measured it; a run resumed on another machine measures again.
    """

    path: Path
    here: dict[str, Any]
    measured: dict[str, dict] = field(default_factory=dict)
    shipped: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, here: dict[str, Any]) -> Shipping:
        state = cls(path, here)
        if path.exists():
            data = json.loads(path.read_text())
            state.measured = {k: v for k, v in data.get("measured", {}).items() if v.get("machine") == here}
            state.shipped = {k: v for k, v in data.get("shipped", {}).items()
                             if v.get("measured", {}).get("machine") == here}
        return state

    def save(self) -> None:
        from search_space.files import atomic_write

        atomic_write(self.path, lambda f: json.dump({"measured": self.measured, "shipped": self.shipped}, f,
                                                    indent=1))


def winner_folder(run_dir: Path, label: str | None, rank: int, code: str) -> Path:
    base = run_dir / "winners"
    return (base / label if label else base) / f"{rank}-{code}"


class _Undecided(Exception):
    """A candidate ship.json holds no decision for yet (on this machine)."""


@dataclass(frozen=True)
class ShipStep(Step):
    """One budget's winners: `candidates` walked best first, the first `top_k` whose shipped file measures within
    `target_ms` shipped.

    Each candidate is exported with random weights and its shipped file measured before any training (latency
    does not depend on the weights). One within the budget is retrained, exported with all its files into
    winners/.staging/, its shipped file measured again, and only then moved into winners/ by an atomic rename, so
    a run killed at any moment leaves in winners/ only winners that passed. Done when ship.json holds every
    decision of the walk, measured on this machine, and winners/ every winner's folder.
    """

    name: ClassVar[str] = "ship"
    artifact: ClassVar[str] = "ship.json (verdicts with the machine that measured them), winners/"
    state: Shipping
    candidates: tuple[Any, ...]  # TrialRecords, best first
    target_ms: float
    label: str | None  # the budget's label among several; None: the one budget
    top_k: int
    run_dir: Path
    decode: Callable[[str], Any]  # an arch code to the arch
    cost: Callable[[Any], Any]  # an arch's params and MFLOPs
    judge: Callable[[Any], dict[str, Any]]  # the verdict on an untrained arch, measured now
    retrain: Callable[[Any, Any, Path], dict[str, Any]]  # (arch, candidate, folder): its model card, staged

    def done(self) -> bool:
        try:
            self._walk(measure=False)
        except _Undecided:
            return False
        return True

    def started(self) -> bool:
        return any(c.arch in self.state.measured for c in self.candidates)

    def load(self) -> tuple[list[dict], list[dict]]:
        return self._walk(measure=False)

    def make(self) -> tuple[list[dict], list[dict]]:
        return self._walk(measure=True)

    def _walk(self, measure: bool) -> tuple[list[dict], list[dict]]:
        """The winners and the rejected candidates; with `measure` False, raises `_Undecided` where it would have
        to measure or retrain."""
        winners: list[dict] = []
        rejected: list[dict] = []
        for candidate in self.candidates:
            if len(winners) >= self.top_k:
                break
            code, arch = candidate.arch, self.decode(candidate.arch)
            before = self._verdict(code, arch, measure)
            if before["ms"] > self.target_ms:
                rejected.append(_rejected(candidate, before["ms"], "before training"))
                continue
            rank = len(winners) + 1
            folder = winner_folder(self.run_dir, self.label, rank, code)
            card = self._card(arch, candidate, folder, measure)
            if card["measured_ms"] > self.target_ms:  # the exported, trained network itself is over: not a winner
                rejected.append(_rejected(candidate, card["measured_ms"], "after training"))
                continue
            cost = self.cost(arch)
            winners.append({"rank": rank, "arch": code, "params": cost.params, "mflops": cost.mflops,
                            "folder": str(folder.relative_to(self.run_dir)), **card})
        return winners, rejected

    def _verdict(self, code: str, arch, measure: bool) -> dict[str, Any]:
        if code not in self.state.measured:
            if not measure:
                raise _Undecided(code)
            self.state.measured[code] = {**self.judge(arch), "machine": self.state.here}
            self.state.save()
        return self.state.measured[code]

    def _card(self, arch, candidate, folder: Path, measure: bool) -> dict[str, Any]:
        key = f"{self.label or ''}/{candidate.arch}"
        card = self.state.shipped.get(key)
        # A card over the budget is a decision too; one within it counts once its folder is in winners/.
        if card is None or (card["measured_ms"] <= self.target_ms and not (folder / "model_card.json").exists()):
            if not measure:
                raise _Undecided(key)
            self.state.shipped[key] = self.retrain(arch, candidate, folder)
            self.state.save()
        return self.state.shipped[key]


def _rejected(candidate, measured_ms: float, when: str) -> dict[str, Any]:
    return {"arch": candidate.arch, "predicted_ms": candidate.predicted_ms, "measured_ms": measured_ms,
            "accuracy": candidate.accuracy, "when": when}


def judge_untrained(run: Run, space, arch, num_classes: int, target_ms: float, settings) -> dict[str, Any]:
    """The verdict on `arch` with random weights (drawn with the run's seed): its shipped file measured now."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.cfg.seed)
        model = space.build(arch, num_classes)
    return verdict(run, lambda: measure_model(run, model, settings), target_ms)


def retrain_everywhere(run: Run, space, splits, arch, run_dir: Path, part: str):
    """`arch` retrained with the run's recipe in `run_dir` (resumable), from the supernet when the recipe says so;
    under torchrun every rank trains it (rank 0 posts the order first). Its seconds go to steps.json as `part`."""
    from experiments.training import retrain

    start = time.perf_counter()
    init = run.fine_tune_from
    if run.crew is not None:
        order = {"do": "retrain", "arch": arch.encode(), "run_dir": str(run_dir), "supernet": init[1] if init else None}
        run.crew.order(**order, sees=sees(order))
    trained = retrain(space, arch, splits, run.cfg, run_dir, device=run.device, ctx=run.ctx,
                      init_from=init[0] if init else None)
    run.pipeline.add(part, time.perf_counter() - start)
    return trained


def retrain_and_stage(run: Run, space, splits, arch, candidate, target_ms: float, label: str | None, settings,
                      folder: Path) -> dict[str, Any]:
    """Retrain `arch` (resumable, in RUN_DIR/retrain/), export it into a staging folder, measure its shipped file
    there, and move the folder to `folder` when it is within `target_ms`. Returns the model card."""
    from experiments.export import export_all
    from latency_lut import SHIPPED_FILES

    code = arch.encode()
    trained = retrain_everywhere(run, space, splits, arch, run.run_dir / "retrain" / code, "ship: retraining")
    model = trained.model.cpu().eval()  # exported and measured from the CPU; the child moves it to the device
    staging = run.run_dir / "winners" / ".staging" / f"{label or 'run'}-{code}"
    shutil.rmtree(staging, ignore_errors=True)  # a kill mid-export leaves nothing that counts
    card = {
        "predicted_ms": candidate.predicted_ms, "target_ms": target_ms, "target": label or run.job.target_text,
        "runtime": run.runtime, "shipped_file": SHIPPED_FILES[run.runtime], "statistic": run.statistic,
        "search_accuracy": candidate.accuracy, "val_accuracy": trained.val_accuracy,
        "test_accuracy": trained.test_accuracy, "seed": run.cfg.seed, "recipe": run.cfg.to_dict()["retrain"],
        "data": run.cfg.data.name, "device": run.device,
        "world_size": run.ctx.world_size,  # data-parallel processes that retrained it (the global batch is this many x)
    }
    export_all(model, staging, card=card, extra={"mean": list(splits.mean), "std": list(splits.std)})
    shipped = staging / SHIPPED_FILES[run.runtime]
    card["measured"] = {**verdict(run, lambda: measure_shipped(run, shipped, settings), target_ms),
                        "machine": machine(run, settings)}
    card["measured_ms"] = card["measured"]["ms"]
    full = {**json.loads((staging / "model_card.json").read_text()), **card}
    from search_space.files import atomic_write

    atomic_write(staging / "model_card.json", lambda f: json.dump(full, f, indent=2, default=str))
    if card["measured_ms"] <= target_ms:
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, folder)
    else:
        shutil.rmtree(staging, ignore_errors=True)
    return card


# ---- the job ------------------------------------------------------------------------------------------------------


def run_job(job: Job, crew: Crew | None = None) -> Path:
    """The job, on every process of a torchrun job (`crew`; None: a single process). Rank 0 runs the steps of
    PIPELINE, in order; each step is built with what it needs."""
    from experiments.evaluate import Evaluator

    run, space, splits = prepare(job, crew)
    num_classes = splits.num_classes
    settings = latency_settings(run, num_classes)
    table = run.step(LutStep(table_path(run, space, settings), space, run.device, settings, run.cfg.seed,
                             job.allow_lut_mismatch))
    reference = run.step(target_step(run, space, settings, num_classes))
    if reference is not None:
        run.notes.append(reference_note(reference, run.statistic, run.runtime))
    targets = budgets_ms(job.targets, reference)
    binds, notices = run.step(CheckStep(table, space, tuple(targets), job.targets))
    run.notes += notices
    supernets, supernet_paths = supernet_phase(run, space, splits)
    calibration = run.step(calibrate_step(run, space, table, settings, num_classes, targets, binds))
    table = calibrated(table, calibration)
    if calibration["archs"]:
        run.notes.append(f"{len(calibration['archs'])} archs near the budget measured at least "
                         f"{calibration['ratio']:.3f}x their table prediction on this machine; the search used "
                         f"predictions rescaled by that")
    evaluator = None if supernets is None else Evaluator(supernets, splits, run.cfg.evaluate, seed=run.cfg.seed,
                                                         device=run.device)
    state = Shipping.load(run.run_dir / "ship.json", machine(run, settings))
    searched = search_family if run.family else search_one
    result, families = searched(run, space, splits, table, evaluator, targets, state, settings, supernet_paths)
    run.step(ReportStep(run, space, table, evaluator, result, tuple(families), settings, splits))
    return finish(run, families)


def prepare(job: Job, crew: Crew | None) -> tuple[Run, Any, Any]:
    """The run, its space and its data, each checked before any work. Under torchrun every rank loads them and
    agrees with the others; a rank other than 0 then follows rank 0's orders (and never returns)."""
    from experiments.data import load_splits

    run = configure(job, crew)
    space = _load_space(run.cfg.space)
    check_reference(run, space)
    splits = load_splits(run.cfg.data, run.cfg.seed)  # missing data fails here, before any measurement
    if crew is not None:  # every rank prepared the same experiment: only then the process group
        crew.agree(_loaded(run, space, splits))
        run.device = crew.start(run.device)
        if not crew.ctx.is_main:
            follow(run, space, splits)  # until rank 0 ends the job
        run.notes.append(f"the supernet and the winners were trained data-parallel by {crew.ctx.world_size} "
                         f"processes (torchrun): steps of {crew.ctx.world_size} x the recipe's batch size")
    return run, space, splits


def target_step(run: Run, space, settings, num_classes: int) -> TargetStep:
    """The target step of the run's budgets: their reference (if any) measured as shipped, on the run's device."""
    refs = {t.reference for t in run.job.targets if t.reference is not None}
    name = next(iter(refs), None)  # one at most (`parse_targets`)
    arch = reference_points(space)[name] if name is not None else None

    def measure(arch_) -> tuple[dict[str, Any], bool]:
        return measure_arch(run, space, arch_, settings, num_classes, "reference", measured_archs(run, space, settings))

    return TargetStep(MachineFile(run.run_dir / "targets.json", machine(run, settings)), name, arch, run.statistic,
                      measure)


def supernet_phase(run: Run, space, splits) -> tuple[list | None, list[str]]:
    """The supernets candidates are scored with, and the notes on them; none with Ray Tune's ASHA (the candidates
    are trained from scratch), which skips the step."""
    from experiments.supernets import default_store

    cfg = run.cfg
    if cfg.search.searcher == "ray" and cfg.search.ray_mode == "asha":
        if cfg.retrain.from_supernet:
            raise UsageError(f"{cfg.source}: retrain.from_supernet is true, but Ray Tune with ASHA trains no "
                             f"supernet (set search.ray_mode: supernet, or retrain.from_supernet: false)")
        run.notes.append(f"Ray Tune with ASHA: each candidate trained from scratch for up to "
                         f"{cfg.search.asha_epochs} epoch(s); no supernet")
        return None, []
    supernets, paths = run.step(SupernetStep(space, splits, cfg, run.device, run.job.supernets,
                                             run.job.supernet_store or default_store(), run.ctx, announcer(run.crew)))
    run.notes.append("supernet" + ("s" if len(paths) > 1 else "") + " used: " + ", ".join(f"`{p}`" for p in paths))
    if len(supernets) > 1:
        run.notes.append(f"each candidate scored by the mean of {len(supernets)} supernet replicas")
    if cfg.retrain.from_supernet:
        run.fine_tune_from = (supernets[0], paths[0])
        run.notes.append(f"the winners were fine-tuned from the weights of `{paths[0]}` (retrain.from_supernet), "
                         f"not trained from scratch")
    return supernets, paths


def calibrate_step(run: Run, space, table, settings, num_classes: int, targets: Sequence[float],
                   binds: Sequence[bool]) -> CalibrateStep:
    """The calibrate step for the budgets that bind, measuring on the run's device."""
    shared = measured_archs(run, space, settings)

    def measure(arch) -> tuple[dict[str, Any], bool]:  # kept beside the table once the ratio is accepted
        return measure_arch(run, space, arch, settings, num_classes, "calibrate", shared, keep=False)

    return CalibrateStep(
        MachineFile(run.run_dir / "calibration.json", machine(run, settings)), space, table,
        binding=tuple(t for t, b in zip(targets, binds, strict=True) if b), count=run.cfg.latency.calibrate_archs,
        seed=run.cfg.seed, statistic=run.statistic, num_classes=num_classes, shared=shared, measure=measure)


def finish(run: Run, families: list[dict]) -> Path:
    """The winners, one line each; a budget no candidate measured within is an error (exit code 2)."""
    print(f"done: report in {run.run_dir / 'report.md'}", file=sys.stderr)
    for family in families:
        for w in family["winners"]:
            print(f"  {family['label']}: #{w['rank']} {w['arch']}  measured {w['measured_ms']:.3f} ms "
                  f"({run.statistic}, {run.runtime}; budget {family['target_ms']:.3f}), test accuracy "
                  f"{100 * w['test_accuracy']:.2f}%")
    missing = [f["label"] for f in families if not f["winners"]]
    if missing:
        raise UsageError(f"no candidate measured within budget {', '.join(missing)} on {run.device}; see "
                         f"{run.run_dir / 'report.md'}")
    return run.run_dir


def _load_space(path: str):
    from search_space import SearchSpace

    return SearchSpace.from_yaml(path)


def _loaded(run: Run, space, splits) -> dict[str, Any]:
    """What a rank trains with, as rank 0 compares it across ranks (the same files and command on every machine)."""
    from experiments.config import fingerprint
    from experiments.supernets import supernet_identity

    return {"supernet": fingerprint(supernet_identity(space, run.cfg, splits.num_classes, run.cfg.seed)),
            "retrain": fingerprint(run.cfg.to_dict()["retrain"]), "images": len(splits.train)}


def sees(order: dict[str, Any]) -> dict[str, Any]:
    """What this process sees of the checkpoint an order resumes from (its size; None: none): every rank of a
    torchrun job must see rank 0's (one file system)."""
    from experiments.checkpoints import RETRAIN_CHECKPOINT, SUPERNET_CHECKPOINT

    path = (Path(order["folder"]) / SUPERNET_CHECKPOINT if order["do"] == "supernet"
            else Path(order["run_dir"]) / RETRAIN_CHECKPOINT)
    return {"checkpoint": str(path), "bytes": path.stat().st_size if path.exists() else None}


def follow(run: Run, space, splits) -> NoReturn:
    """A rank other than 0 of a torchrun job: train what rank 0 orders, together with it, until it ends the job
    (raises `Dismissed` with rank 0's exit code, which this process exits with too).

    Rank 0 decides what is trained, and in which order (the store's lock, resumption, the search, the verdicts are
    its alone); it posts an order just before it starts that training itself, and every rank trains in the same
    folder (one file system: the run directory and the supernet store must be shared between machines)."""
    from experiments.distributed import Dismissed
    from experiments.supernets import given_supernets, train_entry
    from experiments.training import retrain

    crew = run.crew
    while True:
        order = crew.next_order(sees)
        try:
            if order["do"] == "supernet":
                train_entry(Path(order["folder"]), int(order["seed"]), space, splits, run.cfg, device=run.device,
                            progress=False, ctx=run.ctx)
            elif order["do"] == "retrain":
                arch = type(space.largest()).decode(order["arch"])
                init = given_supernets([order["supernet"]], space, run.cfg, splits.num_classes)[0].to(run.device) \
                    if order.get("supernet") else None
                retrain(space, arch, splits, run.cfg, Path(order["run_dir"]), device=run.device, progress=False,
                        ctx=run.ctx, init_from=init)
            else:
                raise ValueError(f"rank {run.ctx.rank}: unknown order from rank 0: {order}")
        except BaseException:
            # Rank 0 stopped mid-training (bad input, Ctrl-C): leaving the process group, it released this rank from
            # the collective it waited in. Its exit code is this rank's too; anything else is a fault of its own.
            code = crew.dismissed()
            if code is None:
                raise
            raise Dismissed(code) from None


def search_one(run: Run, space, splits, table, evaluator, targets: Sequence[float], state: Shipping, settings,
               supernet_paths: Sequence[str]) -> tuple[Any, list[dict]]:
    """One budget: search under it; if no candidate measures within it, search again with the table's target
    lowered by the error measured (a margin learned from the measurements). Each round is a study of its own
    (search, search-r1, ...) with its trials-rN.csv."""
    (target,) = targets
    table_target = target * (1.0 - run.cfg.latency.margin)
    rejected_all: list[dict] = []
    for round_ in range(MAX_SEARCH_ROUNDS):
        study, key = ("search", None) if round_ == 0 else (f"search-r{round_}", f"round {round_ + 1}")
        searcher = make_searcher(run, space, table, evaluator, table_target, study, splits.num_classes,
                                 supernet_paths)
        result = run.step(SearchStep(searcher, run.cfg.search.trials), key)
        result.write_csv(run.run_dir / ("trials.csv" if round_ == 0 else f"trials-r{round_}.csv"))
        ranked = result.top(len(result.trials))
        winners, rejected = run.step(ship_step(run, space, splits, ranked, target, None, state, settings), key)
        rejected_all += rejected
        fastest = table.min_latency(space)
        if winners or not rejected or table_target <= fastest:
            break
        typical = float(np.median([r["measured_ms"] / r["predicted_ms"] for r in rejected]))
        # Never below the fastest arch: there the search can only offer the fastest archs, measured like the rest.
        table_target = max(fastest, min(table_target, target / typical) * 0.98)
        note = (f"search round {round_ + 1}: every candidate measured over {target:g} ms (typically {typical:.2f}x "
                f"the prediction); searching again with the table's target at {table_target:.3f} ms")
        print(note, file=sys.stderr)
        run.notes.append(note)
    _drop_empty(run.run_dir / "winners" / ".staging")
    label = run.job.targets[0].label
    return result, [{"label": label, "target_ms": target, "winners": winners, "rejected": rejected_all}]


def search_family(run: Run, space, splits, table, evaluator, targets: Sequence[float], state: Shipping, settings,
                  supernet_paths: Sequence[str]) -> tuple[Any, list[dict]]:
    """Several budgets: one multi-objective study (accuracy, predicted latency) under the largest, with
    FAMILY_TRIALS times the trials of one budget; each budget ships from the trials within it.

    One study rather than one per budget: the Pareto front it approximates holds the best arch of every budget at
    once, and a trial scored for one budget serves them all, so the family costs one search."""
    margin = 1.0 - run.cfg.latency.margin
    searcher = make_searcher(run, space, table, evaluator, targets[-1] * margin, "search", splits.num_classes,
                             supernet_paths)
    result = run.step(SearchStep(searcher, run.cfg.search.trials))
    result.write_csv(run.run_dir / "trials.csv")
    ranked = result.top(len(result.trials))
    families = []
    for spec, target in zip(run.job.targets, targets, strict=True):
        candidates = [t for t in ranked if t.predicted_ms <= target * margin]
        step = ship_step(run, space, splits, candidates, target, spec.label, state, settings)
        winners, rejected = run.step(step, spec.label)
        families.append({"label": spec.label, "target_ms": target, "winners": winners, "rejected": rejected})
    run.notes.append(f"one multi-objective study of {run.cfg.search.trials} trials served the {len(targets)} budgets")
    _drop_empty(run.run_dir / "winners" / ".staging")
    return result, families


def ship_step(run: Run, space, splits, candidates, target_ms: float, label: str | None, state: Shipping,
              settings) -> ShipStep:
    """The ship step of one budget, measuring and retraining with the run's device, settings and recipe."""
    num_classes = splits.num_classes

    def retrain(arch, candidate, folder: Path) -> dict[str, Any]:
        return retrain_and_stage(run, space, splits, arch, candidate, target_ms, label, settings, folder)

    return ShipStep(state, tuple(candidates), target_ms, label, top_k=run.cfg.search.top_k, run_dir=run.run_dir,
                    decode=type(space.largest()).decode, cost=lambda arch: space.cost(arch, num_classes),
                    judge=lambda arch: judge_untrained(run, space, arch, num_classes, target_ms, settings),
                    retrain=retrain)


def _drop_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


# ---- report -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportStep(Step):
    """report.md and pareto.png, written every run: they report this run's notes and each step's seconds (the
    reference archs' measurements are kept in references.json, with the machine that measured them)."""

    name: ClassVar[str] = "report"
    artifact: ClassVar[str] = "report.md, pareto.png"
    run: Run
    space: Any
    table: Any
    evaluator: Any
    result: Any
    families: tuple[dict, ...]
    settings: Any
    splits: Any

    def make(self) -> None:
        report(self.run, self.space, self.splits, self.table, self.evaluator, self.result, list(self.families),
               self.settings)


def report(run: Run, space, splits, table, evaluator, result, families: list[dict], settings) -> None:
    from experiments.report import Marker, plot_pareto, write_report

    refs = []
    file = MachineFile(run.run_dir / "references.json", machine(run, settings))
    measured = file.read() or {"ms": {}}
    shared = measured_archs(run, space, settings)
    compared = compared_names(run.job)
    known = reference_points(space)
    for name, arch in {**space.contained_references(), **{n: known[n] for n in compared}}.items():
        if name not in measured["ms"]:
            record, _ = measure_arch(run, space, arch, settings, splits.num_classes, "reference", shared)
            measured["ms"][name] = record[f"{run.statistic}_ms"]
            measured = file.write(measured)
        refs.append({"name": name, "arch": arch.encode(), "predicted_ms": table.predict(arch),
                     "measured_ms": measured["ms"][name],
                     "accuracy": evaluator.evaluate(arch) if evaluator else float("nan"),
                     **(retrain_reference(run, space, splits, name, arch) if name in compared else {})})
    ref_markers = [Marker(r["name"].removeprefix("shufflenet_v2_"), r["predicted_ms"], r["accuracy"]) for r in refs]
    win_markers = [Marker(f"#{w['rank']}" + (f" {f['label']}" if run.family else ""), w["predicted_ms"],
                          w["search_accuracy"]) for f in families for w in f["winners"]]
    plot_pareto(result, run.run_dir / "pareto.png", ref_markers, win_markers,
                title=f"{space.name} on {run.device} ({run.runtime}, {run.statistic})",
                targets=[(f["label"], f["target_ms"]) for f in families])
    command = " ".join(map(shlex.quote, ["python", "search.py", *run.job.argv]))
    write_report(run.run_dir / "report.md", command=command, device=run.device, runtime=run.runtime,
                 statistic=run.statistic, fingerprint=table.fingerprint.to_dict(), result=result, families=families,
                 steps=run.steps, notes=run.notes, references=refs)


def retrain_reference(run: Run, space, splits, name: str, arch) -> dict[str, Any]:
    """`--compare-references`: `arch` retrained with the winners' recipe and seed (resumable, in
    RUN_DIR/references/<name>/retrain/), under `retrained` its validation and test accuracy (kept in
    RUN_DIR/references/<name>/result.json, so a rerun trains nothing)."""
    from search_space.files import atomic_write

    folder = run.run_dir / "references" / name
    path = folder / "result.json"
    if path.exists():
        return json.loads(path.read_text())
    trained = retrain_everywhere(run, space, splits, arch, folder / "retrain", "report: retraining references")
    result = {"retrained": {"val_accuracy": trained.val_accuracy, "test_accuracy": trained.test_accuracy,
                            "seed": run.cfg.seed, "recipe": run.cfg.to_dict()["retrain"]}}
    atomic_write(path, lambda f: json.dump(result, f, indent=1))
    return result


# The job's steps, in order: the progress lines are numbered from this list, and a rerun loads each step that is
# done (see `experiments.steps`).
PIPELINE: tuple[type[Step], ...] = (LutStep, TargetStep, CheckStep, SupernetStep, CalibrateStep, SearchStep, ShipStep,
                                    ReportStep)
STEPS = [step.name for step in PIPELINE]


def main(argv: list[str] | None = None) -> int:
    """The command line. Under torchrun, on every rank: each prints its own bad input (one line, exit code 2); rank
    0's exit code, whatever ends it, ends the other ranks with the same code."""
    from experiments.distributed import Crew, Dismissed, context_from_env, shutdown
    from searchers.base import SearchFailed

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    crew, code = None, 1  # 1: an unexpected exception, with its traceback
    try:
        ctx = context_from_env()
        crew = Crew.join(ctx) if ctx.distributed else None
        run_job(job_from_args(args, argv), crew)
        code = 0
    except Dismissed as e:  # a follower: rank 0 ended the job, and said why
        code = e.code
    except KeyboardInterrupt:
        code = 130
        if crew is None or crew.ctx.is_main:
            print("interrupted: rerun the same command to continue where it stopped", file=sys.stderr)
    except (ValueError, FileNotFoundError) as e:  # bad input: config, data, device, table, target
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        code = 2
    except SearchFailed as e:  # trials that failed for good: the study keeps the others
        print(f"error: {e}", file=sys.stderr)
        code = 1
    finally:
        if crew is not None:
            crew.finish(code)
        shutdown()
    return code


TOOLS = {  # `shufflenas TOOL ...`: the installed entry point to every command line of the project
    "search": ("search", "the whole job (what `python search.py` runs)"),
    "lut": ("latency_lut.__main__", "latency tables: profile, validate, show, measure"),
    "measure": ("latency_lut.__main__", "time a shipped model.onnx or model.pt2 (= lut measure)"),
    "train": ("experiments.train", "train a supernet or retrain an arch on its own"),
    "evaluate": ("experiments.evaluate", "score archs with a trained supernet"),
    "export": ("experiments.export", "export an arch with weights: arch.yaml, model.pt, model.pt2, model.onnx"),
    "space": ("search_space.__main__", "what a search space holds"),
}


def cli(argv: list[str] | None = None) -> int:
    """`shufflenas TOOL [ARGS]`, the console script a `pip install` puts on PATH; each tool is one of the
    project's command lines, with its own --help."""
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in TOOLS and argv[0] not in ("-h", "--help"):
        print(f"error: shufflenas: unknown tool {argv[0]!r} (tools: {', '.join(TOOLS)})", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, TOOLS))
        lines = [f"  {name:<{width}}  {what}" for name, (_, what) in TOOLS.items()]
        print("usage: shufflenas TOOL [ARGS]   (shufflenas TOOL --help for a tool's options)\n\ntools:\n"
              + "\n".join(lines))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(TOOLS[name][0])
    return int(module.main(["measure", *rest] if name == "measure" else rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
