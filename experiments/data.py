"""Image classification data: Fashion-MNIST, CIFAR-10/100, ImageFolder trees and a synthetic set for tests.

``load_splits`` turns a :class:`DataConfig` into train / validation / test datasets; ``make_loader`` turns one of them
into batches of normalised float32 NCHW images and int64 labels.

The validation split is a seeded hold-out from the *training* data: the search ranks candidates on it, and the
official test split is only looked at for the final report. All loader randomness (shuffle order, crop offsets,
flips) comes from ``torch.Generator`` objects seeded from ``(seed, epoch)``, so a run resumed at an epoch boundary sees
bit-identical batches.

Small data sets are held in memory as uint8 tensors and batches are cut by tensor indexing; augmentation is applied
to the whole uint8 batch at once. ImageFolder trees (ImageNet layout) are decoded by a pool of worker processes (a
``torch.utils.data.DataLoader`` with persistent workers, prefetching and, for CUDA, pinned memory), or on the GPU with
``torchvision.io.decode_jpeg`` (``data.decoder: torchvision``). Their training augmentation is the standard
RandomResizedCrop (scale 0.08-1, aspect ratio 3/4-4/3) plus a horizontal flip; each image's crop and flip are a pure
function of ``(seed, epoch, index)``, so the batches do not depend on how many processes decode them.
:func:`cache_decoded` decodes a fixed set of images once (the evaluator's calibration and validation images) into a
uint8 tensor held in memory or in a memory-mapped file, so that scoring many candidates decodes nothing again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import importlib.util
import json
import math
import os
import pickle
import tempfile
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

DECODERS = ("pil", "torchvision")  # ImageFolder decoding: Pillow in worker processes, or nvJPEG on the CUDA device
EVAL_CACHES = ("auto", "memory", "file", "off")
RRC_SCALE = (0.08, 1.0)  # RandomResizedCrop: share of the image's area the crop covers (Inception, torchvision)
RRC_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop: crop width / height, drawn log-uniformly

_IDX_UBYTE = 0x08  # IDX type code for unsigned bytes, the only one Fashion-MNIST uses
_DEFAULT_IMAGEFOLDER_SIZE = 224
_MAX_DEFAULT_WORKERS = 16  # beyond this, decoding outruns one GPU and the processes only cost memory
_PREFETCH_BATCHES = 4  # batches each decoding worker keeps ready
_MEMORY_CACHE_BYTES = 2 << 30  # eval_cache auto: decoded images up to this size stay in memory, larger go to a file
_CACHE_FORMAT = 1  # bump when the decoding changes, so old cache files are not read
_SYNTHETIC_SIDE = 28
_SYNTHETIC_CLASSES = 10


@dataclass(frozen=True)
class DataConfig:
    """Which data set to load and how to split it.

    Attributes:
        name: One of :data:`DATASETS`.
        root: Directory holding the files. ``None`` means :data:`DEFAULT_FASHION_MNIST` for ``fashion_mnist``; it is
            required for ``cifar10``, ``cifar100`` and ``imagefolder`` and ignored for ``synthetic``.
        val_size: Number of training images held out for validation. Ignored for ``synthetic``, whose validation
            split has ``synthetic_size // 4`` images.
        image_size: ImageFolder: side length images are resized and cropped to (default 224). The other data sets
            are used at their native size; setting it to anything else is an error.
        augment: Whether training batches are augmented: ImageFolder data gets RandomResizedCrop and a horizontal flip;
            the small data sets a random padded crop and (where it keeps the label) a horizontal flip.
        synthetic_size: ``synthetic`` only: number of training images; validation and test have a quarter as many.
        workers: ImageFolder only: decoding processes per training process. ``None`` picks :func:`default_workers`
            (the cores this process may use, shared among torchrun's local processes); 0 decodes in the calling
            process.
        decoder: ImageFolder only: ``"pil"`` (Pillow, in the workers) or ``"torchvision"`` (JPEGs decoded on the CUDA
            device by ``torchvision.io.decode_jpeg``; needs torchvision and a CUDA device).
        eval_cache: ImageFolder only: where the evaluator keeps its calibration and validation images, decoded once:
            ``"memory"``, ``"file"`` (a memory-mapped uint8 file under ``cache_dir``, shared by processes that score
            the same images), ``"auto"`` (memory up to 2 GiB, else a file) or ``"off"`` (decoded again for every
            candidate).
        cache_dir: Folder for ``eval_cache`` files; ``None`` means a ``shufflenas`` folder in the system's temporary
            folder.
    """

    name: str = "fashion_mnist"  # one of DATASETS
    root: str | None = None  # directory with the files; None -> DEFAULT_FASHION_MNIST for fashion_mnist
    val_size: int = 5000  # images held out of the training split for validation (the search's score)
    image_size: int | None = None  # imagefolder: side in pixels (default 224); others: native size only
    augment: bool = True  # training: imagefolder RandomResizedCrop + flip; others a padded random crop (+ flip)
    synthetic_size: int = 512  # synthetic only: training images; val = test = synthetic_size // 4
    workers: int | None = None  # imagefolder: decoding processes; None = the cores available (<= 16); 0 = in-process
    decoder: str = "pil"  # imagefolder: "pil" (CPU workers) or "torchvision" (nvJPEG on the CUDA device)
    eval_cache: str = "auto"  # imagefolder: decoded scoring images kept in "memory", a "file", "auto" or "off"
    cache_dir: str | None = None  # imagefolder: folder of eval_cache files; None = <temp dir>/shufflenas

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"data.name: unknown dataset {self.name!r}, expected one of {', '.join(DATASETS)}")
        if self.root is not None and not isinstance(self.root, str):
            raise ValueError(f"data.root: expected a directory path string or None, got {self.root!r}")
        if self.root is None and self.name in ("cifar10", "cifar100", "imagefolder"):
            raise ValueError(f"data.root: {self.name} needs the directory holding its files, got None")
        if not _is_int(self.val_size) or self.val_size < 1:
            raise ValueError(f"data.val_size: expected an integer >= 1, got {self.val_size!r}")
        if self.image_size is not None and (not _is_int(self.image_size) or self.image_size < 8):
            raise ValueError(f"data.image_size: expected None or an integer >= 8, got {self.image_size!r}")
        if not isinstance(self.augment, bool):
            raise ValueError(f"data.augment: expected true or false, got {self.augment!r}")
        if not _is_int(self.synthetic_size) or self.synthetic_size < 4:
            # a quarter of it is the validation split, which must not be empty
            raise ValueError(f"data.synthetic_size: expected an integer >= 4, got {self.synthetic_size!r}")
        if self.workers is not None and (not _is_int(self.workers) or self.workers < 0):
            raise ValueError(f"data.workers: expected None or an integer >= 0, got {self.workers!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"data.decoder: expected one of {', '.join(DECODERS)}, got {self.decoder!r}")
        if self.decoder == "torchvision" and importlib.util.find_spec("torchvision") is None:
            raise ValueError(
                "data.decoder: 'torchvision' decodes JPEGs on the GPU with torchvision.io.decode_jpeg, but torchvision "
                f"is not installed (install the build that matches torch {torch.__version__}), or use decoder: pil"
            )
        if self.eval_cache not in EVAL_CACHES:
            raise ValueError(f"data.eval_cache: expected one of {', '.join(EVAL_CACHES)}, got {self.eval_cache!r}")
        if self.cache_dir is not None and not isinstance(self.cache_dir, str):
            raise ValueError(f"data.cache_dir: expected a directory path string or None, got {self.cache_dir!r}")

    def identity(self) -> dict[str, Any]:
        """The keys that decide which images a model sees, for run-directory checks: not where the files are, how
        many processes decode them or where decoded copies are kept. The default decoder is left out, so runs made
        before the decoder could be chosen keep their identity."""
        skip = {"root", "workers", "eval_cache", "cache_dir"} | ({"decoder"} if self.decoder == "pil" else set())
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def default_workers() -> int:
    """Decoding processes for one training process: the cores it may use, shared among the processes torchrun
    starts on this machine (``LOCAL_WORLD_SIZE``), between 1 and 16."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    processes = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(1, min(_MAX_DEFAULT_WORKERS, cores // processes))


class ImageDataset(Dataset, ABC):
    """A labelled image data set that hands out whole uint8 batches.

    ``dataset[i]`` returns ``(image, label)`` with the image as an un-augmented uint8 ``(C, H, W)`` tensor, so a
    plain ``torch.utils.data.DataLoader`` also works; :func:`make_loader` uses :meth:`load` instead.
    """

    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]  # per channel, in [0, 1] units
    std: tuple[float, ...]

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(
        self, indices: torch.Tensor, *, augment: bool, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the images at ``indices`` as uint8 ``(B, C, H, W)`` and their labels as int64 ``(B,)``.

        Args:
            indices: int64 positions into this data set.
            augment: Whether to apply the training augmentation.
            generator: The only source of randomness for the augmentation.
        """

    @abstractmethod
    def subset(self, indices: np.ndarray) -> ImageDataset:
        """Returns a data set of the images at ``indices``, in that order."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a data set of {len(self)} images")
        images, labels = self.load(torch.tensor([index % len(self)]), augment=False, generator=torch.Generator())
        return images[0], int(labels[0])


