"""Experiment configuration: one YAML file of shared sections plus named presets, loaded into frozen dataclasses.

A file looks like this (every section and key is optional; what is left out keeps the defaults below)::

    space: spaces/fashion_mnist.yaml    # the search space file, relative to this file
    seed: 0
    device: cpu
    data: {name: fashion_mnist, val_size: 5000}
    supernet: {epochs: 30, batch_size: 128, lr: 0.2, sampling: uniform}
    evaluate: {bn_calibration_images: 2000}
    retrain: {epochs: 30}
    search: {trials: 30}
    latency: {threads: 1}
    presets:                            # each preset overrides the shared sections, key by key
      quick: {supernet: {epochs: 3, max_steps_per_epoch: 200}, retrain: {epochs: 2}}
      full: {}

`load_experiment(path, preset)` applies one preset and validates everything: an unknown key anywhere (in a section or
in a preset) raises `ConfigError` naming the file and the dotted key, as does a value of the wrong type or range.
The file is parsed with `yaml.safe_load` only; nothing in it is executed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from experiments.data import DataConfig
from search_space.files import read_yaml

SAMPLING = ("uniform", "sandwich", "fair")
AMP_MODES = ("bf16", "fp16", "off")


class ConfigError(ValueError):
    """An experiment file that cannot be used; the message names the file and the key."""


def _positive(section: str, name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{section}.{name}: expected {bound}, got {value!r}")


@dataclass(frozen=True)
class TrainRecipe:
    """How a network is trained; shared by the supernet and the retraining of the chosen archs."""

    section: ClassVar[str] = "train"  # the YAML section name, used in error messages

    epochs: int = 3  # passes over the training split; the cosine schedule spans all of them
    batch_size: int = 128  # images per step on each process (under DDP the global batch is batch_size x world size)
    lr: float = 0.2  # peak SGD learning rate, reached after warm-up, then cosine-decayed to 0 step by step
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # Nesterov momentum (what the ShuffleNet and OFA recipes use)
    weight_decay: float = 5e-5  # L2 on conv and linear weights only; BN weights and all biases are not decayed
    label_smoothing: float = 0.1  # share of each hard target spread evenly over the classes
    warmup_epochs: float = 0.0  # linear warm-up from 0 to lr, in epochs (fractions allowed); 0 = none
    max_steps_per_epoch: int | None = None  # cap on steps per epoch, for quick presets; None = the whole split
    amp: str = "bf16"  # CUDA only: autocast dtype "bf16", "fp16" (with a GradScaler) or "off"; CPU always runs fp32
    channels_last: bool = True  # NHWC: tensor-core convolutions on CUDA; on a CPU oneDNN's backward convolutions
    #                             are faster in it: plain networks train 1.05-1.5x, the supernet 1.0-1.3x as fast

    def __post_init__(self) -> None:
        s = self.section
        if self.epochs < 1:
            raise ValueError(f"{s}.epochs: expected >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"{s}.batch_size: expected >= 1, got {self.batch_size}")
        _positive(s, "lr", self.lr)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"{s}.momentum: expected 0 <= momentum < 1, got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise ValueError(f"{s}.nesterov: Nesterov momentum needs momentum > 0")
        _positive(s, "weight_decay", self.weight_decay, allow_zero=True)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"{s}.label_smoothing: expected 0 <= label_smoothing < 1, got {self.label_smoothing}")
        _positive(s, "warmup_epochs", self.warmup_epochs, allow_zero=True)
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"{s}.warmup_epochs: {self.warmup_epochs} leaves no epoch of the {self.epochs} to decay")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"{s}.max_steps_per_epoch: expected None or >= 1, got {self.max_steps_per_epoch}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"{s}.amp: {self.amp!r} is not one of {list(AMP_MODES)}")


@dataclass(frozen=True)
class SupernetConfig(TrainRecipe):
    """Weight-sharing supernet training: which subnets each step trains and how they learn."""

    section: ClassVar[str] = "supernet"

    sampling: str = "uniform"  # "uniform": one random arch per step (SPOS); "sandwich": largest, smallest and randoms;
    #                            "fair": as many archs per step as a decision has most choices, each choice once
    sandwich_random: int = 2  # sandwich only: random archs per step besides the largest and the smallest
    distill: bool = True  # sandwich only: the smaller archs learn the largest's (detached) soft predictions
    ema_decay: float | None = None  # candidates are scored with an exponential moving average of the weights, updated
    #                                 every step with this decay (warmed up as min(decay, (1+t)/(10+t))); None = off
    replicas: int = 1  # supernets trained alike with seeds seed, seed+1, ...; a candidate's score is their mean

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sampling not in SAMPLING:
            raise ValueError(f"supernet.sampling: {self.sampling!r} is not one of {list(SAMPLING)}")
        if self.sandwich_random < 0:
            raise ValueError(f"supernet.sandwich_random: expected >= 0, got {self.sandwich_random}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"supernet.ema_decay: expected None or 0 < ema_decay < 1, got {self.ema_decay}")
        if self.replicas < 1:
            raise ValueError(f"supernet.replicas: expected >= 1, got {self.replicas}")

    def identity(self) -> dict[str, Any]:
        """The recipe of one supernet as plain data for run-directory fingerprints. `ema_decay` came later: left out
        while it is off, so that supernet runs made before it existed still resume. `replicas` is left out: each
        replica is a run of its own, so adding one keeps those already trained."""
        recipe = dataclasses.asdict(self)
        del recipe["replicas"]
        if recipe["ema_decay"] is None:
            del recipe["ema_decay"]
        return recipe


@dataclass(frozen=True)
class RetrainConfig(TrainRecipe):
    """Training a chosen arch on its own, from scratch or fine-tuned from the supernet's weights."""

    section: ClassVar[str] = "retrain"

    from_supernet: bool = False  # start from the supernet's sliced weights (fine-tune) instead of a fresh init


