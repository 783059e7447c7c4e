"""Contracts of the ImageFolder pipeline: RandomResizedCrop against its definition, crops keyed by (seed, epoch,
index) whatever the workers, the decode-once cache, the GPU decoder's selection and its tensor path."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import experiments.data as data_module
from experiments.config import ConfigError, load_experiment
from experiments.data import (
    RRC_RATIO,
    RRC_SCALE,
    DataConfig,
    ImageFolderDataset,
    TensorImageDataset,
    cache_decoded,
    default_workers,
    load_splits,
    make_loader,
    random_resized_crop_box,
)

SIZE = 24  # the pipeline's output side in these tests: small, so decoding costs milliseconds


def _smooth(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random RGB image (bilinearly upsampled noise): JPEG keeps it close, resampling barely changes it."""
    from PIL import Image

    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))


def _write_tree(root: Path, per_class: int = 6, val_per_class: int = 2, side: tuple[int, int] = (40, 56)) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for cls in ("a_shirt", "b_shoe"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(_smooth(*side, rng)).save(folder / f"img{i}.JPEG", quality=95)


def _splits(root: Path, **kwargs):
    return load_splits(DataConfig(name="imagefolder", root=str(root), val_size=2, image_size=SIZE, **kwargs), seed=0)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jpeg-tree")
    _write_tree(root)
    return root


# --- RandomResizedCrop against its definition ----------------------------------------------------------------------


def test_random_resized_crop_areas_and_ratios_follow_the_definition() -> None:
    rng = np.random.default_rng(0)
    width = height = 1000
    boxes = np.array([random_resized_crop_box(width, height, rng) for _ in range(20000)])
    left, top, w, h = boxes.T
    area = w * h / (width * height)
    ratio = w / h
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= width).all() and (top + h <= height).all()
    # Rounding to whole pixels moves the area and ratio by at most ~1/500 here.
    assert area.min() >= RRC_SCALE[0] - 2e-3 and area.max() <= RRC_SCALE[1]
    assert ratio.min() >= RRC_RATIO[0] - 4e-3 and ratio.max() <= RRC_RATIO[1] + 4e-3
    # The whole ranges are reached.
    assert area.min() < 0.09 and area.max() > 0.97 and ratio.min() < 0.76 and ratio.max() > 1.32
    # Below an area share of 0.56 every draw fits a square image, so the accepted area is uniform there...
    low, mid = ((area >= 0.08) & (area < 0.32)).mean(), ((area >= 0.32) & (area < 0.56)).mean()
    assert low == pytest.approx(mid, rel=0.08)
    # ... and the aspect ratio log-uniform: symmetric about 1 in log space, flat in quarters of it.
    small = np.log(ratio[area < 0.5])
    assert abs(np.median(small)) < 0.02
    edges = np.linspace(math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]), 5)
    quarters = np.histogram(small, bins=edges)[0] / len(small)
    assert quarters == pytest.approx(np.full(4, 0.25), abs=0.02)
    # The position is uniform: crops of the smallest areas land all over the image.
    assert left[area < 0.1].min() < 50 and left[area < 0.1].max() > 600


