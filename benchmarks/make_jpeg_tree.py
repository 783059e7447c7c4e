"""Write the real Fashion-MNIST images as an ImageNet-style tree of JPEG files, to run the ImageFolder pipeline on.

    python benchmarks/make_jpeg_tree.py --out data/fmnist-jpeg --per-class 300 --val-per-class 50

gives ROOT/train/<class>/*.JPEG (from Fashion-MNIST's training split) and ROOT/val/<class>/*.JPEG (from its test
split): each 28 x 28 greyscale image upsampled (bicubic) to --size pixels and stored as a three-channel JPEG, the
way ImageNet's files are. --per-class and --val-per-class take the first images of each class in file order, so a
tree of a few thousand images takes under a minute on two cores; leave them out for all 70,000. Rerunning the
command skips the files already written (each is written to a temporary name and renamed), so an interrupted run
continues. Point an experiment's data.root at ROOT, e.g.::

    python search.py --config experiments/imagenet.yaml --preset cpu --target-ms 20 --device cpu  # data.root: ROOT
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.data import DEFAULT_FASHION_MNIST, FASHION_MNIST_CLASSES, _find_idx, _read_idx  # noqa: E402

_CHUNK = 200  # images per task handed to a writing process


def class_folders() -> list[str]:
    """Folder names of the ten classes, sorted as their labels are: ``00_t-shirt-top``, ``01_trouser``, ..."""
    slugs = (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") for name in FASHION_MNIST_CLASSES)
    return [f"{k:02d}_{slug}" for k, slug in enumerate(slugs)]


def select(labels: np.ndarray, per_class: int | None) -> np.ndarray:
    """Positions of the first ``per_class`` images of each class (all when None), in file order."""
    if per_class is None:
        return np.arange(len(labels))
    keep = np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in range(10)])
    return np.sort(keep)


def _write(task: tuple[list[tuple[str, np.ndarray]], int, int]) -> int:
    from PIL import Image

    items, size, quality = task
    for path, pixels in items:
        image = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        tmp = f"{path}.{os.getpid()}.tmp"
        image.save(tmp, format="JPEG", quality=quality)
        os.replace(tmp, path)  # whole files only: a rerun skips what exists
    return len(items)


def make_tree(source: Path, out: Path, *, per_class: int | None, val_per_class: int | None, size: int = 224,
              quality: int = 90, jobs: int | None = None, progress: bool = True) -> dict[str, int]:
    """Writes the tree; returns the number of files per split (written now or before)."""
    from tqdm.auto import tqdm

    if size < 8:
        raise ValueError(f"--size: expected >= 8 pixels, got {size}")
    if not 1 <= quality <= 95:
        raise ValueError(f"--quality: expected 1-95 (Pillow's useful JPEG range), got {quality}")
    for name, value in (("--per-class", per_class), ("--val-per-class", val_per_class)):
        if value is not None and value < 1:
            raise ValueError(f"{name}: expected >= 1, got {value}")
    folders = class_folders()
    todo: list[tuple[str, np.ndarray]] = []
    counts = {}
    for split, prefix, limit in (("train", "train", per_class), ("val", "t10k", val_per_class)):
        images = _read_idx(_find_idx(source, f"{prefix}-images-idx3-ubyte"), ndim=3)
        labels = _read_idx(_find_idx(source, f"{prefix}-labels-idx1-ubyte"), ndim=1)
        chosen = select(labels, limit)
        counts[split] = len(chosen)
        for folder in folders:
            (out / split / folder).mkdir(parents=True, exist_ok=True)
        for i in chosen:
            path = out / split / folders[labels[i]] / f"fmnist_{prefix}_{i:05d}.JPEG"
            if not path.exists():
                todo.append((str(path), images[i]))
    tasks = [(todo[k : k + _CHUNK], size, quality) for k in range(0, len(todo), _CHUNK)]
    with tqdm(total=len(todo), desc="writing JPEG files", unit="img", disable=not progress) as bar:
        if jobs == 1 or len(tasks) <= 1:
            for task in tasks:
                bar.update(_write(task))
        else:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                for done in pool.map(_write, tasks):
                    bar.update(done)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the tree's root folder (train/ and val/ go in it)")
    parser.add_argument("--source", default=DEFAULT_FASHION_MNIST, help="folder of the Fashion-MNIST IDX files")
    parser.add_argument("--per-class", type=int, default=None, help="training images per class (default: all 6000)")
    parser.add_argument("--val-per-class", type=int, default=None, help="val images per class (default: all 1000)")
    parser.add_argument("--size", type=int, default=224, help="side of the written images in pixels (default 224)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    parser.add_argument("--jobs", type=int, default=None, help="writing processes (default: one per core)")
    args = parser.parse_args(argv)
    try:
        counts = make_tree(Path(args.source), Path(args.out), per_class=args.per_class,
                           val_per_class=args.val_per_class, size=args.size, quality=args.quality, jobs=args.jobs)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {counts['train']} training and {counts['val']} val images, {args.size} px JPEG, 10 classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