@dataclass(frozen=True)
class EvaluateConfig:
    """How the search scores a candidate with the supernet's shared weights."""

    bn_calibration_images: int = 2000  # training images whose batch statistics replace each candidate's BN stats
    val_images: int | None = None  # score on only this many validation images (faster, noisier); None = all
    batch_size: int = 250  # images per forward pass when calibrating and scoring (no gradients, so larger is fine)

    def __post_init__(self) -> None:
        if self.bn_calibration_images < 1:
            raise ValueError(f"evaluate.bn_calibration_images: expected >= 1, got {self.bn_calibration_images}")
        if self.val_images is not None and self.val_images < 1:
            raise ValueError(f"evaluate.val_images: expected None or >= 1, got {self.val_images}")
        if self.batch_size < 1:
            raise ValueError(f"evaluate.batch_size: expected >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class SearchConfig:
    """Searcher settings. Typed here; the searchers validate the names they understand."""

    searcher: str = "optuna"  # which searcher drives the search (searchers/ defines the names)
    sampler: str = "tpe"  # the searcher's sampling algorithm, e.g. an Optuna sampler name
    trials: int = 30  # candidates evaluated in total, across all workers
    objectives: str = "single"  # "single": accuracy under a latency constraint; other modes are the searchers' own
    top_k: int = 2  # best candidates that get retrained at the end of the search
    workers: int = 1  # candidates evaluated in parallel
    ray_mode: str = "supernet"  # Ray Tune only: "supernet" (inherited weights) or "asha" (short training from scratch)
    asha_epochs: int = 2  # ASHA: the most epochs a candidate trains
    asha_grace: int = 1  # ASHA: epochs every candidate trains before it can be stopped

    def __post_init__(self) -> None:
        for name in ("trials", "top_k", "workers", "asha_epochs", "asha_grace"):
            if getattr(self, name) < 1:
                raise ValueError(f"search.{name}: expected >= 1, got {getattr(self, name)}")
        if self.ray_mode not in ("supernet", "asha"):
            raise ValueError(f"search.ray_mode: {self.ray_mode!r} is not one of ['supernet', 'asha']")


@dataclass(frozen=True)
class LatencyConfig:
    """How latency is measured and constrained. Typed here; latency_lut validates the names it understands."""

    target_ms: float | None = None  # latency budget per batch in milliseconds; None = unconstrained
    batch_size: int = 1  # images per timed forward pass (1 = on-device, one request at a time)
    threads: int = 1  # intra-op CPU threads while timing
    dtype: str = "float32"  # tensor dtype of the timed model
    runtime: str | None = None  # what runs the shipped model: "onnxruntime" (model.onnx) or "eager" (PyTorch,
    #                             model.pt2); on CUDA also "cudagraph" (model.pt2 as a CUDA graph), "ort-cuda" or
    #                             "ort-tensorrt" (model.onnx); None: onnxruntime on a CPU, eager on CUDA
    statistic: str = "p50"  # what a budget promises: "p50", "p90" or "p99" over every call of a measurement
    margin: float = 0.0  # safety share subtracted from the target (0.1 = aim 10% under it)
    calibrate_archs: int = 8  # archs near the target measured in the search process to rescale the table (0: off)

    def __post_init__(self) -> None:
        if self.target_ms is not None and self.target_ms <= 0:
            raise ValueError(f"latency.target_ms: expected None or > 0, got {self.target_ms}")
        if self.batch_size < 1:
            raise ValueError(f"latency.batch_size: expected >= 1, got {self.batch_size}")
        if self.threads < 1:
            raise ValueError(f"latency.threads: expected >= 1, got {self.threads}")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"latency.margin: expected 0 <= margin < 1, got {self.margin}")
        if self.calibrate_archs < 0:
            raise ValueError(f"latency.calibrate_archs: expected >= 0, got {self.calibrate_archs}")
        runtimes = (None, "onnxruntime", "eager", "cudagraph", "ort-cuda", "ort-tensorrt")  # latency_lut.RUNTIMES
        if self.runtime not in runtimes:
            raise ValueError(f"latency.runtime: {self.runtime!r} is not one of {['null', *runtimes[1:]]}")
        if self.statistic not in ("p50", "p90", "p99"):
            raise ValueError(f"latency.statistic: {self.statistic!r} is not one of ['p50', 'p90', 'p99']")


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: every section after the preset is applied. Build it with `load_experiment`."""

    space: str  # path of the search space YAML, resolved against the experiment file's folder
    data: DataConfig = field(default_factory=DataConfig)
    supernet: SupernetConfig = field(default_factory=SupernetConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    seed: int = 0  # seeds the data split, loader order, weight init and arch sampling
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"; under torchrun each process takes cuda:LOCAL_RANK
    source: str = ""  # the experiment file this came from (for messages); not a YAML key
    preset: str | None = None  # the preset applied; not a YAML key

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {self.seed}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.data.decoder != "pil" and self.device == "cpu":
            raise ValueError(f"data.decoder: {self.data.decoder!r} decodes on a CUDA device, but device is 'cpu'")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON friendly), the sections as the file spells them."""
        return dataclasses.asdict(self)


