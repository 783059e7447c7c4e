"""The weight-sharing supernet: one set of weights, the largest of every layer, sliced for each arch.

The supernet's modules carry the same names as the plain network's (conv1.0, stage2.0.branch2.3, ..., fc), each
holding the largest shape any arch needs. A subnet takes the leading channels of every weight and the centre of
every depthwise kernel. The arch is always an argument (`supernet(x, arch)`): no module remembers an "active"
arch, so two archs can run at once on two threads, and extraction is a pure function of (weights, arch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from search_space.arch import Arch
from search_space.layout import UnitShape, split_channels, stage_name, unit_shapes
from search_space.network import ShuffleNetV2, channel_shuffle
from search_space.space import SearchSpace


def _conv(cin: int, cout: int, kernel: int, depthwise: bool = False) -> nn.Conv2d:
    # Only the weight matters: stride, padding and groups are given at each call for the active shape.
    return nn.Conv2d(cin, cout, kernel, bias=False, groups=cin if depthwise else 1)


def _apply_conv(x: torch.Tensor, conv: nn.Conv2d, cout: int, kernel: int, stride: int, depthwise: bool) -> torch.Tensor:
    w = conv.weight
    cin = 1 if depthwise else x.shape[1]
    if w.shape[0] != cout or w.shape[1] != cin:
        w = w[:cout, :cin]
    if w.shape[-1] != kernel:  # the centre of the largest kernel, as Once-for-All shares kernels
        off = (w.shape[-1] - kernel) // 2
        w = w[:, :, off : off + kernel, off : off + kernel]
    return F.conv2d(x, w, None, stride, kernel // 2, 1, cout if depthwise else 1)


def _apply_bn(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    c = x.shape[1]
    use_batch_stats = bn.training or bn.running_mean is None
    full = c == bn.num_features  # skip the slice (and its backward) when the whole layer is active
    momentum = bn.momentum
    if momentum is None and bn.training and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)  # momentum None: a cumulative average, as nn.BatchNorm2d computes it
        momentum = 1.0 / float(bn.num_batches_tracked)
    return F.batch_norm(
        x,
        None if bn.running_mean is None else bn.running_mean if full else bn.running_mean[:c],
        None if bn.running_var is None else bn.running_var if full else bn.running_var[:c],
        bn.weight if full else bn.weight[:c],
        bn.bias if full else bn.bias[:c],
        use_batch_stats,
        0.0 if momentum is None else momentum,
        bn.eps,
    )


class SuperUnit(nn.Module):
    """The largest version of one unit position; `forward` runs it at the shape it is given."""

    def __init__(self, in_max: int, left_max: int, right_max: int, kernel_max: int, downsample: bool) -> None:
        super().__init__()
        if downsample:
            self.branch1 = nn.Sequential(
                _conv(in_max, in_max, kernel_max, depthwise=True),
                nn.BatchNorm2d(in_max),
                _conv(in_max, left_max, 1),
                nn.BatchNorm2d(left_max),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        branch_in = in_max if downsample else right_max
        self.branch2 = nn.Sequential(
            _conv(branch_in, right_max, 1),
            nn.BatchNorm2d(right_max),
            nn.ReLU(inplace=True),
            _conv(right_max, right_max, kernel_max, depthwise=True),
            nn.BatchNorm2d(right_max),
            _conv(right_max, right_max, 1),
            nn.BatchNorm2d(right_max),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, shape: UnitShape) -> torch.Tensor:
        k, s = shape.kernel, shape.stride
        b2 = self.branch2
        if s == 1:
            left, right = x[:, : shape.left], x[:, shape.left :]
        else:
            b1 = self.branch1
            left = _apply_conv(x, b1[0], shape.in_channels, k, s, depthwise=True)
            left = _apply_bn(left, b1[1])
            left = _apply_conv(left, b1[2], shape.left, 1, 1, depthwise=False)
            left = F.relu(_apply_bn(left, b1[3]))
            right = x
        right = F.relu(_apply_bn(_apply_conv(right, b2[0], shape.right, 1, 1, depthwise=False), b2[1]))
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
        self.maxpool = nn.MaxPool2d(3, 2, 1) if g.stem_kind == "imagenet" else nn.Identity()
        in_max = stem_max
        for i, c in enumerate(space.stages):
            lefts = [(w, split_channels(w, r, g.split_multiple)) for w in c.widths for r in c.splits]
            left_max = max(left for _, left in lefts)
            right_max = max(w - left for w, left in lefts)
            kmax = max(c.kernels)
            units = [SuperUnit(in_max, left_max, right_max, kmax, downsample=j == 0) for j in range(max(c.depths))]
            setattr(self, stage_name(i), nn.Sequential(*units))
            in_max = max(c.widths)
        head_max = max(space.head_widths)
        self.conv5 = nn.Sequential(nn.Conv2d(in_max, head_max, 1, bias=False), nn.BatchNorm2d(head_max),
                                   nn.ReLU(inplace=True))
        self.fc = nn.Linear(head_max, num_classes)

    def forward(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        """Run the subnet `arch` on `x`. The arch is not validated here (a hot path); `extract` validates."""
        g = self.space.geometry
        stem_stride = 2 if g.stem_kind == "imagenet" else 1
        x = F.relu(_apply_bn(_apply_conv(x, self.conv1[0], arch.stem, 3, stem_stride, depthwise=False), self.conv1[1]))
        x = self.maxpool(x)
        for i, shapes in enumerate(unit_shapes(arch, g)):
            stage = getattr(self, stage_name(i))
            for unit, shape in zip(stage, shapes, strict=False):
                x = unit(x, shape)
        x = F.relu(_apply_bn(_apply_conv(x, self.conv5[0], arch.head, 1, 1, depthwise=False), self.conv5[1]))
        x = x.mean([2, 3])
        return F.linear(x, self.fc.weight[:, : arch.head], self.fc.bias)

    @torch.no_grad()
    def extract(self, arch: Arch) -> ShuffleNetV2:
        """A plain network for `arch` holding copies of the sliced weights and BatchNorm statistics."""
        self.space.validate(arch)
        plain = ShuffleNetV2(arch, self.space.geometry, num_classes=self.num_classes)
        shared = self.state_dict()
        plain.load_state_dict({name: _slice_to(shared[name], like.shape) for name, like in plain.state_dict().items()})
        plain.train(self.training)
        return plain.to(next(self.parameters()).device)


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
