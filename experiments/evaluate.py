"""Scoring candidates with the supernet's shared weights: BatchNorm recalibration, then validation accuracy.

The running statistics a supernet's BatchNorm layers collect during training are a blend over every arch it trained,
so they fit none in particular. Before an arch is scored, its statistics are reset and recomputed on a fixed set of
training images (a cumulative average, as `momentum=None` gives), which is what makes one-shot accuracies track
trained-from-scratch accuracies (SPOS, OFA). This is done on `supernet.extract(arch)`, a private copy: the shared
weights are never touched, so scoring can run on several threads at once.

The calibration and validation images are decoded once, when the `Evaluator` is built (`experiments.data.
cache_decoded`: ImageFolder images go to a uint8 tensor in memory or a memory-mapped file, `data.eval_cache`), so
every candidate after that reads tensors and decodes nothing.

Command line::

    python -m experiments.evaluate --config experiments/fashion_mnist.yaml --supernet runs/sn/supernet.pt \
        --arch shufflenet_v2_x0_5 --arch largest
    # replicas (supernet.replicas: 2): --supernet runs/sn/supernet.pt runs/sn/replica1/supernet.pt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from experiments.checkpoints import load_supernet
from experiments.config import ConfigError, EvaluateConfig, load_experiment
from experiments.data import ImageDataset, ImageFolderDataset, Splits, cache_decoded, load_splits, make_loader
from search_space import Arch, Supernet, parse_arch, space_to_dict
from search_space.network import ShuffleNetV2

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]

# Keep the normalised (float32) batches when they fit in this many bytes; larger sets are normalised again per arch,
# from their decoded uint8 copies.
_FLOAT_BATCH_BYTES = 1 << 30


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Batches, arch: Arch | None = None) -> nn.Module:
    """Reset every BatchNorm's running statistics and recompute them as the plain average over `batches`.

    Args:
        model: a plain network (recalibrated in place), or a `Supernet` (then `arch` is required and a calibrated
            copy of `supernet.extract(arch)` is returned; the supernet itself is left untouched).
        batches: (images, labels) pairs; labels are ignored. The same batches give bit-identical statistics.
        arch: the subnet to recalibrate when `model` is a supernet.

    Returns:
        The recalibrated plain network, in eval mode.
    """
    if isinstance(model, Supernet):
        if arch is None:
            raise ValueError("recalibrate_bn: a supernet needs the arch to recalibrate")
        model = model.extract(arch)
    elif arch is not None and getattr(model, "arch", arch) != arch:
        raise ValueError(f"recalibrate_bn: the model is {model.arch}, not {arch}")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch weighs the same, whatever the order
    model.train()
    seen = 0
    try:
        for images, _ in batches:
            model(images)
            seen += 1
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    if seen == 0:
        raise ValueError("recalibrate_bn: no calibration batches")
    return model


@torch.no_grad()
def accuracy(model: nn.Module, batches: Batches) -> float:
    """Top-1 accuracy in [0, 1] of `model` (put in eval mode) over `batches`."""
    return accuracy_and_loss(model, batches)[0]


@torch.no_grad()
def accuracy_and_loss(model: nn.Module, batches: Batches) -> tuple[float, float]:
    """Top-1 accuracy in [0, 1] and mean cross-entropy (no label smoothing) of `model` (put in eval mode) over
    `batches`, from one forward pass."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64)
    loss = torch.zeros((), dtype=torch.float64)
    total = 0
    for images, labels in batches:
        logits = model(images).float()
        correct += (logits.argmax(1) == labels).sum().cpu()
        loss += F.cross_entropy(logits, labels, reduction="sum").double().cpu()
        total += len(labels)
    if total == 0:
        raise ValueError("accuracy: no images")
    return int(correct) / total, float(loss) / total


def calibration_indices(dataset: ImageDataset, cfg: EvaluateConfig, *, seed: int) -> torch.Tensor:
    """Positions of the BatchNorm calibration images: the first `cfg.bn_calibration_images` of a seeded shuffle."""
    loader = make_loader(
        dataset, batch_size=cfg.batch_size, shuffle=True, augment=False, seed=seed, epoch=0,
        limit=cfg.bn_calibration_images,
    )
    return loader.indices()


