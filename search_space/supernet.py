"""The weight-sharing supernet: one set of weights, the largest of every layer, sliced for each arch.

The supernet's modules carry the same names as the plain network's (conv1.0, stage2.0.branch2.3, ..., fc). A subnet
takes the leading output channels of every weight and the centre of every depthwise kernel. The arch is always an
argument (`supernet(x, arch)`): no module remembers an "active" arch, so two archs can run at once on two threads, and
extraction is a pure function of (weights, arch).

Input channels are indexed by what they are, not where they sit. After a unit's channel shuffle, position j of a
stage's feature map holds a different channel for every stage width and split, so a weight column picked by position
would meet a different feature in every subnet and width sharing would not share anything consistent. Every channel
inside a stage is produced by one layer: branch1 of the first unit (L), branch2 of unit j (B_j), or the stem. Its
*channel id* is (producer, row), laid out as one range per producer:

    ids of stage s:  [ L: left_max | B_0: right_max | B_1: right_max | ... | B_{depth_max - 1}: right_max ]

A layer that reads a stage's channels (a stride-1 unit's first 1x1 conv, the next stage's first unit, conv5) has one
column per id and gathers the columns of the channels it actually receives. A parameter thus always connects the same
pair of features, whatever the arch, and the plain network extracted for an arch computes exactly what the supernet
computes for it. `routing` works the ids out from the arch, the way the plain network moves channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from search_space.arch import Arch
from search_space.layout import Geometry, UnitShape, split_channels, stage_name, unit_shapes
from search_space.network import ShuffleNetV2, channel_shuffle, stem_pool
from search_space.space import SearchSpace


@dataclass(frozen=True)
class StageBlocks:
    """Where each producer's ids start in one stage's id range."""

    left_max: int
    right_max: int
    depth_max: int

    def producer(self, unit: int) -> int:
        """First id of branch2 of `unit`; branch1 of unit 0 starts at 0."""
        return self.left_max + unit * self.right_max

    @property
    def size(self) -> int:
        return self.producer(self.depth_max)


@dataclass(frozen=True)
class Routing:
    """The ids of the channels each consuming layer receives, for one arch (`None`: the leading ids 0..n-1).

    Attributes:
        reads: per stage, per unit: the ids entering the unit's convolutions (all inputs for the first unit, the
            branch side for the others).
        head: the ids entering conv5.
    """

    reads: tuple[tuple[tuple[int, ...] | None, ...], ...]
    head: tuple[int, ...] | None


def _shuffle(ids: list[int]) -> list[int]:
    """`channel_shuffle(x, 2)` applied to a list of channel ids."""
    half = len(ids) // 2
    return [i for pair in zip(ids[:half], ids[half:], strict=True) for i in pair]


def _leading(ids: list[int]) -> tuple[int, ...] | None:
    return None if ids == list(range(len(ids))) else tuple(ids)


@lru_cache(maxsize=4096)
def routing(arch: Arch, geometry: Geometry, blocks: tuple[StageBlocks, ...]) -> Routing:
    """Follow every channel through the plain network of `arch` and record what each consuming layer reads."""
    ids = list(range(arch.stem))  # the stem's rows
    reads = []
    for shapes, block in zip(unit_shapes(arch, geometry), blocks, strict=True):
        stage_reads = []
        for j, shape in enumerate(shapes):
            branch_out = list(range(block.producer(j), block.producer(j) + shape.right))
            if shape.stride == 2:
                stage_reads.append(_leading(ids))
                ids = _shuffle(list(range(shape.left)) + branch_out)
            else:
                stage_reads.append(_leading(ids[shape.left :]))
                ids = _shuffle(ids[: shape.left] + branch_out)
        reads.append(tuple(stage_reads))
    return Routing(tuple(reads), _leading(ids))


def _conv(cin: int, cout: int, kernel: int, fan_in: int, depthwise: bool = False) -> nn.Conv2d:
    """A conv holding the largest weight; only the weight matters (stride, padding and groups are given per call).

    Initialised as `nn.Conv2d` initialises a layer of fan-in `fan_in` (the most inputs any subnet gives it), not of
    the width of the id range, which would shrink the weights of every layer that reads ids.
    """
    conv = nn.Conv2d(cin, cout, kernel, bias=False, groups=cin if depthwise else 1)
    bound = 1.0 / math.sqrt(fan_in * kernel * kernel)
    nn.init.uniform_(conv.weight, -bound, bound)
    return conv


def _apply_conv(
    x: torch.Tensor, conv: nn.Conv2d, cout: int, kernel: int, stride: int, depthwise: bool,
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    w = conv.weight
    if depthwise:
        w = w[:cout] if ids is None else w.index_select(0, ids)
    elif ids is not None:
        w = w[:cout].index_select(1, ids)
    elif w.shape[0] != cout or w.shape[1] != x.shape[1]:
        w = w[:cout, : x.shape[1]]
    if w.shape[-1] != kernel:  # the centre of the largest kernel, as Once-for-All shares kernels
        off = (w.shape[-1] - kernel) // 2
        w = w[:, :, off : off + kernel, off : off + kernel]
    return F.conv2d(x, w, None, stride, kernel // 2, 1, cout if depthwise else 1)


def _apply_bn(x: torch.Tensor, bn: nn.BatchNorm2d, ids: torch.Tensor | None = None) -> torch.Tensor:
    """BatchNorm over the leading `x.shape[1]` features of `bn`, or over the features `ids`."""
    c = x.shape[1]
    use_batch_stats = bn.training or bn.running_mean is None
    momentum = bn.momentum
    if momentum is None and bn.training and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)  # momentum None: a cumulative average, as nn.BatchNorm2d computes it
        momentum = 1.0 / float(bn.num_batches_tracked)
    momentum = 0.0 if momentum is None else momentum
    if ids is None:
        full = c == bn.num_features  # skip the slice (and its backward) when the whole layer is active
        return F.batch_norm(
            x,
            None if bn.running_mean is None else bn.running_mean if full else bn.running_mean[:c],
            None if bn.running_var is None else bn.running_var if full else bn.running_var[:c],
            bn.weight if full else bn.weight[:c],
            bn.bias if full else bn.bias[:c],
            use_batch_stats,
            momentum,
            bn.eps,
        )
    # Gathered statistics are copies: update them, then write them back.
    mean = None if bn.running_mean is None else bn.running_mean.index_select(0, ids)
    var = None if bn.running_var is None else bn.running_var.index_select(0, ids)
    out = F.batch_norm(x, mean, var, bn.weight.index_select(0, ids), bn.bias.index_select(0, ids),
                       use_batch_stats, momentum, bn.eps)
    if use_batch_stats and mean is not None:
        with torch.no_grad():
            bn.running_mean.index_copy_(0, ids, mean)
            bn.running_var.index_copy_(0, ids, var)
    return out


class SuperUnit(nn.Module):
    """The largest version of one unit position; `forward` runs it at the shape it is given.

    Args:
        in_ids: the id range the unit reads (the previous stage's, or its own stage's for a stride-1 unit).
        in_max: the most channels any subnet feeds it (the fan-in its weights are initialised for).
        left_max, right_max: the most channels of its left and right sides.
        kernel_max: the largest depthwise kernel.
        downsample: the stride-2 first unit of a stage.
    """

    def __init__(self, in_ids: int, in_max: int, left_max: int, right_max: int, kernel_max: int,
                 downsample: bool) -> None:
        super().__init__()
        if downsample:
            self.branch1 = nn.Sequential(
                _conv(in_ids, in_ids, kernel_max, 1, depthwise=True),
                nn.BatchNorm2d(in_ids),
                _conv(in_ids, left_max, 1, in_max),
                nn.BatchNorm2d(left_max),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            _conv(in_ids, right_max, 1, in_max),
            nn.BatchNorm2d(right_max),
            nn.ReLU(inplace=True),
            _conv(right_max, right_max, kernel_max, 1, depthwise=True),
            nn.BatchNorm2d(right_max),
            _conv(right_max, right_max, 1, right_max),
            nn.BatchNorm2d(right_max),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, shape: UnitShape, ids: torch.Tensor | None) -> torch.Tensor:
        """`ids`: the channel ids of `x` (downsampling) or of its branch side (stride 1); None for 0..n-1."""
        k, s = shape.kernel, shape.stride
        b2 = self.branch2
        if s == 1:
            left, right = x[:, : shape.left], x[:, shape.left :]
        else:
            b1 = self.branch1
            left = _apply_conv(x, b1[0], shape.in_channels, k, s, depthwise=True, ids=ids)
            left = _apply_bn(left, b1[1], ids)
            left = _apply_conv(left, b1[2], shape.left, 1, 1, depthwise=False, ids=ids)
            left = F.relu(_apply_bn(left, b1[3]))
            right = x
        right = F.relu(_apply_bn(_apply_conv(right, b2[0], shape.right, 1, 1, depthwise=False, ids=ids), b2[1]))
        right = _apply_bn(_apply_conv(right, b2[3], shape.right, k, s, depthwise=True), b2[4])
        right = F.relu(_apply_bn(_apply_conv(right, b2[5], shape.right, 1, 1, depthwise=False), b2[6]))
        return channel_shuffle(torch.cat((left, right), dim=1), 2)


class Supernet(nn.Module):
    """Shared weights for every arch of `space`.

    Args:
        space: the search space.
        num_classes: classifier outputs.
    """

    def __init__(self, space: SearchSpace, num_classes: int = 1000) -> None:
        super().__init__()
        self.space = space
        self.num_classes = num_classes
        g = space.geometry
        stem_max = max(space.stem_widths)
        self.conv1 = nn.Sequential(
            nn.Conv2d(g.in_channels, stem_max, 3, bias=False), nn.BatchNorm2d(stem_max), nn.ReLU(inplace=True)
        )
        self.maxpool = stem_pool(g)
        blocks = []
        in_ids, in_max = stem_max, stem_max
        for i, c in enumerate(space.stages):
            lefts = [(w, split_channels(w, r, g.split_multiple)) for w in c.widths for r in c.splits]
            block = StageBlocks(max(left for _, left in lefts), max(w - left for w, left in lefts), max(c.depths))
            units = [SuperUnit(in_ids, in_max, block.left_max, block.right_max, max(c.kernels), downsample=True)]
            units += [SuperUnit(block.producer(j), block.right_max, block.left_max, block.right_max, max(c.kernels),
                                downsample=False) for j in range(1, block.depth_max)]
            setattr(self, stage_name(i), nn.Sequential(*units))
            blocks.append(block)
            in_ids, in_max = block.size, max(c.widths)
        self.blocks = tuple(blocks)
        head_max = max(space.head_widths)
        self.conv5 = nn.Sequential(_conv(in_ids, head_max, 1, in_max), nn.BatchNorm2d(head_max), nn.ReLU(inplace=True))
        self.fc = nn.Linear(head_max, num_classes)
        self._ids: dict[tuple[Arch, torch.device], tuple[list[list[torch.Tensor | None]], torch.Tensor | None]] = {}

    def _routing_tensors(self, arch: Arch, device: torch.device):
        key = (arch, device)
        found = self._ids.get(key)
        if found is None:
            r = routing(arch, self.space.geometry, self.blocks)

            def tensor(ids):
                return None if ids is None else torch.tensor(ids, dtype=torch.long, device=device)

            found = ([[tensor(ids) for ids in stage] for stage in r.reads], tensor(r.head))
            if len(self._ids) >= 4096:
                self._ids.clear()
            self._ids[key] = found
        return found

    def forward(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        """Run the subnet `arch` on `x`. The arch is not validated here (a hot path); `extract` validates."""
        g = self.space.geometry
        reads, head = self._routing_tensors(arch, x.device)
        x = F.relu(_apply_bn(_apply_conv(x, self.conv1[0], arch.stem, 3, g.stem_stride, depthwise=False),
                             self.conv1[1]))
        x = self.maxpool(x)
        for i, shapes in enumerate(unit_shapes(arch, g)):
            stage = getattr(self, stage_name(i))
            for unit, shape, ids in zip(stage, shapes, reads[i], strict=False):
                x = unit(x, shape, ids)
        x = F.relu(_apply_bn(_apply_conv(x, self.conv5[0], arch.head, 1, 1, depthwise=False, ids=head), self.conv5[1]))
        x = x.mean([2, 3])
        return F.linear(x, self.fc.weight[:, : arch.head], self.fc.bias)

    @torch.no_grad()
    def extract(self, arch: Arch) -> ShuffleNetV2:
        """A plain network for `arch` holding copies of the gathered weights and BatchNorm statistics."""
        self.space.validate(arch)
        plain = ShuffleNetV2(arch, self.space.geometry, num_classes=self.num_classes)
        shared = self.state_dict()
        gathers = _gathers(routing(arch, self.space.geometry, self.blocks))
        state = {}
        for name, like in plain.state_dict().items():
            tensor = shared[name]
            if name in gathers:
                dim, ids = gathers[name]
                tensor = tensor.index_select(dim, torch.tensor(ids, dtype=torch.long, device=tensor.device))
            state[name] = _slice_to(tensor, like.shape)
        plain.load_state_dict(state)
        plain.train(self.training)
        return plain.to(next(self.parameters()).device)


def _gathers(r: Routing) -> dict[str, tuple[int, tuple[int, ...]]]:
    """State-dict entries indexed by channel id: name -> (dimension, ids)."""
    out: dict[str, tuple[int, tuple[int, ...]]] = {}
    for i, stage in enumerate(r.reads):
        for j, ids in enumerate(stage):
            if ids is None:
                continue
            unit = f"{stage_name(i)}.{j}"
            out[f"{unit}.branch2.0.weight"] = (1, ids)
            if j == 0:
                out[f"{unit}.branch1.0.weight"] = (0, ids)
                for stat in ("weight", "bias", "running_mean", "running_var"):
                    out[f"{unit}.branch1.1.{stat}"] = (0, ids)
                out[f"{unit}.branch1.2.weight"] = (1, ids)
    if r.head is not None:
        out["conv5.0.weight"] = (1, r.head)
    return out


def _slice_to(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Leading slice of the channel dims, centre crop of the kernel dims, copied."""
    index: list[slice] = []
    for dim, (have, want) in enumerate(zip(tensor.shape, shape, strict=True)):
        if dim >= 2:
            off = (have - want) // 2
            index.append(slice(off, off + want))
        else:
            index.append(slice(0, want))
    return tensor[tuple(index)].clone()
