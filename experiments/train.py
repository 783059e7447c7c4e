"""Train the weight-sharing supernet, or retrain one arch alone, from an experiment file (the library is
`experiments.training`).

Command line (the same under `torchrun --nproc_per_node=N -m experiments.train ...` for data-parallel training)::

    python -m experiments.train supernet --config experiments/fashion_mnist.yaml --preset quick --run-dir runs/sn
    python -m experiments.train retrain --config experiments/fashion_mnist.yaml --preset quick --run-dir runs/ref \
        --arch shufflenet_v2_x0_5 [--supernet runs/sn/supernet.pt]

Rerunning the same command after a kill continues from the last checkpoint in RUN_DIR.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from experiments import distributed
from experiments.checkpoints import RunDirError, load_supernet, write_json
from experiments.config import ConfigError, ExperimentConfig, load_experiment
from experiments.data import Splits, load_splits
from experiments.evaluate import Evaluator
from experiments.training import retrain, train_supernets
from search_space import SearchSpace, SpaceError, Supernet, parse_arch, space_to_dict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("supernet", "train the weight-sharing supernet"), ("retrain", "train one arch alone")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", required=True, help="experiment YAML file, e.g. experiments/fashion_mnist.yaml")
        p.add_argument("--preset", default="quick", help="preset in the file (default: quick)")
        p.add_argument("--run-dir", required=True, help="checkpoints go here; rerun the same command to continue")
        p.add_argument("--device", default=None, help="override the config's device (cpu, cuda, cuda:N)")
        p.add_argument("--seed", type=int, default=None, help="override the config's seed")
        p.add_argument("--threads", type=int, default=None, help="torch intra-op CPU threads (default: torch's)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
        if name == "supernet":
            p.add_argument("--no-eval", action="store_true",
                           help="skip scoring the largest, smallest and reference archs after training")
        else:
            p.add_argument("--arch", required=True, help="arch code, reference name, 'largest' or 'smallest'")
            p.add_argument("--supernet", default=None,
                           help="fine-tune from this supernet checkpoint (sets retrain.from_supernet)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    except (ConfigError, SpaceError, RunDirError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


def _run(args: argparse.Namespace) -> int:
    cfg = load_experiment(args.config, args.preset)
    try:
        cfg = dataclasses.replace(
            cfg,
            seed=cfg.seed if args.seed is None else args.seed,
            device=args.device or cfg.device,
        )
        if args.command == "retrain" and args.supernet:
            cfg = dataclasses.replace(cfg, retrain=dataclasses.replace(cfg.retrain, from_supernet=True))
    except ValueError as e:
        raise ConfigError(f"command line: {e}") from None
    space = SearchSpace.from_yaml(cfg.space)
    try:
        ctx, device = distributed.setup(cfg.device)
    except ValueError as e:
        raise ConfigError(f"{cfg.source}: {e}") from None
    splits = load_splits(cfg.data, cfg.seed)
    progress = not args.no_progress
    run_dir = Path(args.run_dir)
    if args.command == "supernet":
        supernets = train_supernets(space, splits, cfg, run_dir, device=device, progress=progress, ctx=ctx)
        if ctx.is_main and not args.no_eval:
            _report_supernet(supernets, space, splits, cfg, run_dir, device)
        return 0
    try:
        arch = parse_arch(space, args.arch)
    except ValueError as e:
        raise ConfigError(f"--arch {args.arch}: {e}") from None
    if cfg.retrain.from_supernet and not args.supernet:
        raise ConfigError(f"{cfg.source}: retrain.from_supernet is true: pass --supernet RUN_DIR/supernet.pt")
    init_from = load_supernet(args.supernet, device) if args.supernet else None
    if init_from is not None and space_to_dict(init_from.space) != space_to_dict(space):
        raise ConfigError(f"--supernet {args.supernet}: trained on a different space than {cfg.space}")
    result = retrain(space, arch, splits, cfg, run_dir, device=device, init_from=init_from, progress=progress, ctx=ctx)
    if ctx.is_main and result is not None:
        print(f"{arch.encode()}: val {result.val_accuracy:.4f} test {result.test_accuracy:.4f} "
              f"({result.seconds / 60:.1f} min training) -> {result.model_path}")
    return 0


def _report_supernet(supernets: list[Supernet], space: SearchSpace, splits: Splits, cfg: ExperimentConfig,
                     run_dir: Path, device: str) -> None:
    """Score the largest, smallest and reference archs with recalibrated BN (the mean over the replicas); print them
    and add them to RUN_DIR/supernet.json."""
    evaluator = Evaluator(supernets, splits, cfg.evaluate, seed=cfg.seed, device=device)
    rows = [("largest", space.largest()), ("smallest", space.smallest()), *space.contained_references().items()]
    scores = {}
    for label, arch in rows:
        record = evaluator.score(arch)
        scores[label] = {"arch": arch.encode(), "val_accuracy": record.accuracy, "seconds": record.seconds}
        print(f"{label:<20} val {record.accuracy:.4f} ({record.seconds:.1f} s)  {arch.encode()}")
    summary_path = run_dir / "supernet.json"
    summary = json.loads(summary_path.read_text())
    summary["evaluation"] = scores
    write_json(summary_path, summary)


if __name__ == "__main__":
    sys.exit(main())
