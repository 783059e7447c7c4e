"""The plain ShuffleNet V2: what `SearchSpace.build` and `Supernet.extract` return, and what gets exported.

Module names and tensor shapes follow torchvision's `shufflenet_v2_*` (conv1, stage2.0.branch1.0, ..., conv5, fc),
so torchvision's ImageNet weights load into the reference archs with `strict=True`. The only generalisation is
the split ratio: the identity side keeps `left` channels instead of exactly half.
"""

from __future__ import annotations

import torch
from torch import nn

from search_space.arch import Arch
from search_space.layout import Geometry, UnitShape, stage_name, unit_shapes


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave `groups` equal slices of the channels (torchvision's formulation, bit for bit)."""
    b, c, h, w = x.shape
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, c, h, w)


def _depthwise(channels: int, kernel: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel, stride, kernel // 2, bias=False, groups=channels)


def _pointwise(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, 1, 0, bias=False)


def stem_pool(geometry: Geometry) -> nn.Module:
    """The stem's max-pool after conv1 (torchvision's 3x3, padding 1), or an Identity for a stem without one."""
    stride = geometry.stem_pool_stride
    return nn.MaxPool2d(3, stride, 1) if stride > 1 else nn.Identity()


class InvertedResidual(nn.Module):
    """A ShuffleNet V2 unit: split (or duplicate when downsampling), branch, concat, shuffle."""

    def __init__(self, shape: UnitShape) -> None:
        super().__init__()
        self.stride = shape.stride
        self.left = shape.left
        if shape.stride == 1 and shape.in_channels != shape.out_channels:
            raise ValueError(f"stride-1 unit: in_channels {shape.in_channels} != out_channels {shape.out_channels}")
        if shape.stride == 2:
            self.branch1 = nn.Sequential(
                _depthwise(shape.in_channels, shape.kernel, 2),
                nn.BatchNorm2d(shape.in_channels),
                _pointwise(shape.in_channels, shape.left),
                nn.BatchNorm2d(shape.left),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        mid = shape.right
        self.branch2 = nn.Sequential(
            _pointwise(shape.branch_in, mid),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            _depthwise(mid, shape.kernel, shape.stride),
            nn.BatchNorm2d(mid),
            _pointwise(mid, mid),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            out = torch.cat((x[:, : self.left], self.branch2(x[:, self.left :])), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """A plain ShuffleNet V2 for one arch.

    Args:
        arch: the architecture.
        geometry: input size and channels, stem kind, split rounding.
        num_classes: classifier outputs.
    """

    def __init__(self, arch: Arch, geometry: Geometry, num_classes: int = 1000) -> None:
        super().__init__()
        self.arch = arch
        self.geometry = geometry
        self.num_classes = num_classes
        self.conv1 = nn.Sequential(
            nn.Conv2d(geometry.in_channels, arch.stem, 3, geometry.stem_stride, 1, bias=False),
            nn.BatchNorm2d(arch.stem),
            nn.ReLU(inplace=True),
        )
        self.maxpool = stem_pool(geometry)
        for i, shapes in enumerate(unit_shapes(arch, geometry)):
            setattr(self, stage_name(i), nn.Sequential(*(InvertedResidual(s) for s in shapes)))
        self.conv5 = nn.Sequential(
            nn.Conv2d(arch.stages[-1].width, arch.head, 1, 1, 0, bias=False),
            nn.BatchNorm2d(arch.head),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(arch.head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        for i in range(len(self.arch.stages)):
            x = getattr(self, stage_name(i))(x)
        x = self.conv5(x).mean([2, 3])
        return self.fc(x)
