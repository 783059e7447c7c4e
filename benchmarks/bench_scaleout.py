"""Trials per minute when a search scales out: 1, 2 and 3 Optuna workers on one PostgreSQL study, and a Ray
cluster of two nodes against one node. Each ratio is against one worker (one node) measured in the same run.

    .venv/bin/python benchmarks/bench_scaleout.py [--trials 40] [--ray-trials 24]

The objective is the real search path on the synthetic experiment: a supernet trained here (experiments/
synthetic.yaml, seconds), candidates scored with inherited weights and BatchNorm recalibration by the same
`SupernetEvaluatorFactory` search.py gives its Ray workers, the latency constraint from a CPU table of the tiny
space. Workers are separate processes (`OptunaSearcher.run` on one `postgresql://` study, as on several
machines); the Ray driver joins a `ray start` cluster of one CPU per node on 127.0.0.1, with token auth.
A throwaway PostgreSQL server (Debian's postgresql) and the Ray nodes run on this machine and are removed after.
Writes benchmarks/results/scaleout.md. Needs PostgreSQL and psycopg (pip install -e ".[postgres]").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import commit  # noqa: E402

SYNTHETIC = ROOT / "experiments" / "synthetic.yaml"
# Candidates are scored on more synthetic images than the tests use, so that a trial costs about what scoring
# costs in a real search (a few tenths of a second here) rather than only the study's bookkeeping.
BENCH_DATA = {"synthetic_size": 2048}  # validation: a quarter, 512 images
BENCH_EVALUATE = {"bn_calibration_images": 256, "val_images": None}
BENCH_SUPERNET = {"epochs": 1}
TARGET_FRACTION = 0.5  # the target sits halfway between the fastest and the slowest arch: it binds
OUT = ROOT / "benchmarks" / "results" / "scaleout.md"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _config(folder: Path) -> Path:
    """The synthetic experiment with the benchmark's data and scoring sizes, written into `folder`."""
    import yaml

    path = folder / "bench.yaml"
    if not path.exists():
        raw = yaml.safe_load(SYNTHETIC.read_text())
        raw["space"] = str((SYNTHETIC.parent / raw["space"]).resolve())
        raw["data"].update(BENCH_DATA)
        raw["evaluate"].update(BENCH_EVALUATE)
        raw["supernet"].update(BENCH_SUPERNET)
        path.write_text(yaml.safe_dump(raw))
    return path


def _factory(folder: Path):
    from experiments.factories import SupernetEvaluatorFactory

    return SupernetEvaluatorFactory(str(_config(folder)), "quick", str(folder / "supernet" / "supernet.pt"), seed=0,
                                    threads=1)


def _setup(folder: Path) -> float:
    """Train the supernet and profile the table once; returns the target (ms)."""
    from latency_lut import LatencyTable, Settings, profile
    from search_space import SearchSpace

    if not (folder / "supernet" / "supernet.pt").exists():
        subprocess.run([sys.executable, "-m", "experiments.train", "supernet", "--config", str(_config(folder)),
                        "--run-dir",
                        str(folder / "supernet"), "--threads", "2", "--no-progress", "--no-eval"],
                       check=True, cwd=ROOT, env=_env())
    space = SearchSpace.from_yaml(_space_path(folder))
    lut = folder / "tiny.json"
    if not lut.exists():
        profile(space, lut, "cpu", Settings(num_classes=10), progress=False)
    table = LatencyTable.load(lut)
    low, high = table.min_latency(space), table.max_latency(space)
    return low + TARGET_FRACTION * (high - low)


def _space_path(folder: Path) -> Path:
    from experiments.config import load_experiment

    return Path(load_experiment(_config(folder), "quick").space)


def _searcher_kwargs(folder: Path, target: float) -> dict:
    from latency_lut import LatencyTable
    from search_space import SearchSpace

    return {"space": SearchSpace.from_yaml(_space_path(folder)), "predictor": LatencyTable.load(folder / "tiny.json"),
            "target_ms": target}


