"""Contracts of experiments/data.py: every file format on small fixtures, the seeded split, and the loader."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.data import (
    DEFAULT_FASHION_MNIST,
    DataConfig,
    Splits,
    TensorImageDataset,
    load_splits,
    make_loader,
    random_crop_flip,
    split_indices,
)

# --- fixture writers -----------------------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray, *, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def _tagged_images(n: int, channels: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """Random uint8 images whose pixel (0, 0, 0) holds the image's index, so a split can be traced back."""
    images = rng.integers(0, 256, size=(n, channels, side, side), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    return images


def _write_fashion_mnist(root: Path, *, gz: bool, n_train: int = 12, n_test: int = 5) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte", _tagged_images(n, 1, 28, rng)[:, 0], gz=gz)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz=gz)


def _cifar_rows(n: int) -> np.ndarray:
    """(n, 3072) rows in the official layout; channel c of image i is filled with 10 * i + c."""
    planes = 10 * np.arange(n)[:, None, None] + np.arange(3)[None, :, None]
    return np.broadcast_to(planes, (n, 3, 1024)).reshape(n, 3072).astype(np.uint8)


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _write_cifar10(folder: Path, per_batch: int = 4, n_test: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(1, 6):
        start = (k - 1) * per_batch
        labels = [(start + i) % 10 for i in range(per_batch)]
        data = _cifar_rows(start + per_batch)[start:]
        _pickle(folder / f"data_batch_{k}", {b"batch_label": b"x", b"labels": labels, b"data": data})
    _pickle(folder / "test_batch", {b"labels": [i % 10 for i in range(n_test)], b"data": _cifar_rows(n_test)})
    _pickle(folder / "batches.meta", {b"label_names": [f"c{k}".encode() for k in range(10)]})


def _write_cifar100(folder: Path, n_train: int = 10, n_test: int = 4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = [(7 * i) % 100 for i in range(n)]
        coarse = [f // 5 for f in fine]
        _pickle(folder / name, {b"fine_labels": fine, b"coarse_labels": coarse, b"data": _cifar_rows(n)})
    _pickle(folder / "meta", {b"fine_label_names": [f"f{k}".encode() for k in range(100)]})


def _write_imagefolder(root: Path, test_name: str = "val") -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 3), (test_name, 1)):
        for cls in ("dog", "cat"):  # written out of order: classes must come back sorted
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                width, height = 30 + 7 * i, 24 + 3 * i  # landscape, varied sizes
                pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
                image = Image.fromarray(pixels)
                if i == 1:
                    image = image.convert("L")  # a greyscale file must still come back as RGB
                image.save(folder / f"img{i}.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")


def _synthetic(size: int = 64, seed: int = 0) -> Splits:
    return load_splits(DataConfig(name="synthetic", synthetic_size=size), seed=seed)


def _shard_labels(dataset: TensorImageDataset, rank: int, **kwargs) -> torch.Tensor:
    """The labels rank ``rank`` of two sees in one pass."""
    loader = make_loader(dataset, batch_size=3, shuffle=True, augment=False, rank=rank, world_size=2, **kwargs)
    return torch.cat([labels for _, labels in loader])


# --- formats -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_files_load_with_shapes_labels_and_split(tmp_path: Path, gz: bool) -> None:
    _write_fashion_mnist(tmp_path, gz=gz)
    splits = load_splits(DataConfig(name="fashion_mnist", root=str(tmp_path), val_size=3), seed=0)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 1, 28)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 5)
    assert splits.train.images.shape == (9, 1, 28, 28) and splits.train.images.dtype == torch.uint8
    assert splits.mean == (0.2860,) and splits.std == (0.3530,)
    # Every training image lands in exactly one of train/val, with its own label.
    tags = torch.cat([splits.train.images[:, 0, 0, 0], splits.val.images[:, 0, 0, 0]]).long()
    labels = torch.cat([splits.train.labels, splits.val.labels])
    assert sorted(tags.tolist()) == list(range(12))
    assert torch.equal(labels, tags % 10)
    assert splits.test.labels.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("subfolder", ["", "cifar-10-batches-py"])
