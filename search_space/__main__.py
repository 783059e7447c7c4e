"""`python -m search_space show SPACE.yaml [--sample N --seed S]`: what a space holds."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from search_space.space import SearchSpace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m search_space", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print the size, the extreme and reference archs of a space file")
    show.add_argument("space", help="path to a space YAML file, e.g. experiments/spaces/imagenet.yaml")
    show.add_argument("--sample", type=int, default=0, metavar="N", help="also print N sampled arch codes")
    show.add_argument("--seed", type=int, default=0, help="seed for --sample (default 0)")
    show.add_argument("--num-classes", type=int, default=1000, help="classifier size for params/FLOPs (default 1000)")
    args = parser.parse_args(argv)
    try:
        space = SearchSpace.from_yaml(args.space)
        if args.sample < 0:
            raise ValueError(f"--sample {args.sample}: must be >= 0")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    g = space.geometry
    print(f"space {space.name}: {space.size():,} architectures "
          f"({g.input_size}x{g.input_size}x{g.in_channels}, {g.stem_kind} stem, {len(space.stages)} stages)")
    rows = [("largest", space.largest()), ("smallest", space.smallest())]
    rows += list(space.contained_references().items())
    for label, arch in rows:
        cost = space.cost(arch, args.num_classes)
        print(f"  {label:<20} {cost.params / 1e6:7.3f} M params {cost.mflops:9.1f} MFLOPs  {arch.encode()}")
    rng = np.random.default_rng(args.seed)
    for _ in range(args.sample):
        print(space.sample(rng).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
