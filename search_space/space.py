"""The search space: data loaded from YAML, validated, sampled, counted, and turned into networks.

A space file looks like this (every key is required unless marked optional)::

    name: imagenet
    input: {size: 224, channels: 3}
    stem: {kind: imagenet, widths: [24]}        # kind: imagenet (stride-2 conv + max-pool) or small (stride-1 conv)
    channels: {multiple: 4, split_multiple: 2}  # widths are multiples of `multiple`; split sides of `split_multiple`
    stages:                                     # stage2, stage3, ... in order
      - {depths: [2, 3, 4], widths: [48, 116], splits: [0.5], kernels: [3, 5]}
    head: {widths: [1024]}
    references: [shufflenet_v2_x0_5]            # optional: named torchvision archs the space must contain

Every choice has a stable parameter name (`stem.width`, `stage2.depth`, `stage2.width`, `stage2.unit0.split`,
`stage2.unit0.kernel`, `head.width`) so that searchers record comparable trials; unit indices follow the module
names (`stage2.0` is unit 0).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from search_space.arch import Arch, Stage, Unit
from search_space.cost import Cost, arch_cost
from search_space.files import read_yaml
from search_space.layout import STEM_KINDS, Geometry, split_channels, stage_name
from search_space.network import ShuffleNetV2

KERNELS = (3, 5, 7)

# torchvision's four ShuffleNet V2 models: stage repeats and (stem, stage widths..., head) channels.
REFERENCES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "shufflenet_v2_x0_5": ((4, 8, 4), (24, 48, 96, 192, 1024)),
    "shufflenet_v2_x1_0": ((4, 8, 4), (24, 116, 232, 464, 1024)),
    "shufflenet_v2_x1_5": ((4, 8, 4), (24, 176, 352, 704, 1024)),
    "shufflenet_v2_x2_0": ((4, 8, 4), (24, 244, 488, 976, 2048)),
}

# A chooser picks one of `choices` for the parameter `name`: a seeded RNG, an Optuna trial, a dict of params.
Chooser = Callable[[str, Sequence[Any]], Any]


class SpaceError(ValueError):
    """A space file that cannot be used; the message names the file and the field."""


def reference_arch(name: str) -> Arch:
    """The torchvision arch `name` (split 0.5, kernel 3 everywhere)."""
    if name not in REFERENCES:
        raise ValueError(f"unknown reference {name!r}; known: {sorted(REFERENCES)}")
    repeats, channels = REFERENCES[name]
    stages = tuple(
        Stage(width=w, units=(Unit(split=0.5, kernel=3),) * d) for d, w in zip(repeats, channels[1:-1], strict=True)
    )
    return Arch(stem=channels[0], stages=stages, head=channels[-1])



@dataclass(frozen=True)
class StageChoices:
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    splits: tuple[float, ...]
    kernels: tuple[int, ...]


@dataclass(frozen=True)
class SearchSpace:
    """A ShuffleNet V2 search space. Build one with `SearchSpace.from_yaml` or `SearchSpace.from_dict`."""

    name: str
    geometry: Geometry
    channel_multiple: int
    stem_widths: tuple[int, ...]
    stages: tuple[StageChoices, ...]
    head_widths: tuple[int, ...]
    references: tuple[str, ...] = ()

    # ---- loading -----------------------------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpace:
        """Load and validate a space file; raises SpaceError with the file and field on any problem."""
        path = Path(path)
        data = read_yaml(path, SpaceError, "space file")
        try:
            return cls.from_dict(data)
        except SpaceError as e:
            raise SpaceError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, data: Any) -> SearchSpace:
        """Validate plain data (as loaded from YAML) into a space."""
        top = _Fields(data, "space", required={"name", "input", "stem", "stages", "head"},
                      optional={"channels", "references"})
        name = top.string("name")
        inp = _Fields(top.get("input"), "input", required={"size", "channels"})
        stem = _Fields(top.get("stem"), "stem", required={"kind", "widths"})
        kind = stem.string("kind")
        if kind not in STEM_KINDS:
            raise SpaceError(f"stem.kind: {kind!r} is not one of {list(STEM_KINDS)}")
        chan = _Fields(top.get("channels", {}), "channels", optional={"multiple", "split_multiple"})
        multiple = chan.integer("multiple", default=4, minimum=2)
        if multiple % 2:
            raise SpaceError(f"channels.multiple: {multiple} must be even (channel shuffle halves every width)")
        geometry = Geometry(
            input_size=inp.integer("size", minimum=8),
            in_channels=inp.integer("channels", minimum=1),
            stem_kind=kind,
            split_multiple=chan.integer("split_multiple", default=2, minimum=1),
        )
        stem_widths = stem.int_list("widths", minimum=1)
        raw_stages = top.get("stages")
        if not isinstance(raw_stages, list) or not raw_stages:
            raise SpaceError("stages: expected a non-empty list of stages")
        stages = []
        for i, raw in enumerate(raw_stages):
            where = f"stages[{i}] ({stage_name(i)})"
            s = _Fields(raw, where, required={"depths", "widths", "splits", "kernels"})
            choices = StageChoices(
                depths=s.int_list("depths", minimum=1),
                widths=s.int_list("widths", minimum=2),
                splits=s.float_list("splits"),
                kernels=s.int_list("kernels", minimum=1),
            )
            _check_stage(choices, where, multiple, geometry.split_multiple)
            stages.append(choices)
        head = _Fields(top.get("head"), "head", required={"widths"})
        refs = top.get("references", [])
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise SpaceError("references: expected a list of names")
        space = cls(
            name=name,
            geometry=geometry,
            channel_multiple=multiple,
            stem_widths=stem_widths,
            stages=tuple(stages),
            head_widths=head.int_list("widths", minimum=1),
            references=tuple(refs),
        )
        for ref in refs:
            if ref not in REFERENCES:
                raise SpaceError(f"references: unknown reference {ref!r}; known: {sorted(REFERENCES)}")
            try:
                space.validate(reference_arch(ref))
            except ValueError as e:
                raise SpaceError(f"references: the space cannot contain {ref}: {e}") from None
        return space

    # ---- what the space holds ----------------------------------------------------------------------------------

    def decide(self, choose: Chooser) -> Arch:
        """Build an arch by asking `choose(name, choices)` for each decision, define-by-run.

        Units beyond the chosen depth are never asked about, so a searcher sees only live parameters.
        """
        stem = choose("stem.width", self.stem_widths)
        stages = []
        for i, c in enumerate(self.stages):
            prefix = stage_name(i)
            depth = choose(f"{prefix}.depth", c.depths)
            width = choose(f"{prefix}.width", c.widths)
            units = []
            for j in range(depth):
                split = choose(f"{prefix}.unit{j}.split", c.splits)
                units.append(Unit(split=split, kernel=choose(f"{prefix}.unit{j}.kernel", c.kernels)))
            stages.append(Stage(width=width, units=tuple(units)))
        return Arch(stem=stem, stages=tuple(stages), head=choose("head.width", self.head_widths))

    def sample(self, rng: np.random.Generator) -> Arch:
        """One arch, every choice drawn uniformly and independently (as Single Path One-Shot samples)."""
        return self.decide(lambda _name, choices: choices[int(rng.integers(len(choices)))])

    def sample_fair(self, rng: np.random.Generator, count: int | None = None) -> list[Arch]:
        """`count` archs in which each decision's choices appear equally often (FairNAS's strict fairness).

        Each decision gets its own sequence of shuffles of its choices, and arch k takes the k-th draw of every
        sequence: a decision whose choices divide `count` has each equally often, one with fewer choices than
        `count` has some once more than others. `count` defaults to the most choices any decision has, so that every
        choice of every decision is trained at least once per step. A unit beyond an arch's depth is not part of it,
        so the choices of the deeper units are balanced only over the archs that reach them.
        """
        if count is None:
            count = max(len(self.stem_widths), len(self.head_widths),
                        *(len(c) for s in self.stages for c in (s.depths, s.widths, s.splits, s.kernels)))
        if count < 1:
            raise ValueError(f"count: expected >= 1, got {count}")
        orders: dict[str, list[Any]] = {}

        def chooser(k: int) -> Chooser:
            def choose(name: str, choices: Sequence[Any]) -> Any:
                if name not in orders:
                    repeats = -(-count // len(choices))
                    orders[name] = [choices[int(i)] for _ in range(repeats) for i in rng.permutation(len(choices))]
                return orders[name][k]
            return choose

        return [self.decide(chooser(k)) for k in range(count)]

    def params(self, arch: Arch) -> dict[str, Any]:
        """The named parameters of `arch` (inverse of `from_params`)."""
        out: dict[str, Any] = {"stem.width": arch.stem}
        for i, stage in enumerate(arch.stages):
            prefix = stage_name(i)
            out[f"{prefix}.depth"] = stage.depth
            out[f"{prefix}.width"] = stage.width
            for j, unit in enumerate(stage.units):
                out[f"{prefix}.unit{j}.split"] = unit.split
                out[f"{prefix}.unit{j}.kernel"] = unit.kernel
        out["head.width"] = arch.head
        return out

    def from_params(self, params: dict[str, Any]) -> Arch:
        """The arch named by `params` (as recorded by a searcher); validated."""
        arch = self.decide(lambda name, _choices: params[name])
        self.validate(arch)
        return arch

    def largest(self) -> Arch:
        """The arch with the most compute: widest, deepest, largest kernels, smallest identity share."""
        return self.decide(lambda name, choices: min(choices) if name.endswith(".split") else max(choices))

    def smallest(self) -> Arch:
        """The arch with the least compute."""
        return self.decide(lambda name, choices: max(choices) if name.endswith(".split") else min(choices))

    def reference(self, name: str) -> Arch:
        """A named torchvision arch, if this space contains it; ValueError otherwise."""
        arch = reference_arch(name)
        try:
            self.validate(arch)
        except ValueError as e:
            raise ValueError(f"space {self.name!r} does not contain {name}: {e}") from None
        return arch

    def contained_references(self) -> dict[str, Arch]:
        """Every torchvision arch this space contains, by name."""
        found = {}
        for name in REFERENCES:
            with contextlib.suppress(ValueError):
                found[name] = self.reference(name)
        return found

    def size(self) -> int:
        """The exact number of distinct archs (may be astronomically large)."""
        total = len(self.stem_widths) * len(self.head_widths)
        for c in self.stages:
            per_unit = len(c.splits) * len(c.kernels)
            total *= len(c.widths) * sum(per_unit**d for d in c.depths)
        return total

    def validate(self, arch: Arch) -> None:
        """Raise ValueError naming the first choice of `arch` that this space does not offer."""
        if arch.stem not in self.stem_widths:
            raise ValueError(f"stem width {arch.stem} not in {list(self.stem_widths)}")
        if len(arch.stages) != len(self.stages):
            raise ValueError(f"{len(arch.stages)} stages, the space has {len(self.stages)}")
        for i, (stage, c) in enumerate(zip(arch.stages, self.stages, strict=True)):
            prefix = stage_name(i)
            if stage.depth not in c.depths:
                raise ValueError(f"{prefix}: depth {stage.depth} not in {list(c.depths)}")
            if stage.width not in c.widths:
                raise ValueError(f"{prefix}: width {stage.width} not in {list(c.widths)}")
            for j, unit in enumerate(stage.units):
                if unit.split not in c.splits:
                    raise ValueError(f"{prefix}.unit{j}: split {unit.split} not in {list(c.splits)}")
                if unit.kernel not in c.kernels:
                    raise ValueError(f"{prefix}.unit{j}: kernel {unit.kernel} not in {list(c.kernels)}")
        if arch.head not in self.head_widths:
            raise ValueError(f"head width {arch.head} not in {list(self.head_widths)}")

    # ---- networks and cost -------------------------------------------------------------------------------------

    def build(self, arch: Arch, num_classes: int = 1000) -> ShuffleNetV2:
        """A freshly initialised plain network for `arch` (validated against the space)."""
        self.validate(arch)
        return ShuffleNetV2(arch, self.geometry, num_classes=num_classes)

    def cost(self, arch: Arch, num_classes: int = 1000) -> Cost:
        """Parameters and multiply-adds of `arch` without building it."""
        return arch_cost(arch, self.geometry, num_classes)


def space_to_dict(space: SearchSpace) -> dict[str, Any]:
    """The space as its YAML file spells it: `SearchSpace.from_dict(space_to_dict(space)) == space`.

    Supernet checkpoints store it, so that a checkpoint rebuilds its supernet without the space file.
    """
    g = space.geometry
    return {
        "name": space.name,
        "input": {"size": g.input_size, "channels": g.in_channels},
        "stem": {"kind": g.stem_kind, "widths": list(space.stem_widths)},
        "channels": {"multiple": space.channel_multiple, "split_multiple": g.split_multiple},
        "stages": [
            {"depths": list(c.depths), "widths": list(c.widths), "splits": list(c.splits), "kernels": list(c.kernels)}
            for c in space.stages
        ],
        "head": {"widths": list(space.head_widths)},
        "references": list(space.references),
    }


def parse_arch(space: SearchSpace, text: str) -> Arch:
    """An arch as a command line names it: a code, a torchvision reference name, 'largest' or 'smallest'.

    Raises:
        ValueError: the text names no arch, or one that `space` does not contain.
    """
    if text == "largest":
        return space.largest()
    if text == "smallest":
        return space.smallest()
    arch = space.reference(text) if text.startswith("shufflenet_v2_") else Arch.decode(text)
    space.validate(arch)
    return arch


def _check_stage(c: StageChoices, where: str, multiple: int, split_multiple: int) -> None:
    for w in c.widths:
        if w % multiple:
            raise SpaceError(f"{where}.widths: width {w} is not a multiple of {multiple}")
    for r in c.splits:
        if not 0.0 < r < 1.0:
            raise SpaceError(f"{where}.splits: split {r} must lie strictly between 0 and 1")
        for w in c.widths:
            try:
                split_channels(w, r, split_multiple)
            except ValueError as e:
                raise SpaceError(f"{where}.splits: {e}") from None
    for k in c.kernels:
        if k not in KERNELS:
            raise SpaceError(f"{where}.kernels: kernel {k} is not one of {list(KERNELS)}")


class _Fields:
    """Typed access to one mapping of a space file, rejecting unknown keys and naming the field on errors."""

    def __init__(self, data: Any, where: str, required: set[str] = frozenset(), optional: set[str] = frozenset()):
        if not isinstance(data, dict):
            raise SpaceError(f"{where}: expected a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - set(required) - set(optional), key=str)
        if unknown:
            raise SpaceError(f"{where}: unknown key {unknown[0]!r} (allowed: {sorted(set(required) | set(optional))})")
        missing = sorted(set(required) - set(data))
        if missing:
            raise SpaceError(f"{where}: missing key {missing[0]!r}")
        self.data = data
        self.where = where

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def string(self, key: str) -> str:
        value = self.data[key]
        if not isinstance(value, str) or not value:
            raise SpaceError(f"{self.where}.{key}: expected a non-empty string, got {value!r}")
        return value

    def integer(self, key: str, default: int | None = None, minimum: int = 0) -> int:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpaceError(f"{self.where}.{key}: expected an integer, got {value!r}")
        if value < minimum:
            raise SpaceError(f"{self.where}.{key}: {value} is below the minimum {minimum}")
        return value

    def _list(self, key: str) -> list[Any]:
        value = self.data[key]
        if not isinstance(value, list):
            raise SpaceError(f"{self.where}.{key}: expected a list, got {value!r}")
        if not value:
            raise SpaceError(f"{self.where}.{key}: the list of choices is empty")
        if len(set(value)) != len(value):
            raise SpaceError(f"{self.where}.{key}: repeated choices in {value}")
        return value

    def int_list(self, key: str, minimum: int = 0) -> tuple[int, ...]:
        values = self._list(key)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int):
                raise SpaceError(f"{self.where}.{key}: expected integers, got {v!r}")
            if v < minimum:
                raise SpaceError(f"{self.where}.{key}: {v} is below the minimum {minimum}")
        return tuple(sorted(values))

    def float_list(self, key: str) -> tuple[float, ...]:
        values = self._list(key)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SpaceError(f"{self.where}.{key}: expected numbers, got {v!r}")
        return tuple(sorted(float(v) for v in values))