def test_random_resized_crop_falls_back_to_a_centre_crop_of_clamped_ratio() -> None:
    rng = np.random.default_rng(0)
    # So elongated that no 3/4-4/3 crop of >= 8% of the area fits: the centre crop at ratio 4/3 (or 3/4).
    assert random_resized_crop_box(1000, 10, rng) == ((1000 - 13) // 2, 0, 13, 10)
    assert random_resized_crop_box(10, 1000, rng) == (0, (1000 - 13) // 2, 10, 13)
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    assert [random_resized_crop_box(300, 200, a) for _ in range(5)] == [random_resized_crop_box(300, 200, b)
                                                                        for _ in range(5)]


def test_training_images_are_the_resized_box_of_the_file(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "tree"
    _write_tree(root, per_class=3, val_per_class=1, side=(240, 320))  # big enough for JPEG draft (1/2, 1/4) scales
    splits = _splits(root, workers=0)
    dataset = splits.train
    flips = 0
    for index in range(len(dataset)):
        out = dataset._decode(index, True, 3, 1)
        rng = data_module._image_rng(3, 1, index)
        left, top, w, h = random_resized_crop_box(320, 240, rng)
        flipped = bool(rng.random() < 0.5)
        flips += flipped
        with Image.open(dataset.samples[index][0]) as image:  # the reference decodes at full size
            ref = image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=(left, top, left + w,
                                                                                             top + h))
        ref = np.asarray(ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else ref).astype(int)
        assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - ref).mean() < 4  # the reduced-scale JPEG decode keeps the same region
    assert 0 < flips < len(dataset)


def test_flips_happen_half_the_time() -> None:
    draws = [data_module._image_rng(0, 0, i) for i in range(4000)]
    flips = [random_resized_crop_box(64, 64, rng) and rng.random() < 0.5 for rng in draws]
    assert np.mean(flips) == pytest.approx(0.5, abs=0.03)


# --- determinism whatever the workers --------------------------------------------------------------------------------


def _by_index(loader) -> dict[int, torch.Tensor]:
    order = loader.indices().tolist()
    images = torch.cat([x for x, _ in loader.uint8_batches()])
    return {i: images[k] for k, i in enumerate(order)}


def test_crops_are_a_function_of_seed_epoch_and_index_whatever_the_workers(tree: Path) -> None:
    kwargs = {"shuffle": True, "augment": True, "seed": 4, "epoch": 2}
    batches = {}
    for workers in (0, 1, 2):
        train = _splits(tree, workers=workers).train
        batches[workers] = list(make_loader(train, batch_size=3, **kwargs))
    for workers in (1, 2):
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                   for a, b in zip(batches[0], batches[workers], strict=True))
    train = _splits(tree, workers=2).train
    # Another batch size and another rank split of the same epoch give each image the same crop.
    by_three = _by_index(make_loader(train, batch_size=3, **kwargs))
    by_five = _by_index(make_loader(train, batch_size=5, **kwargs))
    halves = {**_by_index(make_loader(train, batch_size=2, rank=0, world_size=2, **kwargs)),
              **_by_index(make_loader(train, batch_size=2, rank=1, world_size=2, **kwargs))}
    assert all(torch.equal(by_three[i], by_five[i]) and torch.equal(by_three[i], halves[i]) for i in by_three)
    # Another epoch or seed gives other crops; a second pass over the same epoch the same ones (a resumed run).
    other = _by_index(make_loader(train, batch_size=3, **{**kwargs, "epoch": 3}))
    assert sum(torch.equal(by_three[i], other[i]) for i in by_three) < len(by_three) / 2
    assert all(torch.equal(by_three[i], v) for i, v in _by_index(make_loader(train, batch_size=3, **kwargs)).items())


def test_an_abandoned_pass_leaves_the_workers_ready_for_the_next(tree: Path) -> None:
    train = _splits(tree, workers=2).train
    loader = make_loader(train, batch_size=2, shuffle=True, augment=True, seed=0)
    first = next(iter(loader))  # a training loop capped at max_steps_per_epoch stops early like this
    full = list(loader)
    assert torch.equal(first[0], full[0][0]) and len(full) == len(loader)


def test_default_workers_come_from_the_cores(tree: Path, monkeypatch) -> None:
    cores = len(__import__("os").sched_getaffinity(0))
    assert default_workers() == max(1, min(16, cores))
    assert _splits(tree).train.workers == default_workers()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 4))
    assert default_workers() == 1  # never none: torchrun's processes share the cores
    assert DataConfig(workers=3).identity() == DataConfig(workers=0, cache_dir="/x", eval_cache="off").identity()


# --- decoding once -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["memory", "file", "auto"])
def test_cache_holds_the_images_the_loader_decodes(tree: Path, tmp_path: Path, mode: str, monkeypatch) -> None:
    val = _splits(tree, workers=0, eval_cache=mode, cache_dir=str(tmp_path)).val
    indices = np.array([1, 0])
    cached = cache_decoded(val, indices, batch_size=1)
    assert isinstance(cached, TensorImageDataset) and len(cached) == 2
    plain = list(make_loader(val.subset(indices), batch_size=2, shuffle=False, augment=False, seed=0))
    again = list(make_loader(cached, batch_size=2, shuffle=False, augment=False, seed=0))
    assert torch.equal(plain[0][0], again[0][0]) and torch.equal(plain[0][1], again[0][1])
    files = list(tmp_path.glob("decoded-*.u8"))
    assert len(files) == (1 if mode == "file" else 0)
    if mode == "file":  # another process (or a rerun) maps the file and decodes nothing
        monkeypatch.setattr(ImageFolderDataset, "_decode", lambda *a: pytest.fail("decoded again"))
        assert torch.equal(cache_decoded(val, indices).images, cached.images)
        assert files[0].stat().st_size == 2 * 3 * SIZE * SIZE


def test_cache_off_keeps_decoding(tree: Path) -> None:
    val = _splits(tree, workers=0, eval_cache="off").val
    assert isinstance(cache_decoded(val, np.array([0])), ImageFolderDataset)