def calibration_batches(
    dataset: ImageDataset, cfg: EvaluateConfig, *, seed: int, device: str | torch.device = "cpu"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed BatchNorm calibration set: the first `cfg.bn_calibration_images` of a seeded shuffle of `dataset`.

    The images are not augmented, so the statistics match what the network sees at validation time.
    """
    images = cache_decoded(dataset, calibration_indices(dataset, cfg, seed=seed), batch_size=cfg.batch_size,
                           device=device, what="calibration images")
    return list(make_loader(images, batch_size=cfg.batch_size, shuffle=False, augment=False, seed=seed, device=device))


@dataclass(frozen=True)
class EvalRecord:
    """One scored candidate: what `Evaluator.score` returns."""

    arch: str  # arch code
    accuracy: float  # validation accuracy in [0, 1] after recalibration
    loss: float  # mean validation cross-entropy: it ranked archs closer to retraining than accuracy (BENCHMARKS.md)
    seconds: float  # wall time of the whole evaluation: extraction, recalibration and scoring


class Evaluator:
    """Scores archs with the supernet's weights: `score(arch)` gives the validation accuracy and loss, and
    `evaluate(arch)` the accuracy alone (the interface searchers call).

    The calibration images (chosen once, seeded) and the validation images are decoded once, here, and kept as
    uint8 tensors (in memory, or memory-mapped for large ImageFolder sets; `data.eval_cache`); small sets are kept
    as ready float batches. Each call extracts the arch, recalibrates its BatchNorm statistics and scores it, so
    calls are independent of each other and of their order, and safe from several threads. Given several supernets
    (replicas of one recipe, `supernet.replicas`), an arch's accuracy and loss are the means over them, each
    recalibrated on the same images.

    Args:
        supernet: trained shared weights (not modified), or a sequence of replicas.
        splits: the data; calibration uses `splits.train`, scoring `splits.val`.
        cfg: calibration size, validation limit and batch size.
        seed: picks the calibration images.
        device: where calibration and scoring run.
    """

    def __init__(
        self, supernet: Supernet | Sequence[Supernet], splits: Splits, cfg: EvaluateConfig, *, seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.supernets = [supernet] if isinstance(supernet, Supernet) else list(supernet)
        if not self.supernets:
            raise ValueError("Evaluator: no supernet given")
        self.cfg = cfg
        self.device = torch.device(device)
        count = min(len(splits.val), cfg.val_images or len(splits.val))
        self.calibration = self._batches(
            cache_decoded(splits.train, calibration_indices(splits.train, cfg, seed=seed), batch_size=cfg.batch_size,
                          device=self.device, what="calibration images"), seed)
        self._val = self._batches(
            cache_decoded(splits.val, torch.arange(count), batch_size=cfg.batch_size, device=self.device,
                          what="validation images"), seed)
        self._lock = threading.Lock()
        self.records: list[EvalRecord] = []

    def _batches(self, images: ImageDataset, seed: int) -> Batches:
        loader = make_loader(images, batch_size=self.cfg.batch_size, shuffle=False, augment=False, seed=seed,
                             device=self.device)
        if isinstance(images, ImageFolderDataset):  # data.eval_cache: off; decoded again for every candidate
            return loader
        size = len(images) * images.in_channels * images.image_size**2 * 4
        return list(loader) if size <= _FLOAT_BATCH_BYTES else loader

    def model(self, arch: Arch, replica: int = 0) -> ShuffleNetV2:
        """The plain network for `arch` with one replica's shared weights and recalibrated BatchNorm statistics (eval
        mode)."""
        return recalibrate_bn(self.supernets[replica], self.calibration, arch)

    def score(self, arch: Arch) -> EvalRecord:
        """Validation accuracy in [0, 1] and mean loss of `arch` with the shared weights, after BatchNorm
        recalibration (the means over the replicas), and the seconds it took."""
        start = time.perf_counter()
        scores = [accuracy_and_loss(self.model(arch, k), self._val) for k in range(len(self.supernets))]
        record = EvalRecord(arch=arch.encode(), accuracy=statistics.fmean(a for a, _ in scores),
                            loss=statistics.fmean(x for _, x in scores), seconds=time.perf_counter() - start)
        with self._lock:
            self.records.append(record)
        return record

    def evaluate(self, arch: Arch) -> float:
        """Validation accuracy in [0, 1] of `arch`: `score(arch).accuracy`."""
        return self.score(arch).accuracy

    @property
    def mean_seconds(self) -> float:
        """Mean seconds per evaluated candidate so far."""
        if not self.records:
            raise ValueError("Evaluator: nothing evaluated yet")
        return sum(r.seconds for r in self.records) / len(self.records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML file")
    parser.add_argument("--preset", default="quick", help="preset in the file (default: quick)")
    parser.add_argument("--supernet", required=True, nargs="+",
                        help="supernet checkpoint (RUN_DIR/supernet.pt); several: replicas, scored by their mean")
    parser.add_argument("--arch", action="append", required=True,
                        help="arch code, reference name, 'largest' or 'smallest' (repeatable)")
    parser.add_argument("--device", default=None, help="override the config's device")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = load_experiment(args.config, args.preset)
        device = args.device or cfg.device
        supernets = [load_supernet(path, device=device) for path in args.supernet]
        supernet = supernets[0]
        if any(space_to_dict(other.space) != space_to_dict(supernet.space) for other in supernets[1:]):
            raise ConfigError(f"--supernet {' '.join(args.supernet)}: the replicas were trained on different spaces")
        archs = [parse_arch(supernet.space, text) for text in args.arch]
        splits = load_splits(cfg.data, cfg.seed)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    evaluator = Evaluator(supernets, splits, cfg.evaluate, seed=cfg.seed, device=device)
    for arch in archs:
        record = evaluator.score(arch)
        cost = supernet.space.cost(arch, supernet.num_classes)
        print(f"{record.accuracy:.4f}  loss {record.loss:.4f}  {record.seconds:6.1f} s  {cost.mflops:7.1f} MFLOPs"
              f"  {arch.encode()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