def test_cifar10_pickles_load_in_chw_order(tmp_path: Path, subfolder: str) -> None:
    _write_cifar10(tmp_path / subfolder if subfolder else tmp_path)
    splits = load_splits(DataConfig(name="cifar10", root=str(tmp_path), val_size=5), seed=1)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 3, 32)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, 3)
    assert splits.classes == tuple(f"c{k}" for k in range(10))
    images = torch.cat([splits.train.images, splits.val.images])
    labels = torch.cat([splits.train.labels, splits.val.labels])
    index = images[:, 0, 0, 0].long() // 10
    assert sorted(index.tolist()) == list(range(20))
    assert torch.equal(labels, index % 10)
    # Rows are red plane, green plane, blue plane: channel c of every pixel holds 10 * i + c.
    expected = (10 * index[:, None, None, None] + torch.arange(3)[None, :, None, None]).expand(-1, 3, 32, 32)
    assert torch.equal(images.long(), expected)
    assert splits.test.images.shape == (3, 3, 32, 32)


@pytest.mark.parametrize("subfolder", ["", "cifar-100-python"])
def test_cifar100_pickles_use_fine_labels(tmp_path: Path, subfolder: str) -> None:
    _write_cifar100(tmp_path / subfolder if subfolder else tmp_path)
    splits = load_splits(DataConfig(name="cifar100", root=str(tmp_path), val_size=2), seed=0)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (100, 3, 32)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 4)
    assert splits.test.labels.tolist() == [0, 7, 14, 21]
    assert splits.classes[:2] == ("f0", "f1") and len(splits.classes) == 100
    assert splits.mean == (0.5071, 0.4865, 0.4409)