def test_evaluator_decodes_once_and_scores_as_without_cache(tree: Path, tmp_path: Path, monkeypatch) -> None:
    from experiments.config import EvaluateConfig
    from experiments.evaluate import Evaluator
    from search_space import SearchSpace, Supernet

    tiny = (Path(__file__).parents[2] / "experiments" / "spaces" / "tiny.yaml").read_text()
    rgb = tiny.replace("input: {size: 28, channels: 1}", f"input: {{size: {SIZE}, channels: 3}}")
    (tmp_path / "rgb.yaml").write_text(rgb)
    space = SearchSpace.from_yaml(tmp_path / "rgb.yaml")
    torch.manual_seed(0)
    supernet = Supernet(space, 2).eval()
    cfg = EvaluateConfig(bn_calibration_images=4, batch_size=3)
    decoded = []
    real_decode = ImageFolderDataset._decode
    monkeypatch.setattr(ImageFolderDataset, "_decode", lambda self, *a: decoded.append(1) or real_decode(self, *a))
    archs = [space.largest(), space.smallest()]
    scores = {}
    for mode in ("memory", "off"):
        before = len(decoded)
        evaluator = Evaluator(supernet, _splits(tree, workers=0, eval_cache=mode), cfg, seed=0)
        at_start = len(decoded)
        assert at_start - before == (4 + 2 if mode == "memory" else 0)  # calibration + validation images, here
        scores[mode] = [evaluator.score(a) for a in archs]
        assert len(decoded) - at_start == (0 if mode == "memory" else 2 * (4 + 2))
    assert [(r.accuracy, r.loss) for r in scores["memory"]] == [(r.accuracy, r.loss) for r in scores["off"]]


# --- GPU decoding --------------------------------------------------------------------------------------------------


def test_gpu_decoder_without_torchvision_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(data_module.importlib.util, "find_spec", lambda name: None)
    config = tmp_path / "exp.yaml"
    config.write_text("space: space.yaml\ndevice: cuda\ndata: {name: imagefolder, root: /data, decoder: torchvision}\n")
    with pytest.raises(ConfigError, match="torchvision is not installed") as info:
        load_experiment(config, None)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="decoder: expected one of pil, torchvision"):
        DataConfig(decoder="dali")


def test_gpu_decoder_on_a_cpu_device_is_refused(tmp_path: Path, monkeypatch, tree: Path) -> None:
    monkeypatch.setattr(data_module.importlib.util, "find_spec", lambda name: object())
    config = tmp_path / "exp.yaml"
    config.write_text("space: space.yaml\ndevice: cpu\ndata: {name: imagefolder, root: /data, decoder: torchvision}\n")
    with pytest.raises(ConfigError, match="decodes on a CUDA device, but device is 'cpu'"):
        load_experiment(config, None)
    train = _splits(tree, workers=0, decoder="torchvision").train
    with pytest.raises(ValueError, match="decodes on a CUDA device"):
        list(make_loader(train, batch_size=2, shuffle=False, augment=False, seed=0))


def test_gpu_path_crops_and_resizes_the_same_boxes(tree: Path, monkeypatch) -> None:
    """The device path with nvJPEG replaced by Pillow (no GPU here): same boxes, same flips, close pixels."""
    from PIL import Image

    def fake_decode_jpeg(files, device):
        out = []
        for data in files:
            import io

            with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
                out.append(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).to(device))
        return out

    monkeypatch.setattr(data_module, "_gpu_decode_jpeg", fake_decode_jpeg)
    train = _splits(tree, workers=0).train
    indices = (0, 3, 5)
    for augment in (True, False):
        files, labels = train._fetch_bytes((7, 1, augment, indices))
        on_device = train._decode_on_device(files, indices, augment, 7, 1, torch.device("cpu"))
        pixels, same_labels = train._fetch_pixels((7, 1, augment, indices))
        assert on_device.shape == pixels.shape == (3, 3, SIZE, SIZE) and on_device.dtype == torch.uint8
        assert torch.equal(labels, same_labels)
        assert (on_device.int() - pixels.int()).abs().float().mean() < 6  # resampling rounds differently


# --- the Fashion-MNIST JPEG tree -----------------------------------------------------------------------------------


def test_make_jpeg_tree_writes_an_imagefolder_tree_and_resumes(tmp_path: Path) -> None:
    import gzip

    from PIL import Image

    from benchmarks.make_jpeg_tree import class_folders, make_tree

    source = tmp_path / "fmnist"
    source.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        images, labels = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), np.arange(n) % 10
        for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            (source / f"{name}.gz").write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))
    out = tmp_path / "tree"
    assert make_tree(source, out, per_class=3, val_per_class=1, size=32, jobs=1, progress=False) == {
        "train": 30, "val": 10}
    assert sorted(p.name for p in (out / "train").iterdir()) == class_folders()
    files = sorted((out / "train").rglob("*.JPEG"))
    assert len(files) == 30 and len(list((out / "val").rglob("*.JPEG"))) == 10
    with Image.open(files[0]) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (32, 32))
    stamp = files[0].stat().st_mtime_ns
    make_tree(source, out, per_class=3, val_per_class=1, size=32, jobs=1, progress=False)  # a rerun skips them
    assert files[0].stat().st_mtime_ns == stamp
    splits = load_splits(DataConfig(name="imagefolder", root=str(out), val_size=5, image_size=SIZE, workers=0), 0)
    assert (splits.num_classes, len(splits.train), len(splits.test)) == (10, 25, 10)
    assert splits.classes[0] == "00_t-shirt-top"