@dataclass(frozen=True, eq=False)
class TensorImageDataset(ImageDataset):
    """An in-memory data set of uint8 images; batches are cut by tensor indexing, with no per-image Python."""

    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int  # random-crop padding in pixels per side (black, applied before normalisation)
    flip: bool  # whether a horizontal flip keeps the label

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images: expected a uint8 (N, C, H, W) tensor, got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.images.shape[2] != self.images.shape[3]:
            raise ValueError(f"images: expected square images, got {tuple(self.images.shape[2:])}")
        if self.labels.dtype != torch.int64 or tuple(self.labels.shape) != (self.images.shape[0],):
            raise ValueError(
                f"labels: expected int64 ({self.images.shape[0]},), got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if len(self.mean) != self.images.shape[1] or len(self.std) != self.images.shape[1]:
            raise ValueError(
                f"mean/std: expected {self.images.shape[1]} values each, got {len(self.mean)} and {len(self.std)}"
            )
        if self.pad < 0:
            raise ValueError(f"pad: expected >= 0, got {self.pad}")

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[2])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def load(
        self, indices: torch.Tensor, *, augment: bool, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.images[indices]
        if augment:
            images = random_crop_flip(images, pad=self.pad, flip=self.flip, generator=generator)
        return images, self.labels[indices]

    def subset(self, indices: np.ndarray) -> TensorImageDataset:
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return TensorImageDataset(
            images=self.images[index].contiguous(),
            labels=self.labels[index].contiguous(),
            num_classes=self.num_classes,
            mean=self.mean,
            std=self.std,
            pad=self.pad,
            flip=self.flip,
        )


@dataclass(frozen=True, eq=False)
class ImageFolderDataset(ImageDataset):
    """Image files decoded on demand (ImageNet-style data that does not fit in memory).

    Evaluation resizes the shorter side to ``image_size * 256 / 224`` and takes the centre crop. Training takes a
    RandomResizedCrop (:func:`random_resized_crop_box`) resized to ``image_size`` and mirrors it half the time; the
    crop and the flip of image ``i`` come from a generator seeded with ``(seed, epoch, i)`` alone. :meth:`batches`
    decodes in ``workers`` persistent worker processes (or on the GPU, ``decoder="torchvision"``).
    """

    samples: tuple[tuple[str, int], ...]  # (file path, class index)
    classes: tuple[str, ...]  # class names, sorted; the index into this is the label
    image_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    workers: int = 0  # decoding processes; 0 decodes in the calling process
    decoder: str = "pil"  # one of DECODERS
    eval_cache: str = "auto"  # one of EVAL_CACHES: how cache_decoded keeps images decoded once
    cache_dir: str | None = None  # where eval_cache files go; None = <temp dir>/shufflenas

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size: expected >= 8, got {self.image_size}")
        if not _is_int(self.workers) or self.workers < 0:
            raise ValueError(f"workers: expected an integer >= 0, got {self.workers!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder: expected one of {', '.join(DECODERS)}, got {self.decoder!r}")
        if self.eval_cache not in EVAL_CACHES:
            raise ValueError(f"eval_cache: expected one of {', '.join(EVAL_CACHES)}, got {self.eval_cache!r}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return 3

    def __len__(self) -> int:
        return len(self.samples)

    def load(
        self, indices: torch.Tensor, *, augment: bool, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Direct use, in this process: the crops are keyed by one draw from `generator` and the image index.
        # Loaders go through `batches`, keyed by (seed, epoch, index) and decoded in the workers.
        key = int(torch.randint(0, 2**62, (1,), generator=generator)) if augment else 0
        return self._fetch_pixels((key, 0, augment, tuple(indices.tolist())))

    def batches(
        self, batches: Sequence[torch.Tensor], *, augment: bool, seed: int, epoch: int,
        device: str | torch.device = "cpu",
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Decodes ``batches`` (int64 index tensors) in order: uint8 ``(B, 3, S, S)`` images and int64 labels.

        With ``workers > 0`` the decoding runs ahead in this data set's persistent worker processes. With the
        ``torchvision`` decoder the workers only read the files and the images come back on ``device`` (CUDA).
        """
        device = torch.device(device)
        gpu = self.decoder != "pil"
        if gpu and device.type != "cuda":
            raise ValueError(f"data.decoder: {self.decoder!r} decodes on a CUDA device, but the data goes to {device}")
        keys = [(seed, epoch, augment, tuple(b.tolist())) for b in batches]
        if not keys:
            return
        if self.workers == 0:
            fetched: Iterator[Any] = (self._fetch(key, gpu) for key in keys)
            yield from (self._finish(item, key, gpu, device) for item, key in zip(fetched, keys, strict=True))
            return
        with _worker_pool(self, gpu=gpu, pin=device.type == "cuda" and not gpu) as loader:
            loader.sampler.keys = keys
            for item, key in zip(loader, keys, strict=True):
                yield self._finish(item, key, gpu, device)

    def subset(self, indices: np.ndarray) -> ImageFolderDataset:
        return dataclasses.replace(self, samples=tuple(self.samples[int(i)] for i in indices))

    # -- what a worker runs ----------------------------------------------------------------------------------------

    def _fetch(self, key: tuple[int, int, bool, tuple[int, ...]], gpu: bool) -> Any:
        return self._fetch_bytes(key) if gpu else self._fetch_pixels(key)

    def _fetch_pixels(self, key: tuple[int, int, bool, tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        seed, epoch, augment, indices = key
        labels = torch.tensor([self.samples[i][1] for i in indices], dtype=torch.int64)
        if not indices:
            return torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8), labels
        pixels = np.stack([self._decode(i, augment, seed, epoch) for i in indices])  # (B, S, S, 3)
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), labels

    def _fetch_bytes(self, key: tuple[int, int, bool, tuple[int, ...]]) -> tuple[list[torch.Tensor], torch.Tensor]:
        indices = key[3]
        files = [torch.frombuffer(bytearray(Path(self.samples[i][0]).read_bytes()), dtype=torch.uint8) for i in indices]
        return files, torch.tensor([self.samples[i][1] for i in indices], dtype=torch.int64)

    def _decode(self, index: int, augment: bool, seed: int, epoch: int) -> np.ndarray:
        """Image ``index`` decoded with Pillow and transformed: uint8 ``(S, S, 3)``."""
        from PIL import Image

        size = self.image_size
        with Image.open(self.samples[index][0]) as image:
            width, height = image.size
            if augment:
                rng = _image_rng(seed, epoch, index)
                left, top, w, h = random_resized_crop_box(width, height, rng)
                flip = bool(rng.random() < 0.5)
                # JPEG: decode at the smallest scale (1/2, 1/4, 1/8) that still leaves the crop >= size pixels.
                image.draft("RGB", (math.ceil(width * size / w), math.ceil(height * size / h)))
                fx, fy = image.size[0] / width, image.size[1] / height
                box = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
                out = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR, box=box)
                if flip:
                    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                return np.asarray(out, dtype=np.uint8)
            resize = int(size * 256 / 224)
            image.draft("RGB", (resize, resize))  # JPEG: decode at a reduced scale that still covers `resize`
            image = image.convert("RGB")
            width, height = image.size
            scale = resize / min(width, height)
            width, height = max(size, round(width * scale)), max(size, round(height * scale))
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        left, top = (width - size) // 2, (height - size) // 2
        return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)

    # -- what the calling process runs -----------------------------------------------------------------------------

    def _finish(
        self, item: Any, key: tuple[int, int, bool, tuple[int, ...]], gpu: bool, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not gpu:
            return item
        files, labels = item
        seed, epoch, augment, indices = key
        return self._decode_on_device(files, indices, augment, seed, epoch, device), labels

    def _decode_on_device(
        self, files: list[torch.Tensor], indices: Sequence[int], augment: bool, seed: int, epoch: int,
        device: torch.device,
    ) -> torch.Tensor:
        """JPEG bytes decoded on the GPU in one batched call, then cropped and resized there (the same crop boxes as
        the Pillow path; the resampling differs in rounding). Files that are not JPEGs are decoded with Pillow."""
        size = self.image_size
        jpeg = [k for k, data in enumerate(files) if len(data) > 2 and data[0] == 0xFF and data[1] == 0xD8]
        on_device = dict(zip(jpeg, _gpu_decode_jpeg([files[k] for k in jpeg], device), strict=True))
        out = []
        for k, index in enumerate(indices):
            image = on_device.get(k)
            if image is None:
                from PIL import Image

                with Image.open(self.samples[index][0]) as other:
                    pixels = np.array(other.convert("RGB"), dtype=np.uint8)
                image = torch.from_numpy(pixels).permute(2, 0, 1).to(device)
            _, height, width = image.shape
            if augment:
                rng = _image_rng(seed, epoch, index)
                left, top, w, h = random_resized_crop_box(width, height, rng)
                crop = _resize_uint8(image[:, top : top + h, left : left + w], size, size)
                out.append(crop.flip(-1) if rng.random() < 0.5 else crop)
            else:
                scale = int(size * 256 / 224) / min(width, height)
                width, height = max(size, round(width * scale)), max(size, round(height * scale))
                resized = _resize_uint8(image, height, width)
                top, left = (height - size) // 2, (width - size) // 2
                out.append(resized[:, top : top + size, left : left + size])
        return torch.stack(out)


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator, scale: tuple[float, float] = RRC_SCALE,
    ratio: tuple[float, float] = RRC_RATIO,
) -> tuple[int, int, int, int]:
    """The crop of RandomResizedCrop (Szegedy et al. 2015; torchvision's ``RandomResizedCrop.get_params``).

    Up to ten draws of an area share from ``U(scale)`` and an aspect ratio (width / height) from a log-uniform
    ``ratio`` range; the first crop that fits inside the image is placed uniformly at random. When none fits (very
    elongated images) the centre crop with the aspect ratio clamped into ``ratio`` is taken.

    Args:
        width: Image width in pixels.
        height: Image height in pixels.
        rng: The only source of randomness.
        scale: Range of the crop's area as a share of the image's.
        ratio: Range of the crop's width / height.

    Returns:
        ``(left, top, crop_width, crop_height)`` in pixels.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _image_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one image's augmentation in one epoch: the same whichever process decodes it."""
    return np.random.default_rng([seed, epoch, index, 0x11A6E])


def _gpu_decode_jpeg(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes (uint8 CPU tensors) to RGB uint8 ``(3, H, W)`` tensors on ``device``, in one nvJPEG batch."""
    if not files:
        return []
    from torchvision.io import ImageReadMode, decode_jpeg

    return list(decode_jpeg(files, mode=ImageReadMode.RGB, device=device))


def _resize_uint8(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear, antialiased resize of a uint8 ``(C, H, W)`` tensor, where it lives."""
    resized = torch.nn.functional.interpolate(
        image.unsqueeze(0).float(), size=(height, width), mode="bilinear", align_corners=False, antialias=True
    )
    return resized.round_().clamp_(0, 255).to(torch.uint8)[0]


class _Keys(torch.utils.data.Sampler):
    """The batches of the coming pass, set by the caller before each pass (the sampler runs in the calling process
    and sends each key to a worker; the workers themselves persist from pass to pass)."""

    def __init__(self) -> None:
        self.keys: list[Any] = []

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self.keys))

    def __len__(self) -> int:
        return len(self.keys)


class _DecodeSource(torch.utils.data.Dataset):
    """What each decoding worker holds: the data set; item ``key`` is one decoded batch (or its files' bytes)."""

    def __init__(self, dataset: ImageFolderDataset, gpu: bool) -> None:
        self.dataset, self.gpu = dataset, gpu

    def __getitem__(self, key: Any) -> Any:
        return self.dataset._fetch(key, self.gpu)


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)  # one decoding process per core: intra-op threads would only contend


_POOLS: OrderedDict[tuple[int, bool, bool], list[torch.utils.data.DataLoader]] = OrderedDict()
_POOLS_LOCK = threading.Lock()
_MAX_POOLS = 4  # idle worker pools kept (train, val, calibration, test of one run)


@contextlib.contextmanager
def _worker_pool(dataset: ImageFolderDataset, *, gpu: bool, pin: bool) -> Iterator[torch.utils.data.DataLoader]:
    """Lends one persistent-worker DataLoader of ``dataset``; a pass that is still running elsewhere (another
    thread) gets its own. Idle pools are kept for the next pass (the next epoch) and the oldest are shut down."""
    key = (id(dataset), gpu, pin)  # the pool holds the data set, so its id is not reused while the pool lives
    with _POOLS_LOCK:
        idle = _POOLS.get(key)
        loader = idle.pop() if idle else None
    if loader is None:
        loader = torch.utils.data.DataLoader(
            _DecodeSource(dataset, gpu), batch_size=None, sampler=_Keys(), num_workers=dataset.workers,
            pin_memory=pin, persistent_workers=True, prefetch_factor=_PREFETCH_BATCHES, worker_init_fn=_init_worker,
        )
    try:
        yield loader
    finally:
        with _POOLS_LOCK:
            _POOLS.setdefault(key, []).append(loader)
            _POOLS.move_to_end(key)
            while sum(len(pools) for pools in _POOLS.values()) > _MAX_POOLS:
                oldest = next(iter(_POOLS))
                _POOLS[oldest].pop(0)
                if not _POOLS[oldest]:
                    del _POOLS[oldest]


def cache_decoded(
    dataset: ImageDataset, indices: np.ndarray | torch.Tensor, *, batch_size: int = 256,
    device: str | torch.device = "cpu", what: str = "images",
) -> ImageDataset:
    """The images at ``indices``, un-augmented, decoded once into uint8 (for data sets scored again and again).

    In-memory data sets are simply subset. ImageFolder data is decoded (by its workers) into a uint8 tensor held in
    memory or in a memory-mapped file under its ``cache_dir``, per its ``eval_cache`` setting; the file is named by a
    hash of the files (paths, sizes, modification times) and the decoding settings, so other processes scoring the
    same images, and reruns, read it instead of decoding. ``eval_cache: off`` returns the subset undecoded.

    Args:
        dataset: A split from :func:`load_splits`.
        indices: Positions into ``dataset``, in the order wanted.
        batch_size: Images decoded per batch.
        device: Where the GPU decoder runs (``decoder: torchvision``); the cache itself is on the CPU.
        what: Names the images in the progress bar.

    Returns:
        A data set of ``len(indices)`` images whose un-augmented batches equal those of the subset.
    """
    subset = dataset.subset(np.asarray(indices, dtype=np.int64))
    if not isinstance(subset, ImageFolderDataset) or subset.eval_cache == "off" or len(subset) == 0:
        return subset
    shape = (len(subset), 3, subset.image_size, subset.image_size)
    mode = subset.eval_cache
    if mode == "auto":
        mode = "memory" if math.prod(shape) <= _MEMORY_CACHE_BYTES else "file"
    labels = torch.tensor([label for _, label in subset.samples], dtype=torch.int64)
    loader = make_loader(subset, batch_size=batch_size, shuffle=False, augment=False, seed=0, device=device)
    from tqdm.auto import tqdm

    def decoded() -> Iterator[torch.Tensor]:
        with tqdm(total=len(subset), desc=f"decoding {what}", unit="img", leave=False) as bar:
            for images, _ in loader.uint8_batches():
                bar.update(len(images))
                yield images.cpu()

    if mode == "memory":
        images = torch.empty(shape, dtype=torch.uint8)
        start = 0
        for batch in decoded():
            images[start : start + len(batch)] = batch
            start += len(batch)
    else:
        path = _cache_path(subset)
        if not path.is_file() or path.stat().st_size != math.prod(shape):
            from search_space.files import atomic_write

            # Streamed to a temporary file and renamed: a crash leaves no half-written cache for the next run.
            atomic_write(path, lambda f: [f.write(batch.numpy().tobytes()) for batch in decoded()], mode="wb")
        # Copy-on-write mapping: pages are read from the file as needed and shared between processes.
        images = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", shape=shape))
    return TensorImageDataset(
        images=images, labels=labels, num_classes=subset.num_classes, mean=subset.mean, std=subset.std, pad=0,
        flip=False,
    )


def _cache_path(dataset: ImageFolderDataset) -> Path:
    """The cache file of ``dataset``'s decoded images, named by what determines them."""
    files = []
    for path, label in dataset.samples:
        stat = os.stat(path)
        files.append((path, label, stat.st_size, stat.st_mtime_ns))
    identity = {"format": _CACHE_FORMAT, "size": dataset.image_size, "decoder": dataset.decoder, "files": files}
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:20]
    folder = Path(dataset.cache_dir) if dataset.cache_dir else Path(tempfile.gettempdir()) / "shufflenas"
    return folder / f"decoded-{len(dataset)}x{dataset.image_size}-{digest}.u8"


@dataclass(frozen=True)
class Splits:
    """The three splits of one data set and what a model needs to know about them.

    Attributes:
        train: Training images minus the held-out validation images.
        val: Seeded hold-out from the training data, used by the search.
        test: The official test split (ImageFolder: the ``val`` folder), for the final report only.
        num_classes: Number of classes; labels are ``0 .. num_classes - 1``.
        in_channels: 1 (Fashion-MNIST, synthetic) or 3.
        image_size: Side length of the square images the loaders produce.
        mean: Per-channel mean used for normalisation, in [0, 1] units.
        std: Per-channel standard deviation used for normalisation.
        classes: Class names, indexed by label (may be empty when the files carry none).
    """

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(
                f"mean/std: expected {self.in_channels} values each, got {len(self.mean)} and {len(self.std)}"
            )


def load_splits(config: DataConfig, seed: int) -> Splits:
    """Loads the data set named by ``config`` and holds out a seeded validation split from its training data.

    Args:
        config: Which data set, where it lives, and how many images to hold out.
        seed: Seeds the validation hold-out (and, for ``synthetic``, the images themselves).

    Returns:
        The train / val / test splits; the same seed always gives the same split.

    Raises:
        FileNotFoundError: The files are not where ``config.root`` points; the message says what was expected.
        ValueError: A file is corrupt, the split sizes do not fit, or ``config.image_size`` does not apply.
    """
    _check_seed(seed)
    classes: tuple[str, ...] = ()
    val_size = config.val_size
    if config.name == "fashion_mnist":
        train, test = _load_fashion_mnist(Path(config.root or DEFAULT_FASHION_MNIST))
        classes = FASHION_MNIST_CLASSES
    elif config.name in ("cifar10", "cifar100"):
        train, test, classes = _load_cifar(config.name, Path(_required_root(config)))
    elif config.name == "imagefolder":
        train, test = _load_imagefolder(Path(_required_root(config)), config)
        classes = train.classes
    else:
        val_size = config.synthetic_size // 4
        train, test = _make_synthetic(config.synthetic_size + val_size, val_size, seed)
        classes = tuple(f"class_{k}" for k in range(_SYNTHETIC_CLASSES))

    if config.name != "imagefolder" and config.image_size not in (None, train.image_size):
        raise ValueError(
            f"data.image_size: {config.name} images are {train.image_size}x{train.image_size} and are not resized, "
            f"got {config.image_size}; leave image_size unset"
        )
    train_idx, val_idx = split_indices(len(train), val_size, seed)
    return Splits(
        train=train.subset(train_idx),
        val=train.subset(val_idx),
        test=test,
        num_classes=train.num_classes,
        in_channels=train.in_channels,
        image_size=train.image_size,
        mean=train.mean,
        std=train.std,
        classes=classes,
    )


def split_indices(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits ``range(n)`` into sorted, disjoint train and validation indices with a seeded permutation.

    Args:
        n: Number of training images.
        val_size: How many of them go to validation; ``1 <= val_size < n``.
        seed: Seeds ``numpy.random.default_rng``; the same seed gives the same split.

    Returns:
        ``(train_indices, val_indices)``, int64 arrays of ``n - val_size`` and ``val_size`` entries.
    """
    _check_seed(seed)
    if not 1 <= val_size < n:
        raise ValueError(f"data.val_size: {val_size} must be >= 1 and below the {n} training images")
    order = np.random.default_rng(seed).permutation(n)
    # Sorted so the training subset keeps the file order (cache-friendly copies; the loader shuffles anyway).
    return np.sort(order[val_size:]).astype(np.int64), np.sort(order[:val_size]).astype(np.int64)


@dataclass(frozen=True, eq=False)
class Loader:
    """Batches of one data set for one epoch on one rank; build it with :func:`make_loader`.

    Iterating yields ``(images, labels)``: float32 ``(B, C, H, W)`` normalised with the data set's mean/std and
    int64 ``(B,)``, both on ``device``. Every iteration starts its generators afresh from ``(seed, epoch)``, so
    iterating twice, or in a resumed run, gives bit-identical batches.
    """

    dataset: ImageDataset
    batch_size: int
    shuffle: bool
    augment: bool
    seed: int
    epoch: int = 0
    rank: int = 0
    world_size: int = 1
    drop_last: bool = False  # drop this rank's last, smaller batch
    device: str | torch.device = "cpu"
    limit: int | None = None  # use only the first `limit` images of the (shuffled) order, across all ranks

    def __post_init__(self) -> None:
        _check_seed(self.seed)
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {self.batch_size!r}")
        if not _is_int(self.epoch) or self.epoch < 0:
            raise ValueError(f"epoch: expected an integer >= 0, got {self.epoch!r}")
        if not _is_int(self.world_size) or self.world_size < 1:
            raise ValueError(f"world_size: expected an integer >= 1, got {self.world_size!r}")
        if not _is_int(self.rank) or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={self.world_size}, got {self.rank!r}")
        if self.limit is not None and (not _is_int(self.limit) or self.limit < 1):
            raise ValueError(f"limit: expected None or an integer >= 1, got {self.limit!r}")

    @property
    def num_images(self) -> int:
        """Images this rank yields per pass (shards are padded by wrapping, so some may repeat)."""
        count = self._shard_size()
        return (count // self.batch_size) * self.batch_size if self.drop_last else count

    def __len__(self) -> int:
        count = self._shard_size()
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def indices(self) -> torch.Tensor:
        """This rank's int64 positions into the data set for this epoch, in batch order (before ``drop_last``)."""
        n = len(self.dataset)
        if self.shuffle:
            # Same generator on every rank: the ranks must agree on the order to take disjoint shares of it.
            order = torch.randperm(n, generator=_generator(self.seed, self.epoch, 0))
        else:
            order = torch.arange(n, dtype=torch.int64)
        if self.limit is not None:
            order = order[: self.limit]
        if len(order) == 0:
            return order
        total = self._shard_size() * self.world_size
        if total > len(order):
            # Pad by wrapping, as DistributedSampler does, so every rank runs the same number of steps.
            order = order.repeat(math.ceil(total / len(order)))[:total]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        channels = self.dataset.in_channels
        std = torch.tensor(self.dataset.std, dtype=torch.float32, device=self.device).view(1, channels, 1, 1)
        mean = torch.tensor(self.dataset.mean, dtype=torch.float32, device=self.device).view(1, channels, 1, 1)
        scale, shift = 1.0 / (255.0 * std), mean / std  # (x / 255 - mean) / std in one multiply-add
        for images, labels in self.uint8_batches():
            # uint8 crosses to the device (a quarter of the bytes of float32); the arithmetic happens there.
            images = images.to(self.device, non_blocking=True).float().mul_(scale).sub_(shift)
            yield images, labels.to(self.device, non_blocking=True)

    def uint8_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches before normalisation: uint8 ``(B, C, H, W)`` images and int64 labels, on the CPU (on the
        device with a GPU decoder)."""
        indices = self.indices()
        batches = [indices[b * self.batch_size : (b + 1) * self.batch_size] for b in range(len(self))]
        if isinstance(self.dataset, ImageFolderDataset):
            # Decoded in worker processes; each image's crop is keyed by (seed, epoch, index), not by the order.
            yield from self.dataset.batches(
                batches, augment=self.augment, seed=self.seed, epoch=self.epoch, device=self.device
            )
            return
        # Each rank crops and flips its own images differently; all of it reproducible from (seed, epoch, rank).
        generator = _generator(self.seed, self.epoch, 1, self.rank)
        for batch in batches:
            yield self.dataset.load(batch, augment=self.augment, generator=generator)

    def _shard_size(self) -> int:
        n = len(self.dataset) if self.limit is None else min(self.limit, len(self.dataset))
        return math.ceil(n / self.world_size)


def make_loader(
    dataset: ImageDataset,
    *,
    batch_size: int,
    shuffle: bool,
    augment: bool,
    seed: int,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    device: str | torch.device = "cpu",
    limit: int | None = None,
) -> Loader:
    """Builds the batches of ``dataset`` for one epoch on one rank.

    Args:
        dataset: A split from :func:`load_splits`.
        batch_size: Images per batch (per rank).
        shuffle: Whether to permute the images; the permutation is seeded from ``(seed, epoch)``.
        augment: Whether to apply the training augmentation (ImageFolder: RandomResizedCrop and a horizontal flip;
            the in-memory sets: a random padded crop and a horizontal flip where it applies).
        seed: The run's seed; with ``epoch`` and ``rank`` it is the loader's only source of randomness.
        epoch: Epoch number; each epoch gets a different order and different crops.
        rank: This process's rank among ``world_size`` data-parallel processes.
        world_size: Number of data-parallel processes; each rank gets a disjoint, equal-size share of the order,
            padded by wrapping around when the images do not divide evenly.
        drop_last: Drop the last batch when it is smaller than ``batch_size``.
        device: Where the batches are put.
        limit: Use only the first ``limit`` images of the order (e.g. 2000 for BatchNorm recalibration).

    Returns:
        A :class:`Loader`; ``len(loader)`` is the number of batches, iterating it yields ``(images, labels)``.
    """
    return Loader(
        dataset=dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        augment=augment,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
        device=device,
        limit=limit,
    )


def random_crop_flip(images: torch.Tensor, *, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Randomly crops a zero-padded uint8 batch back to its size and, if ``flip``, mirrors half of it.

    Vectorised: one gather over the padded batch with per-image row and column offsets, no loop over images.

    Args:
        images: uint8 ``(B, C, H, W)``.
        pad: Black border added on every side before cropping, in pixels.
        flip: Whether to mirror each image left-right with probability 1/2.
        generator: Source of the offsets and flips.

    Returns:
        A new uint8 ``(B, C, H, W)`` tensor.
    """
    batch, channels, height, width = images.shape
    if batch == 0:
        return images.clone()
    padded = images.new_zeros(batch, channels, height + 2 * pad, width + 2 * pad)
    padded[:, :, pad : pad + height, pad : pad + width] = images
    top = torch.randint(0, 2 * pad + 1, (batch, 1), generator=generator)
    left = torch.randint(0, 2 * pad + 1, (batch, 1), generator=generator)
    rows = top + torch.arange(height)  # (B, H)
    cols = torch.arange(width).expand(batch, width)
    if flip:
        mirrored = torch.rand(batch, 1, generator=generator) < 0.5
        cols = torch.where(mirrored, width - 1 - cols, cols)
    cols = left + cols  # (B, W)
    return padded[
        torch.arange(batch)[:, None, None, None],
        torch.arange(channels)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


# --- Fashion-MNIST -------------------------------------------------------------------------------------------------


def _load_fashion_mnist(root: Path) -> tuple[TensorImageDataset, TensorImageDataset]:
    splits = []
    for prefix in ("train", "t10k"):
        images = _read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"), ndim=3)
        labels = _read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"), ndim=1)
        if len(images) != len(labels):
            raise ValueError(f"fashion_mnist: {root}: {prefix} has {len(images)} images but {len(labels)} labels")
        _check_labels(labels, 10, f"{root}/{prefix}-labels-idx1-ubyte")
        splits.append(
            TensorImageDataset(
                images=torch.from_numpy(images.copy()).unsqueeze(1),
                labels=torch.from_numpy(labels.astype(np.int64)),
                num_classes=10,
                mean=FASHION_MNIST_MEAN,
                std=FASHION_MNIST_STD,
                pad=2,
                flip=True,  # clothing is left-right symmetric
            )
        )
    return splits[0], splits[1]


def _find_idx(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"fashion_mnist: no {name}(.gz) in {root}; install Debian's dataset-fashion-mnist "
        "(apt-get install dataset-fashion-mnist) or set data.root"
    )


def _read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """Reads an IDX file of unsigned bytes (gzip'd if the name ends in .gz), checking its header against its size."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as error:  # gzip raises BadGzipFile (an OSError) or EOFError on damaged files
        raise ValueError(f"{path}: cannot decompress: {error}") from error
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: {len(raw)} bytes is shorter than the {header}-byte IDX header")
    magic = int.from_bytes(raw[:4], "big")
    expected_magic = (_IDX_UBYTE << 8) | ndim
    if magic != expected_magic:
        raise ValueError(f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}")
    dims = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, but its header {dims} implies {expected}")
    if ndim == 3 and dims[1] != dims[2]:
        raise ValueError(f"{path}: expected square images, got {dims[1]}x{dims[2]}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


# --- CIFAR ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CifarLayout:
    """Where the official CIFAR python release keeps things."""

    subfolder: str  # the folder the tarball unpacks to
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str  # holds the class names only
    label_key: bytes
    names_key: bytes
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    url: str


_CIFAR = {
    "cifar10": _CifarLayout(
        subfolder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{k}" for k in range(1, 6)),
        test_file="test_batch",
        meta_file="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        num_classes=10,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    "cifar100": _CifarLayout(
        subfolder="cifar-100-python",
        train_files=("train",),
        test_file="test",
        meta_file="meta",
        label_key=b"fine_labels",  # the 100 fine classes, not the 20 coarse superclasses
        names_key=b"fine_label_names",
        num_classes=100,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
}


def _load_cifar(name: str, root: Path) -> tuple[TensorImageDataset, TensorImageDataset, tuple[str, ...]]:
    layout = _CIFAR[name]
    needed = [*layout.train_files, layout.test_file]
    subfolder = root / layout.subfolder
    folder = next((d for d in (root, subfolder) if all((d / f).is_file() for f in needed)), None)
    if folder is None:
        raise FileNotFoundError(
            f"{name}: no {', '.join(needed)} in {root} or {subfolder}; "
            f"download and unpack {layout.url} there, or set data.root"
        )

    def load(files: Sequence[str]) -> TensorImageDataset:
        parts = [_read_cifar_batch(folder / f, layout.label_key, layout.num_classes) for f in files]
        return TensorImageDataset(
            images=torch.from_numpy(np.concatenate([p[0] for p in parts])),
            labels=torch.from_numpy(np.concatenate([p[1] for p in parts])),
            num_classes=layout.num_classes,
            mean=layout.mean,
            std=layout.std,
            pad=4,
            flip=True,
        )

    classes: tuple[str, ...] = ()
    if (folder / layout.meta_file).is_file():  # class names only; the data is complete without them
        meta = _unpickle(folder / layout.meta_file)
        if layout.names_key in meta:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[layout.names_key])
    return load(layout.train_files), load([layout.test_file]), classes


def _read_cifar_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if b"data" not in batch or label_key not in batch:
        raise ValueError(f"{path}: expected keys b'data' and {label_key!r}, got {sorted(batch)}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: expected uint8 data of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise ValueError(f"{path}: {len(data)} images but {labels.size} labels")
    _check_labels(labels, num_classes, str(path))
    # Rows are stored channel-major (1024 red, 1024 green, 1024 blue), which is already CHW.
    return data.reshape(-1, 3, 32, 32), labels


def _unpickle(path: Path) -> dict:
    # pickle is only used for the official CIFAR python batches, a fixed, trusted format; never for other input.
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as error:
        raise ValueError(f"{path}: not a CIFAR python batch: {error}") from error
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a CIFAR python batch: expected a dict, got {type(obj).__name__}")
    return obj


# --- ImageFolder ---------------------------------------------------------------------------------------------------


def _load_imagefolder(root: Path, config: DataConfig) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    train_dir = root / "train"
    classes = tuple(sorted(d.name for d in train_dir.iterdir() if d.is_dir())) if train_dir.is_dir() else ()
    if not classes:
        raise FileNotFoundError(
            f"imagefolder: no class folders in {train_dir}; expected the ImageNet layout "
            f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg"
        )
    # ImageNet's test labels are private, so its `val` folder serves as the test split.
    test_dir = next((d for d in (root / "val", root / "test") if d.is_dir()), None)
    if test_dir is None:
        raise FileNotFoundError(
            f"imagefolder: no {root / 'val'} or {root / 'test'} folder; expected {root}/val/<class>/*.jpg"
        )
    index = {name: k for k, name in enumerate(classes)}
    train_samples = _scan_folder(train_dir, index)
    test_samples = _scan_folder(test_dir, index)
    settings = {
        "classes": classes,
        "image_size": config.image_size or _DEFAULT_IMAGEFOLDER_SIZE,
        "workers": default_workers() if config.workers is None else config.workers,
        "decoder": config.decoder,
        "eval_cache": config.eval_cache,
        "cache_dir": config.cache_dir,
    }
    return ImageFolderDataset(samples=train_samples, **settings), ImageFolderDataset(samples=test_samples, **settings)


def _scan_folder(folder: Path, index: dict[str, int]) -> tuple[tuple[str, int], ...]:
    samples = []
    for class_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
        if class_dir.name not in index:
            raise ValueError(f"imagefolder: class folder {class_dir} has no counterpart in the train folder")
        for dirpath, _, filenames in sorted(os.walk(class_dir, followlinks=True)):
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(dirpath, filename), index[class_dir.name]))
    if not samples:
        raise FileNotFoundError(f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}/<class>/")
    return tuple(samples)


# --- synthetic -----------------------------------------------------------------------------------------------------


def _make_synthetic(n_train: int, n_test: int, seed: int) -> tuple[TensorImageDataset, TensorImageDataset]:
    """Noisy copies of ten fixed random block patterns: learnable in a few steps, and made without touching disk."""
    rng = np.random.default_rng([seed, 0x5E7])  # its own stream, so it does not echo the split's permutation
    block = 4  # pattern cells of 4x4 pixels survive the 2-pixel crop jitter
    cells = rng.integers(0, 2, size=(_SYNTHETIC_CLASSES, _SYNTHETIC_SIDE // block, _SYNTHETIC_SIDE // block))
    prototypes = (40.0 + 175.0 * cells).repeat(block, axis=1).repeat(block, axis=2)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = rng.integers(0, _SYNTHETIC_CLASSES, size=n)
        images = prototypes[labels] + rng.normal(0.0, 40.0, size=(n, _SYNTHETIC_SIDE, _SYNTHETIC_SIDE))
        images = np.clip(np.rint(images), 0, 255).astype(np.uint8)[:, None]
        return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))

    (train_images, train_labels), (test_images, test_labels) = draw(n_train), draw(n_test)
    pixels = train_images.double() / 255.0
    mean, std = (float(pixels.mean()),), (float(pixels.std()),)

    def dataset(images: torch.Tensor, labels: torch.Tensor) -> TensorImageDataset:
        # no flip: the random patterns are not mirror-symmetric
        return TensorImageDataset(
            images=images, labels=labels, num_classes=_SYNTHETIC_CLASSES, mean=mean, std=std, pad=2, flip=False
        )

    return dataset(train_images, train_labels), dataset(test_images, test_labels)


# --- helpers -------------------------------------------------------------------------------------------------------


def _generator(*key: int) -> torch.Generator:
    """A torch generator seeded from a tuple of non-negative ints, e.g. ``(seed, epoch, stream)``."""
    state = np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _required_root(config: DataConfig) -> str:
    if config.root is None:  # DataConfig rejects this already; kept so the type checker sees a str
        raise ValueError(f"data.root: {config.name} needs the directory holding its files, got None")
    return config.root


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{where}: labels span {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}")


def _check_seed(seed: int) -> None:
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