@pytest.mark.parametrize("test_name", ["val", "test"])
def test_imagefolder_tree_decodes_resizes_and_crops(tmp_path: Path, test_name: str) -> None:
    _write_imagefolder(tmp_path, test_name)
    splits = load_splits(DataConfig(name="imagefolder", root=str(tmp_path), val_size=2, image_size=16), seed=0)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (2, 3, 16)
    assert splits.classes == ("cat", "dog")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4, 2, 2)
    assert sorted(label for _, label in splits.test.samples) == [0, 1]
    image, label = splits.test[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and label == 0

    loader = make_loader(splits.train, batch_size=3, shuffle=True, augment=True, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 2
    assert [tuple(x.shape) for x, _ in batches] == [(3, 3, 16, 16), (1, 3, 16, 16)]
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in batches)
    again = list(make_loader(splits.train, batch_size=3, shuffle=True, augment=True, seed=0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))


def test_imagefolder_eval_is_a_centre_crop_of_the_resized_image(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    # Left third red, middle third green, right third blue: a centre crop of the resized image is all green.
    pixels = np.zeros((30, 90, 3), dtype=np.uint8)
    pixels[:, :30, 0], pixels[:, 30:60, 1], pixels[:, 60:, 2] = 255, 255, 255
    for folder in ("train", "val"):
        Image.fromarray(pixels).save(tmp_path / folder / "a" / "x.png")
    Image.fromarray(pixels).save(tmp_path / "train" / "a" / "y.png")
    splits = load_splits(DataConfig(name="imagefolder", root=str(tmp_path), val_size=1, image_size=14), seed=0)
    image, _ = splits.test[0]
    assert image.shape == (3, 14, 14)
    assert (image[1] > 200).all() and (image[0] < 50).all() and (image[2] < 50).all()


def test_synthetic_is_seeded_sized_and_learnable() -> None:
    splits = _synthetic(size=256, seed=3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (256, 64, 64)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 1, 28)
    assert torch.equal(_synthetic(size=256, seed=3).train.images, splits.train.images)
    assert not torch.equal(_synthetic(size=256, seed=4).train.images, splits.train.images)
    # A nearest-class-mean classifier fit on train must do far better than chance (10%) on test.
    x_train, y_train = splits.train.images.flatten(1).float(), splits.train.labels
    centroids = torch.stack([x_train[y_train == k].mean(0) for k in range(10)])
    predicted = torch.cdist(splits.test.images.flatten(1).float(), centroids).argmin(1)
    assert (predicted == splits.test.labels).float().mean() > 0.9


@pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST).is_dir(), reason=f"{DEFAULT_FASHION_MNIST} is not installed")
def test_real_fashion_mnist() -> None:
    splits = load_splits(DataConfig(val_size=5000), seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (55000, 5000, 10000)
    for split in (splits.train, splits.val, splits.test):
        assert split.labels.min() == 0 and split.labels.max() == 9
    pixels = splits.train.images.double() / 255
    assert abs(pixels.mean() - splits.mean[0]) < 0.01 and abs(pixels.std() - splits.std[0]) < 0.01


# --- errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10", "cifar100", "imagefolder"])
def test_missing_directory_names_the_path(tmp_path: Path, name: str) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as error:
        load_splits(DataConfig(name=name, root=str(missing), val_size=1), seed=0)
    message = str(error.value)
    assert str(missing) in message and "\n" not in message


def test_missing_fashion_mnist_file_says_how_to_get_it(tmp_path: Path) -> None:
    _write_fashion_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.*dataset-fashion-mnist"):
        load_splits(DataConfig(root=str(tmp_path), val_size=1), seed=0)


def test_incomplete_cifar10_lists_expected_files(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_1, data_batch_2"):
        load_splits(DataConfig(name="cifar10", root=str(tmp_path), val_size=1), seed=0)


@pytest.mark.parametrize("gz", [True, False])
def test_corrupt_idx_magic_is_a_value_error_naming_the_file(tmp_path: Path, gz: bool) -> None:
    _write_fashion_mnist(tmp_path, gz=gz)
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    raw = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    raw[3] = 1  # claims one dimension
    path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*magic"):
        load_splits(DataConfig(root=str(tmp_path), val_size=1), seed=0)


def test_truncated_idx_and_bad_gzip_are_value_errors(tmp_path: Path) -> None:
    _write_fashion_mnist(tmp_path, gz=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.*bytes"):
        load_splits(DataConfig(root=str(tmp_path), val_size=1), seed=0)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz"):
        load_splits(DataConfig(root=str(tmp_path), val_size=1), seed=0)


def test_corrupt_cifar_pickle_is_a_value_error(tmp_path: Path) -> None:
    _write_cifar100(tmp_path)
    (tmp_path / "train").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="train"):
        load_splits(DataConfig(name="cifar100", root=str(tmp_path), val_size=1), seed=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "mnist"}, "unknown dataset 'mnist'"),
        ({"val_size": 0}, "val_size"),
        ({"val_size": True}, "val_size"),
        ({"name": "cifar10"}, "data.root"),
        ({"image_size": 4}, "image_size"),
        ({"synthetic_size": 3}, "synthetic_size"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


def test_val_size_must_leave_training_images(tmp_path: Path) -> None:
    _write_fashion_mnist(tmp_path, gz=True)
    with pytest.raises(ValueError, match="val_size: 12"):
        load_splits(DataConfig(root=str(tmp_path), val_size=12), seed=0)


def test_image_size_only_applies_to_imagefolder(tmp_path: Path) -> None:
    _write_fashion_mnist(tmp_path, gz=True)
    load_splits(DataConfig(root=str(tmp_path), val_size=1, image_size=28), seed=0)  # the native size is fine
    with pytest.raises(ValueError, match="image_size.*28x28"):
        load_splits(DataConfig(root=str(tmp_path), val_size=1, image_size=32), seed=0)


# --- split ---------------------------------------------------------------------------------------------------------


def test_split_is_disjoint_covering_sized_and_seeded() -> None:
    train, val = split_indices(100, 20, seed=5)
    assert (len(train), len(val)) == (80, 20)
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted([*train.tolist(), *val.tolist()]) == list(range(100))
    same_train, same_val = split_indices(100, 20, seed=5)
    assert np.array_equal(train, same_train) and np.array_equal(val, same_val)
    assert not np.array_equal(val, split_indices(100, 20, seed=6)[1])


@pytest.mark.parametrize(("n", "val_size"), [(10, 0), (10, 10), (10, -1)])
def test_split_rejects_sizes_that_do_not_fit(n: int, val_size: int) -> None:
    with pytest.raises(ValueError, match=f"val_size: {val_size}"):
        split_indices(n, val_size, seed=0)


def test_load_splits_same_seed_same_split(tmp_path: Path) -> None:
    _write_cifar10(tmp_path, per_batch=20)
    config = DataConfig(name="cifar10", root=str(tmp_path), val_size=30)
    first, second, other = (load_splits(config, seed=s) for s in (7, 7, 8))
    assert torch.equal(first.val.images, second.val.images) and torch.equal(first.train.images, second.train.images)
    assert not torch.equal(first.val.images, other.val.images)


# --- loader --------------------------------------------------------------------------------------------------------


def _small_dataset(n: int) -> TensorImageDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 8, 8).contiguous()
    return TensorImageDataset(images, torch.arange(n), num_classes=n, mean=(0.5,), std=(0.25,), pad=2, flip=True)


def test_loader_is_deterministic_per_seed_and_epoch() -> None:
    train = _synthetic().train
    kwargs = {"batch_size": 16, "shuffle": True, "augment": True}
    loader = make_loader(train, seed=1, epoch=2, **kwargs)
    first = list(loader)
    for again in (list(loader), list(make_loader(train, seed=1, epoch=2, **kwargs))):  # e.g. a resumed run
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    other_epoch = list(make_loader(train, seed=1, epoch=3, **kwargs))
    assert not torch.equal(first[0][1], other_epoch[0][1])
    # The crops change with the epoch too, not only the order.
    unshuffled = {"batch_size": 16, "shuffle": False, "augment": True, "seed": 1}
    epoch2, epoch3 = (next(iter(make_loader(train, epoch=e, **unshuffled)))[0] for e in (2, 3))
    assert not torch.equal(epoch2, epoch3)
    other_seed = list(make_loader(train, seed=2, epoch=2, **kwargs))
    assert not torch.equal(first[0][1], other_seed[0][1])


def test_loader_yields_every_image_once_and_len_countslist() -> None:
    dataset = _small_dataset(10)
    loader = make_loader(dataset, batch_size=4, shuffle=True, augment=False, seed=0)
    batches = list(loader)
    assert len(loader) == len(batches) == 3 and loader.num_images == 10
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(10))
    dropped = make_loader(dataset, batch_size=4, shuffle=True, augment=False, seed=0, drop_last=True)
    assert len(dropped) == len(list(dropped)) == 2 and dropped.num_images == 8


