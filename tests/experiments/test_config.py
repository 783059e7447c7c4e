"""Experiment files: every shipped file loads under every preset; unknown keys and bad values name file and key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from experiments.config import (
    SECTIONS,
    ConfigError,
    ExperimentConfig,
    LatencyConfig,
    SearchConfig,
    load_experiment,
)
from search_space import SearchSpace

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
SHIPPED = ["fashion_mnist.yaml", "imagenet.yaml", "synthetic.yaml"]
TINY_SPACE = EXPERIMENTS / "spaces" / "tiny.yaml"


def _presets(name: str) -> list[str]:
    return sorted(yaml.safe_load((EXPERIMENTS / name).read_text())["presets"])


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_files_load_under_every_preset(name):
    presets = _presets(name)
    assert "quick" in presets
    for preset in [*presets, None]:
        cfg = load_experiment(EXPERIMENTS / name, preset)
        assert cfg.preset == preset
        assert cfg.source.endswith(name)
        SearchSpace.from_yaml(cfg.space)  # the relative space path resolves and the space is valid


@pytest.mark.parametrize("name", ["fashion_mnist.yaml", "imagenet.yaml"])
def test_shipped_files_spell_out_every_key(name):
    # The two real experiments are documentation: every section lists every field, so nothing hides in defaults.
    raw = yaml.safe_load((EXPERIMENTS / name).read_text())
    for section, cls in SECTIONS.items():
        if section == "data":
            continue  # data sets differ in which fields apply (image_size, synthetic_size)
        assert set(raw[section]) >= {f.name for f in dataclasses.fields(cls)} - {"amp", "channels_last"}, section


def test_presets_override_key_by_key():
    quick = load_experiment(EXPERIMENTS / "fashion_mnist.yaml", "quick")
    full = load_experiment(EXPERIMENTS / "fashion_mnist.yaml", "full")
    assert (quick.supernet.sampling, full.supernet.sampling) == ("uniform", "fair")
    assert quick.supernet.lr < full.supernet.lr and quick.supernet.replicas < full.supernet.replicas
    assert quick.supernet.epochs == full.supernet.epochs  # not overridden: shared
    assert quick.retrain.epochs < full.retrain.epochs
    sandwich = load_experiment(EXPERIMENTS / "synthetic.yaml", "sandwich")
    assert sandwich.supernet.sampling == "sandwich"
    assert sandwich.supernet.batch_size == load_experiment(EXPERIMENTS / "synthetic.yaml").supernet.batch_size


def test_full_preset_supernet_is_the_benchmarked_recipe():
    # BENCHMARKS.md measures the full preset's ranking with bench_training.py's quick preset and these overrides: the
    # two must stay one recipe (replicas are not part of it).
    quick = load_experiment(EXPERIMENTS / "fashion_mnist.yaml", "quick")
    full = load_experiment(EXPERIMENTS / "fashion_mnist.yaml", "full")
    benchmarked = dataclasses.replace(quick.supernet, sampling="fair", lr=0.1, epochs=3, max_steps_per_epoch=95)
    assert benchmarked.identity() == full.supernet.identity()
    assert (full.supernet.replicas, full.evaluate.bn_calibration_images, full.evaluate.val_images) == (3, 2000, None)
    assert full.data.augment


def _write(tmp_path: Path, data: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"space": str(TINY_SPACE), **data}))
    return path


def test_space_path_is_relative_to_the_file(tmp_path):
    (tmp_path / "spaces").mkdir()
    (tmp_path / "spaces" / "s.yaml").write_text(TINY_SPACE.read_text())
    path = tmp_path / "exp.yaml"
    path.write_text("space: spaces/s.yaml\n")
    assert load_experiment(path, None).space == str((tmp_path / "spaces" / "s.yaml").resolve())


@pytest.mark.parametrize(
    "data, key",
    [
        ({"supernet": {"epoch": 3}}, "supernet.epoch"),
        ({"retrain": {"from_scratch": True}}, "retrain.from_scratch"),
        ({"data": {"path": "/x"}}, "data.path"),
        ({"optimizer": {}}, "optimizer"),
        ({"presets": {"quick": {"supernet": {"lr_max": 1.0}}}}, "presets.quick.supernet.lr_max"),
        ({"presets": {"full": {"seeds": 1}}}, "presets.full.seeds"),  # checked even when another preset is used
    ],
)
def test_unknown_keys_are_rejected_naming_file_and_key(tmp_path, data, key):
    path = _write(tmp_path, {"presets": {"quick": {}}, **data} if "presets" not in data else data)
    with pytest.raises(ConfigError) as info:
        load_experiment(path, "quick")
    message = str(info.value)
    assert str(path) in message
    assert f"'{key}'" in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "section, value, key",
    [
        ("supernet", {"lr": "fast"}, "supernet.lr"),
        ("supernet", {"epochs": True}, "supernet.epochs"),  # a bool is not an integer
        ("supernet", {"epochs": 2.5}, "supernet.epochs"),
        ("supernet", {"sampling": "random"}, "supernet.sampling"),
        ("supernet", {"ema_decay": 1.0}, "supernet.ema_decay"),
        ("supernet", {"replicas": 0}, "supernet.replicas"),
        ("supernet", {"nesterov": "yes"}, "supernet.nesterov"),
        ("retrain", {"lr": -0.1}, "retrain.lr"),
        ("retrain", {"warmup_epochs": 5, "epochs": 2}, "retrain.warmup_epochs"),
        ("evaluate", {"bn_calibration_images": 0}, "evaluate.bn_calibration_images"),
        ("data", {"name": "mnist"}, "data.name"),
        ("search", {"trials": 0}, "search.trials"),
        ("latency", {"margin": 1.5}, "latency.margin"),
    ],
)
def test_bad_values_are_rejected_naming_file_and_key(tmp_path, section, value, key):
    path = _write(tmp_path, {section: value})
    with pytest.raises(ConfigError) as info:
        load_experiment(path, None)
    assert str(path) in str(info.value)
    assert key in str(info.value)


def test_a_bad_value_from_a_preset_names_the_preset(tmp_path):
    path = _write(tmp_path, {"presets": {"quick": {"supernet": {"lr": 0}}}})
    with pytest.raises(ConfigError, match=r"preset quick.*supernet\.lr"):
        load_experiment(path, "quick")


def test_unknown_preset_lists_the_known_ones(tmp_path):
    path = _write(tmp_path, {"presets": {"quick": {}, "full": {}}})
    with pytest.raises(ConfigError, match=r"no preset 'fast' \(presets: \['full', 'quick'\]\)"):
        load_experiment(path, "fast")


def test_yaml_errors_and_missing_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_experiment(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("supernet: {epochs: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(bad)
    no_space = tmp_path / "nospace.yaml"
    no_space.write_text("seed: 1\n")
    with pytest.raises(ConfigError, match="missing key 'space'"):
        load_experiment(no_space, None)


def test_types_are_coerced_where_safe(tmp_path):
    # YAML 1.1 reads 5e-5 without a dot as a string; an int where a float is expected is fine; null is None.
    path = _write(tmp_path, {"supernet": {"weight_decay": "5e-5", "lr": 1, "max_steps_per_epoch": None}})
    cfg = load_experiment(path, None)
    assert cfg.supernet.weight_decay == 5e-5
    assert isinstance(cfg.supernet.lr, float)
    assert cfg.supernet.max_steps_per_epoch is None


def test_defaults_and_sections_for_other_engineers():
    assert SearchConfig() == SearchConfig(searcher="optuna", sampler="tpe", trials=30, objectives="single", top_k=2,
                                          workers=1)
    latency = LatencyConfig()
    assert (latency.batch_size, latency.threads, latency.dtype, latency.runtime, latency.statistic,
            latency.margin) == (1, 1, "float32", None, "p50", 0.0)
    cfg = ExperimentConfig(space=str(TINY_SPACE))
    assert cfg.device == "cpu" and cfg.seed == 0
    assert cfg.evaluate.bn_calibration_images == 2000
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
