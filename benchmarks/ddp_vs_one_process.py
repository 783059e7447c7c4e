"""How far a supernet trained by N data-parallel processes is from one trained by a single process.

    .venv/bin/python benchmarks/ddp_vs_one_process.py [--processes 2] [--config experiments/synthetic.yaml]

Trains the config's supernet (its quick preset, seed 0) three ways, on the CPU, one thread per process:
  - N processes with DDP (gloo), as `torchrun --nproc_per_node N search.py` trains it: steps of N x batch_size images;
  - one process with batch N x batch_size: the same images per step, in the same order, at the same learning rate;
  - one process with the recipe's batch_size: what a one-process search.py run trains.
and reports, for each one-process supernet, its weights' distance to the DDP one relative to the DDP weights' norm
(||a - b|| / ||a|| over every float tensor), beside how far training moved the DDP weights from their common start.
What remains between DDP and the same global batch is BatchNorm (statistics over batch_size images per process, not
N x batch_size) and the crops, drawn per rank: so all of it is done twice, with the config's augmentation and
without (BatchNorm alone). The figures are deterministic (seeded), not timings. Writes
benchmarks/results/ddp_vs_one_process.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from experiments.checkpoints import load_supernet
from experiments.config import load_experiment
from experiments.data import load_splits
from experiments.distributed import DistContext
from experiments.supernets import train_entry
from search_space import SearchSpace, Supernet

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "ddp_vs_one_process.md"


def _worker(rank: int, world_size: int, port: int, config: str, augment: bool, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        cfg = _with_augment(load_experiment(config, "quick"), augment)
        splits = load_splits(cfg.data, cfg.seed)
        space = SearchSpace.from_yaml(cfg.space)
        train_entry(Path(folder), cfg.seed, space, splits, cfg, device="cpu", progress=False,
                    ctx=DistContext(rank=rank, world_size=world_size, local_rank=rank))
    finally:
        dist.destroy_process_group()


def _with_augment(cfg, augment: bool):
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augment=augment))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    keys = [k for k in a if a[k].is_floating_point()]
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys)
    norm = sum(float(a[k].double().pow(2).sum()) for k in keys)
    return (diff / norm) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--config", default=str(ROOT / "experiments" / "synthetic.yaml"))
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    n = args.processes
    torch.set_num_threads(1)
    cfg = load_experiment(args.config, "quick")
    splits = load_splits(cfg.data, cfg.seed)
    space = SearchSpace.from_yaml(cfg.space)
    batch = cfg.supernet.batch_size
    labels = ["the common initial weights (how far DDP training moved them)",
              f"one process, batch {n} x {batch} (the same images per step)", f"one process, batch {batch}"]
    columns: dict[str, list[float]] = {}
    seconds = []
    augments = [True, False] if cfg.data.augment else [False]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        initial = Supernet(space, splits.num_classes).state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        for augment in augments:
            base = _with_augment(cfg, augment)
            start = time.perf_counter()
            folder = f"{tmp}/ddp-{augment}"
            mp.spawn(_worker, args=(n, _free_port(), args.config, augment, folder), nprocs=n, join=True)
            seconds.append(time.perf_counter() - start)
            ddp = load_supernet(Path(folder) / "supernet.pt").state_dict()
            column = [relative_distance(ddp, initial)]
            for size in (n * batch, batch):
                one = dataclasses.replace(base, supernet=dataclasses.replace(cfg.supernet, batch_size=size))
                net = train_entry(Path(tmp) / f"one-{size}-{augment}", cfg.seed, space, splits, one, device="cpu",
                                  progress=False)
                column.append(relative_distance(ddp, net.state_dict()))
            columns["crops and flips (the config's)" if augment else "no augmentation"] = column
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    config = Path(args.config).resolve().relative_to(ROOT) if Path(args.config).resolve().is_relative_to(ROOT) \
        else args.config
    r = cfg.supernet
    lines = [
        f"# A supernet trained by {n} data-parallel processes vs one process",
        "",
        f"`.venv/bin/python benchmarks/ddp_vs_one_process.py --processes {n} --config {config}`, commit {commit}, "
        f"{time.strftime('%Y-%m-%d')}, on a 2-core shared CPU without GPU (deterministic figures, not timings; "
        f"each {n}-process training took {max(seconds):.0f} s at most).",
        "",
        f"Recipe: {config} (quick preset): {len(splits.train)} training images, {r.epochs} epochs, batch_size "
        f"{batch}, lr {r.lr}, sampling {r.sampling}, seed {cfg.seed}. Distance: ||a - b|| / ||a|| over every float "
        f"tensor, a = the {n}-process (DDP, gloo) supernet.",
        "",
        "| distance to the DDP supernet | " + " | ".join(columns) + " |",
        "|---" * (1 + len(columns)) + "|",
        *[f"| {label} | " + " | ".join(f"{c[i]:.4f}" for c in columns.values()) + " |"
          for i, label in enumerate(labels)],
        "",
        f"With the same global batch ({n} x {batch} images per step, the same images in the same order) the two "
        f"differ only by BatchNorm (batch statistics over {batch} images per process, not {n * batch}) and, with "
        f"augmentation, by the crops (drawn per rank); without augmentation what is left is BatchNorm alone.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