# ---- the processes ------------------------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    """One Optuna worker: build the evaluator, wait for the start signal, search the shared study to the total."""
    from searchers.optuna_searcher import OptunaSearcher

    folder = Path(args.folder)
    evaluator = _factory(folder)()
    searcher = OptunaSearcher(evaluator=evaluator, storage=args.storage, seed=args.seed, progress=False,
                              enqueue_references=False, **_searcher_kwargs(folder, args.target))
    searcher.study()  # connected before the clock starts
    (folder / f"ready-{args.seed}").touch()
    while not (folder / "go").exists():
        time.sleep(0.005)
    searcher.run(args.trials)
    (folder / f"end-{args.seed}").write_text(repr(time.time()))


def ray_driver(args: argparse.Namespace) -> None:
    """The Ray driver: join the cluster, then time a whole search on it."""
    import ray

    from searchers.ray_searcher import RaySearcher

    folder = Path(args.folder)
    ray.init(address=args.address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    searcher = RaySearcher(evaluator_factory=_factory(folder), run_dir=folder / args.name, seed=0, progress=False,
                           max_concurrent=args.nodes, cpus_per_trial=1, enqueue_references=False,
                           **_searcher_kwargs(folder, args.target))
    start = time.time()
    result = searcher.run(args.trials)
    seconds = time.time() - start
    nodes = sorted({t.node for t in result.trials if t.state == "COMPLETE"})
    done = sum(t.state == "COMPLETE" for t in result.trials)
    (folder / f"{args.name}.json").write_text(json.dumps({"seconds": seconds, "complete": done, "nodes_used": nodes}))


# ---- the measurements ---------------------------------------------------------------------------------------------


def measure_postgres(folder: Path, target: float, trials: int, workers: int, pg) -> dict:
    import optuna

    from searchers.optuna_searcher import open_database

    url = pg.create_database(f"bench{workers}")
    for f in folder.glob("ready-*"):
        f.unlink()
    for f in [*folder.glob("end-*"), folder / "go"]:
        f.unlink(missing_ok=True)
    procs = [subprocess.Popen([sys.executable, __file__, "worker", "--folder", str(folder), "--storage", url,
                               "--seed", str(k), "--trials", str(trials), "--target", repr(target)], env=_env())
             for k in range(workers)]
    while len(list(folder.glob("ready-*"))) < workers:
        if any(p.poll() not in (None, 0) for p in procs):
            raise RuntimeError("a worker failed to start")
        time.sleep(0.01)
    start = time.time()
    (folder / "go").touch()
    if any(p.wait() != 0 for p in procs):
        raise RuntimeError("a worker failed")
    seconds = max(float(f.read_text()) for f in folder.glob("end-*")) - start
    study = optuna.load_study(study_name="shufflenas", storage=open_database(url, heartbeat_s=None))
    states = [t.state.name for t in study.trials]
    scored = [t.user_attrs["seconds"] for t in study.trials
              if t.state.name == "COMPLETE" and t.user_attrs.get("feasible")]
    return {"workers": workers, "seconds": seconds, "complete": states.count("COMPLETE"), "trials": len(states),
            "evaluated": len(scored), "score_s": sum(scored) / max(1, len(scored)),
            "per_min": 60 * states.count("COMPLETE") / seconds}


def measure_ray(folder: Path, target: float, trials: int, nodes: int) -> dict:
    from searchers.local_clusters import LocalRayCluster

    name = f"ray{nodes}"
    with LocalRayCluster(nodes=nodes, cpus_per_node=1) as cluster:
        subprocess.run([sys.executable, __file__, "ray-driver", "--folder", str(folder), "--address", cluster.address,
                        "--nodes", str(nodes), "--trials", str(trials), "--target", repr(target), "--name", name],
                       check=True, env=cluster.env(_env()))
    data = json.loads((folder / f"{name}.json").read_text())
    return {"nodes": nodes, **data, "per_min": 60 * data["complete"] / data["seconds"]}


def write(pg_rows: list[dict], ray_rows: list[dict], args: argparse.Namespace, seconds: float,
          load: tuple[float, float]) -> None:
    score_s = sum(r["score_s"] for r in pg_rows) / len(pg_rows)
    lines = [
        "# Scale-out: trials per minute",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_scaleout.py --trials {args.trials} --ray-trials "
        f"{args.ray_trials}` (whole run {seconds / 60:.1f} min).",
        f"Commit {commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {os.cpu_count()}-core "
        f"shared CPU ({platform.processor() or platform.machine()}), no GPU, other work running beside it.",
        "",
        f"Objective: the real search path on experiments/synthetic.yaml (tiny space) with {BENCH_DATA} and "
        f"evaluate {BENCH_EVALUATE}: candidates scored by a trained supernet with BatchNorm recalibration, one "
        f"torch thread each; target halfway across the space's latency range, so some trials are infeasible and "
        f"not evaluated. Mean scoring time of an evaluated trial: {score_s:.2f} s. Load average (1 min) at the "
        f"start and end: {load[0]:.1f}, {load[1]:.1f} on {os.cpu_count()} cores. Each ratio is against the first "
        f"row, measured in the same run.",
        "",
        "## Optuna workers on one PostgreSQL study",
        "",
        "Separate processes running `OptunaSearcher.run` on the same `postgresql://` study (a local PostgreSQL 15 "
        "server), started together once each has loaded its evaluator.",
        "",
        "| workers | complete trials | all trials | evaluated | seconds | trials / min | ratio to 1 worker |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in pg_rows:
        lines.append(f"| {r['workers']} | {r['complete']} | {r['trials']} | {r['evaluated']} | {r['seconds']:.1f} | "
                     f"{r['per_min']:.0f} | {r['per_min'] / pg_rows[0]['per_min']:.2f} |")
    lines += [
        "",
        "## Ray cluster: two nodes against one",
        "",
        "`ray start --head` (and `ray start --address` for the second node), `--num-cpus 1` each, on 127.0.0.1 "
        "with RAY_AUTH_MODE=token; the driver runs `RaySearcher` with one trial per node at a time. Each trial runs "
        "in a fresh Ray actor that loads the supernet and the data first (Tune does not reuse actors by default), "
        "so a Ray trial costs more than an Optuna worker's.",
        "",
        "| nodes | complete trials | nodes that ran trials | seconds | trials / min | ratio to 1 node |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ray_rows:
        lines.append(f"| {r['nodes']} | {r['complete']} | {len(r['nodes_used'])} | {r['seconds']:.1f} | "
                     f"{r['per_min']:.0f} | {r['per_min'] / ray_rows[0]['per_min']:.2f} |")
    lines += [
        "",
        f"The machine has {os.cpu_count()} cores: a third worker has no core of its own, so 3 workers cannot beat "
        "2 here; on machines with a core per worker the ratio is what scaling out buys.",
        "",
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    w = sub.add_parser("worker")
    w.add_argument("--folder", required=True)
    w.add_argument("--storage", required=True)
    w.add_argument("--seed", type=int, required=True)
    w.add_argument("--trials", type=int, required=True)
    w.add_argument("--target", type=float, required=True)
    d = sub.add_parser("ray-driver")
    for name in ("--folder", "--address", "--name"):
        d.add_argument(name, required=True)
    d.add_argument("--nodes", type=int, required=True)
    d.add_argument("--trials", type=int, required=True)
    d.add_argument("--target", type=float, required=True)
    parser.add_argument("--trials", type=int, default=40, help="trials of each PostgreSQL measurement")
    parser.add_argument("--ray-trials", type=int, default=24, help="trials of each Ray measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    if args.command == "worker":
        return worker(args)
    if args.command == "ray-driver":
        return ray_driver(args)

    from searchers.local_clusters import LocalPostgres

    began, load_start = time.time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="shufflenas-bench-") as tmp:
        folder = Path(tmp)
        target = _setup(folder)
        with LocalPostgres() as pg:
            pg_rows = []
            for n in args.workers:
                pg_rows.append(measure_postgres(folder, target, args.trials, n, pg))
                print(f"postgres, {n} worker(s): {pg_rows[-1]}", file=sys.stderr)
        ray_rows = []
        for nodes in (1, 2):
            row = measure_ray(folder, target, args.ray_trials, nodes)
            ray_rows.append(row)
            print(f"ray, {nodes} node(s): {row}", file=sys.stderr)
    write(pg_rows, ray_rows, args, time.time() - began, (load_start, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