# The YAML keys: sections, then top-level scalars. `source` and `preset` are set by the loader, not the file.
SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "supernet": SupernetConfig,
    "evaluate": EvaluateConfig,
    "retrain": RetrainConfig,
    "search": SearchConfig,
    "latency": LatencyConfig,
}
SCALARS: dict[str, type] = {"space": str, "seed": int, "device": str}


def load_experiment(path: str | Path, preset: str | None = "quick") -> ExperimentConfig:
    """Load an experiment file and apply one of its presets.

    Args:
        path: the experiment YAML file.
        preset: name under `presets:` whose overrides are applied; None applies none.

    Returns:
        The validated configuration; `space` is an absolute path.

    Raises:
        ConfigError: the file cannot be read or parsed, has an unknown key, a value of the wrong type or range, or no
            such preset. The message starts with the file name and names the dotted key.
    """
    path = Path(path)
    raw = read_yaml(path, ConfigError, "experiment file")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw)
    presets = raw.pop("presets", None) or {}
    if not isinstance(presets, dict):
        raise ConfigError(f"{path}: presets: expected a mapping of preset names to overrides")
    try:
        _check_layout(raw, "")
        for name, overrides in presets.items():
            _check_layout(overrides or {}, f"presets.{name}.")
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    if preset is not None:
        if preset not in presets:
            raise ConfigError(f"{path}: no preset {preset!r} (presets: {sorted(presets)})")
        raw = _merge(raw, presets[preset] or {})
    if "space" not in raw:
        raise ConfigError(f"{path}: missing key 'space' (the search space file)")
    try:
        return _build(raw, path, preset)
    except ValueError as e:
        where = f" (preset {preset})" if preset is not None else ""
        raise ConfigError(f"{path}{where}: {e}") from None


def fingerprint(data: Any) -> str:
    """A short stable hash of plain data (sorted-key JSON): what a run directory is checked against."""
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_layout(raw: Any, prefix: str) -> None:
    """Reject unknown keys and non-mapping sections, naming the dotted key."""
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'file'}: expected a mapping, got {type(raw).__name__}")
    allowed = set(SECTIONS) | set(SCALARS)
    for key, value in raw.items():
        if key not in allowed:
            raise ValueError(f"unknown key '{prefix}{key}' (allowed: {sorted(allowed)})")
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ValueError(f"{prefix}{key}: expected a mapping, got {type(value).__name__}")
            names = [f.name for f in dataclasses.fields(SECTIONS[key])]
            for sub in value:
                if sub not in names:
                    raise ValueError(f"unknown key '{prefix}{key}.{sub}' (allowed: {names})")


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _build(raw: dict[str, Any], path: Path, preset: str | None) -> ExperimentConfig:
    kwargs: dict[str, Any] = {}
    for key, kind in SCALARS.items():
        if key in raw:
            kwargs[key] = _coerce(raw[key], kind, key)
    kwargs["space"] = str((path.parent / kwargs["space"]).resolve())
    for key, cls in SECTIONS.items():
        section = raw.get(key) or {}
        hints = typing.get_type_hints(cls)
        values = {name: _coerce(value, hints[name], f"{key}.{name}") for name, value in section.items()}
        kwargs[key] = cls(**values)
    return ExperimentConfig(**kwargs, source=str(path), preset=preset)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a simple type hint (int, float, bool, str, or one of them | None)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (hint,) = [o for o in options if o is not type(None)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str) and value:
            return value
        raise ValueError(f"{where}: expected a non-empty string, got {value!r}")
    raise TypeError(f"{where}: unsupported field type {hint!r}")  # a programming error in this module
