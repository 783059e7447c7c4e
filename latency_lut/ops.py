"""What the table measures: typed op signatures, the ops of an arch, every op of a space, and probe networks.

An op is a piece of the plain network that runs as one call in its forward:

- ``stem``: conv1 (conv + BatchNorm + ReLU) and the max-pool (an Identity for the small stem);
- ``unit``: one `InvertedResidual`, stride 2 (the first unit of a stage) or stride 1;
- ``head``: conv5 (conv + BatchNorm + ReLU), the global mean and the classifier;
- ``call``: what a whole-network call costs beyond its ops (module-call overhead, or a runtime's per-run cost).

Every shape comes from `search_space.layout`, the one place that decides channels and sizes, so the enumeration,
the prediction and the networks cannot disagree. A unit is keyed by its concrete `left` channel count rather than
its split ratio: two splits that round to the same channels are one op.

Probe networks are ordinary archs of the space chosen so that together they contain every op to be measured; the
profiler times each op inside them (see `latency_lut.profiler`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from search_space import Arch, SearchSpace, Stage, Unit
from search_space.layout import (
    Geometry,
    UnitShape,
    conv_out,
    head_size,
    split_channels,
    stage_name,
    stem_out_size,
    unit_shapes,
)
from search_space.network import ShuffleNetV2

OP_KINDS = ("stem", "unit", "head", "call")


@dataclass(frozen=True, order=True)
class OpSignature:
    """The key of one table entry: everything that decides an op's shape.

    Attributes:
        kind: "stem", "unit", "head" or "call".
        in_channels: channels entering the op (the image channels for stem and call).
        out_channels: channels leaving it (stem width, unit width, head width; 0 for call).
        size: side of the input feature map in pixels.
        stride: 2 for a downsampling unit, 1 for other units, the conv stride for the stem; 0 for head and call.
        kernel: depthwise kernel of a unit; 0 otherwise.
        left: a unit's left-side channels (identity share, or branch1's output when downsampling); 0 otherwise.
    """

    kind: str
    in_channels: int
    out_channels: int
    size: int
    stride: int = 0
    kernel: int = 0
    left: int = 0

    def __post_init__(self) -> None:
        if self.kind not in OP_KINDS:
            raise ValueError(f"op kind {self.kind!r} is not one of {list(OP_KINDS)}")
        for f in fields(self)[1:]:
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"op {self.kind}: {f.name} must be a non-negative integer, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> OpSignature:
        """Inverse of `to_dict`; ValueError on unknown, missing or mistyped fields."""
        if not isinstance(data, dict):
            raise ValueError(f"op: expected a mapping, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown, missing = set(data) - names, names - set(data)
        if unknown or missing:
            raise ValueError(f"op {data}: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}")
        return cls(**data)

    def __str__(self) -> str:
        if self.kind == "unit":
            return (f"unit(in={self.in_channels}, out={self.out_channels}, size={self.size}, stride={self.stride}, "
                    f"kernel={self.kernel}, left={self.left})")
        if self.kind == "stem":
            return f"stem(in={self.in_channels}, out={self.out_channels}, size={self.size}, stride={self.stride})"
        if self.kind == "head":
            return f"head(in={self.in_channels}, out={self.out_channels}, size={self.size})"
        return f"call(in={self.in_channels}, size={self.size})"


def stem_op(geometry: Geometry, width: int) -> OpSignature:
    return OpSignature("stem", geometry.in_channels, width, geometry.input_size, stride=geometry.stem_stride, kernel=3)


def unit_op(shape: UnitShape) -> OpSignature:
    return OpSignature("unit", shape.in_channels, shape.out_channels, shape.size, stride=shape.stride,
                       kernel=shape.kernel, left=shape.left)


def head_op(last_width: int, head_width: int, size: int) -> OpSignature:
    return OpSignature("head", last_width, head_width, size)


def call_op(geometry: Geometry) -> OpSignature:
    return OpSignature("call", geometry.in_channels, 0, geometry.input_size)


def op_names(arch: Arch) -> list[str]:
    """Names of the ops of `arch` in forward order, matching `arch_ops` (module names of the plain network)."""
    names = ["conv1+maxpool"]
    for i, stage in enumerate(arch.stages):
        names += [f"{stage_name(i)}.{j}" for j in range(stage.depth)]
    return [*names, "conv5+fc", "call"]


def arch_ops(arch: Arch, geometry: Geometry) -> list[OpSignature]:
    """The ops of `arch` in forward order: stem, every unit, head, then the per-call overhead."""
    ops = [stem_op(geometry, arch.stem)]
    for shapes in unit_shapes(arch, geometry):
        ops += [unit_op(s) for s in shapes]
    ops.append(head_op(arch.stages[-1].width, arch.head, head_size(arch, geometry)))
    ops.append(call_op(geometry))
    return ops


class SpaceOps:
    """Every op a space can produce, organised by the choices that produce it.

    Units are independent given the stage widths, which is what makes exact search over the space cheap:
    a stage's first unit depends on (previous width, width, unit), its other units on (width, unit).

    Attributes:
        space: the space.
        stem: stem width -> op.
        first: per stage, (previous width, width) -> {unit choice -> op} for the downsampling unit.
        rest: per stage, width -> {unit choice -> op} for the stride-1 units (empty when every depth is 1).
        head: (last stage width, head width) -> op.
        call: the per-call overhead op.
    """

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        g = space.geometry
        multiple = g.split_multiple
        self.stem = {w: stem_op(g, w) for w in space.stem_widths}
        self.first: list[dict[tuple[int, int], dict[Unit, OpSignature]]] = []
        self.rest: list[dict[int, dict[Unit, OpSignature]]] = []
        size = stem_out_size(g)
        previous = space.stem_widths
        for c in space.stages:
            units = [Unit(split=s, kernel=k) for s in c.splits for k in c.kernels]
            out = conv_out(size, 2)
            first = {}
            for p in previous:
                for w in c.widths:
                    first[(p, w)] = {
                        u: unit_op(UnitShape(p, w, 2, u.kernel, split_channels(w, u.split, multiple), size))
                        for u in units
                    }
            rest = {}
            if max(c.depths) > 1:
                for w in c.widths:
                    rest[w] = {
                        u: unit_op(UnitShape(w, w, 1, u.kernel, split_channels(w, u.split, multiple), out))
                        for u in units
                    }
            self.first.append(first)
            self.rest.append(rest)
            size, previous = out, c.widths
        self.head_size = size
        self.head = {(w, h): head_op(w, h, size) for w in previous for h in space.head_widths}
        self.call = call_op(g)

    def all_ops(self) -> list[OpSignature]:
        """Every distinct op, sorted."""
        ops = set(self.stem.values()) | set(self.head.values()) | {self.call}
        for first, rest in zip(self.first, self.rest, strict=True):
            for table in (*first.values(), *rest.values()):
                ops.update(table.values())
        return sorted(ops)


def enumerate_ops(space: SearchSpace) -> list[OpSignature]:
    """Every distinct op signature the space can produce (stem, both unit kinds per stage, head, call), sorted."""
    return SpaceOps(space).all_ops()


def probe_archs(space: SearchSpace, needed: Iterable[OpSignature]) -> list[Arch]:
    """Archs of `space` that together contain every op in `needed` (the call op needs no probe).

    Greedy set cover: each probe is the arch that contains the most still-uncovered ops, found exactly by dynamic
    programming over the chain of stage widths (a stage's first unit couples its width to the previous one; all
    else is per stage). Depths are the smallest that hold the stage's uncovered stride-1 ops, to keep probes cheap.

    Raises:
        ValueError: an op of `needed` that no arch of `space` contains.
    """
    ops = SpaceOps(space)
    remaining = {op for op in needed if op.kind != "call"}
    probes: list[Arch] = []
    while remaining:
        arch, gain = _best_probe(ops, remaining)
        if gain == 0:
            raise ValueError(f"space {space.name!r} cannot produce op {min(remaining)}")
        probes.append(arch)
        remaining -= set(arch_ops(arch, space.geometry))
    return probes


def _best_probe(ops: SpaceOps, remaining: set[OpSignature]) -> tuple[Arch, int]:
    space = ops.space

    def pick(table: dict[Unit, OpSignature]) -> tuple[int, Unit]:
        for unit, op in table.items():
            if op in remaining:
                return 1, unit
        return 0, next(iter(table))

    # Stride-1 units of each (stage, width): one unit per uncovered op, padded to the smallest depth holding them.
    rest_plan: list[dict[int, tuple[int, list[Unit]]]] = []
    for i, c in enumerate(space.stages):
        plan = {}
        for w in c.widths:
            table = ops.rest[i].get(w, {})
            todo: dict[OpSignature, Unit] = {}
            for unit, op in table.items():
                if op in remaining and op not in todo:
                    todo[op] = unit
            depth = next((d for d in c.depths if d - 1 >= len(todo)), max(c.depths))
            units = list(todo.values())[: depth - 1]
            filler = next(iter(table)) if table else None
            units += [filler] * (depth - 1 - len(units))
            plan[w] = (min(len(todo), depth - 1), units)
        rest_plan.append(plan)

    # best[w] = (gain so far, choices) for the chain ending at width w.
    best: dict[int, tuple[int, list[Any]]] = {w: (int(ops.stem[w] in remaining), [w]) for w in space.stem_widths}
    for i, c in enumerate(space.stages):
        new: dict[int, tuple[int, list[Any]]] = {}
        for w in c.widths:
            rest_gain, rest_units = rest_plan[i][w]
            candidates = []
            for p, (gain, choices) in best.items():
                g, unit = pick(ops.first[i][(p, w)])
                candidates.append((gain + g + rest_gain, choices + [(w, (unit, *rest_units))]))
            new[w] = max(candidates, key=lambda t: t[0])
        best = new
    total, choices, head = -1, [], space.head_widths[0]
    for w, (gain, ch) in best.items():
        for h in space.head_widths:
            g = gain + int(ops.head[(w, h)] in remaining)
            if g > total:
                total, choices, head = g, ch, h
    stages = tuple(Stage(width=w, units=tuple(units)) for w, units in choices[1:])
    return Arch(stem=choices[0], stages=stages, head=head), total


# ---- the ops of a built network ----------------------------------------------------------------------------------


class StemOp(nn.Module):
    """conv1 and the max-pool of a plain network, as one module (shares the network's submodules)."""

    def __init__(self, net: ShuffleNetV2) -> None:
        super().__init__()
        self.conv1 = net.conv1
        self.maxpool = net.maxpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.conv1(x))


class HeadOp(nn.Module):
    """conv5, the global mean and the classifier of a plain network, as one module (exactly its forward's tail)."""

    def __init__(self, net: ShuffleNetV2) -> None:
        super().__init__()
        self.conv5 = net.conv5
        self.fc = net.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv5(x).mean([2, 3]))


class CallOverhead(nn.Module):
    """What `ShuffleNetV2.forward` does besides its ops: the module call and one Sequential call per stage."""

    def __init__(self, num_stages: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential() for _ in range(num_stages))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


def network_ops(net: ShuffleNetV2) -> list[nn.Module]:
    """The op modules of a plain network in forward order (stem, units, head): running them in turn is its forward."""
    mods: list[nn.Module] = [StemOp(net)]
    for i in range(len(net.arch.stages)):
        mods.extend(getattr(net, stage_name(i)))
    mods.append(HeadOp(net))
    return mods


def op_inputs(net: ShuffleNetV2, x: torch.Tensor) -> list[torch.Tensor]:
    """The input each op of `network_ops(net)` sees when `net` runs on `x` (one forward, in inference mode)."""
    inputs = []
    with torch.inference_mode():
        for module in network_ops(net):
            inputs.append(x)
            x = module(x)
    return inputs

