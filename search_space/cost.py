"""Analytic cost of an arch, without building it: parameters and multiply-adds.

Multiply-adds count convolutions and the classifier (what torchvision's documented GFLOPS count); BatchNorm,
ReLU, pooling, concat and shuffle cost time but no multiply-adds, which is why the latency table exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from search_space.arch import Arch
from search_space.layout import Geometry, UnitShape, head_size, unit_shapes


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int

    @property
    def mflops(self) -> float:
        """Millions of multiply-adds (the 'MFLOPs' of the ShuffleNet papers)."""
        return self.macs / 1e6


def _unit_cost(s: UnitShape) -> tuple[int, int]:
    k2 = s.kernel * s.kernel
    out_area = s.out_size * s.out_size
    params = macs = 0
    if s.stride == 2:
        params += s.in_channels * k2 + 2 * s.in_channels + s.in_channels * s.left + 2 * s.left
        macs += (s.in_channels * k2 + s.in_channels * s.left) * out_area
    mid = s.right
    # branch2: 1x1 at input resolution, depthwise (maybe strided), 1x1 at output resolution; three BatchNorms.
    params += s.branch_in * mid + mid * k2 + mid * mid + 6 * mid
    macs += s.branch_in * mid * s.size * s.size + (mid * k2 + mid * mid) * out_area
    return params, macs


def arch_cost(arch: Arch, geometry: Geometry, num_classes: int = 1000) -> Cost:
    """Parameters (equal to the built model's count) and multiply-adds of `arch` at `geometry`."""
    stem_size = geometry.stem_conv_size
    params = geometry.in_channels * arch.stem * 9 + 2 * arch.stem
    macs = geometry.in_channels * arch.stem * 9 * stem_size * stem_size
    for shapes in unit_shapes(arch, geometry):
        for shape in shapes:
            p, m = _unit_cost(shape)
            params += p
            macs += m
    last = arch.stages[-1].width
    hs = head_size(arch, geometry)
    params += last * arch.head + 2 * arch.head + arch.head * num_classes + num_classes
    macs += last * arch.head * hs * hs + arch.head * num_classes
    return Cost(params=params, macs=macs)