def test_loader_normalises_with_the_dataset_mean_and_std() -> None:
    train = _synthetic().train
    images, labels = next(iter(make_loader(train, batch_size=8, shuffle=False, augment=False, seed=0)))
    assert images.dtype == torch.float32 and labels.dtype == torch.int64 and images.shape == (8, 1, 28, 28)
    expected = (train.images[:8].float() / 255 - train.mean[0]) / train.std[0]
    torch.testing.assert_close(images, expected)
    assert torch.equal(labels, train.labels[:8])


@pytest.mark.parametrize("n", [10, 7, 1])
def test_shards_are_equal_sized_and_cover_the_data(n: int) -> None:
    dataset = _small_dataset(n)
    shards = [_shard_labels(dataset, rank, seed=4) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == -(-n // 2)
    assert set(torch.cat(shards).tolist()) == set(range(n))
    if n % 2 == 0:
        assert set(shards[0].tolist()).isdisjoint(shards[1].tolist())


def test_limit_caps_the_images_across_ranks() -> None:
    dataset = _small_dataset(50)
    loader = make_loader(dataset, batch_size=4, shuffle=True, augment=False, seed=0, limit=9)
    labels = torch.cat([y for _, y in loader])
    assert len(loader) == 3 and len(labels) == 9 and len(set(labels.tolist())) == 9
    # Two ranks share the same 9 images (one repeated to even out the shards), never a 10th.
    shards = [_shard_labels(dataset, rank, seed=0, limit=9) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert set(torch.cat(shards).tolist()) == set(labels.tolist())


def test_augmentation_keeps_shape_and_dtype_and_changes_images() -> None:
    train = _synthetic().train
    kwargs = {"batch_size": 32, "shuffle": False, "seed": 0}
    plain = list(make_loader(train, augment=False, **kwargs))
    augmented = list(make_loader(train, augment=True, **kwargs))
    for (x, y), (x_aug, y_aug) in zip(plain, augmented, strict=True):
        assert x_aug.shape == x.shape and x_aug.dtype == x.dtype and torch.equal(y, y_aug)
    changed = torch.cat([(x != x_aug).flatten(1).any(1) for (x, _), (x_aug, _) in zip(plain, augmented, strict=True)])
    assert changed.float().mean() > 0.5


def test_random_crop_flip_takes_a_window_of_the_zero_padded_image() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 2, 6, 6), dtype=torch.uint8, generator=generator)
    out = random_crop_flip(images, pad=2, flip=False, generator=generator)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    windows = {(top, left) for top in range(5) for left in range(5)}
    seen = set()
    for b in range(64):
        match = [w for w in windows if torch.equal(out[b], padded[b, :, w[0] : w[0] + 6, w[1] : w[1] + 6])]
        assert match, f"image {b} is not a crop of its padded original"
        seen.update(match)
    assert len(seen) > 10  # the offsets really vary


def test_random_crop_flip_mirrors_about_half() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (200, 3, 5, 5), dtype=torch.uint8, generator=generator)
    out = random_crop_flip(images, pad=0, flip=True, generator=generator)
    same = (out == images).flatten(1).all(1)
    mirrored = (out == images.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert 60 < int(mirrored.sum()) < 140


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"limit": 0}, "limit"),
        ({"seed": -1}, "seed"),
        ({"epoch": -1}, "epoch"),
    ],
)
def test_loader_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    arguments = {"batch_size": 4, "shuffle": True, "augment": False, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_loader(_small_dataset(4), **arguments)
