"""From an Arch to concrete layer shapes: the one place that decides channel counts and feature-map sizes.

The plain network, the supernet, the analytic cost and the latency table all read shapes from here, so they
cannot disagree about what an arch is.
"""

from __future__ import annotations

from dataclasses import dataclass

from search_space.arch import FIRST_STAGE, Arch

# The stems, as (stride of the 3x3 conv, stride of the 3x3 max-pool after it; 1: no pool). imagenet is torchvision's
# (224 -> 56 before stage2); small keeps full resolution, as 28x28 images have no pixels to spare for downsampling.
STEMS: dict[str, tuple[int, int]] = {"imagenet": (2, 2), "small": (1, 1)}
STEM_KINDS = tuple(STEMS)


@dataclass(frozen=True)
class Geometry:
    """What a network needs besides its arch: input, stem kind and the channel rounding rule.

    Attributes:
        input_size: side of the (square) input image in pixels.
        in_channels: 3 for RGB, 1 for grayscale.
        stem_kind: "imagenet" or "small" (see STEMS; `stem_stride` and `stem_pool_stride` read it).
        split_multiple: the identity side's channel count is rounded to a multiple of this (2 keeps every
            torchvision reference exact: 116 channels split 58/58).
    """

    input_size: int = 224
    in_channels: int = 3
    stem_kind: str = "imagenet"
    split_multiple: int = 2

    def __post_init__(self) -> None:
        if self.stem_kind not in STEM_KINDS:
            raise ValueError(f"stem kind {self.stem_kind!r} is not one of {list(STEM_KINDS)}")
        if self.input_size < 8:
            raise ValueError(f"input size {self.input_size} is below 8 pixels")
        if self.in_channels < 1:
            raise ValueError(f"in_channels {self.in_channels} must be at least 1")
        if self.split_multiple < 1:
            raise ValueError(f"split_multiple {self.split_multiple} must be at least 1")

    @property
    def stem_stride(self) -> int:
        """Stride of the stem's 3x3 conv (conv1)."""
        return STEMS[self.stem_kind][0]

    @property
    def stem_pool_stride(self) -> int:
        """Stride of the 3x3 max-pool after conv1; 1 means the stem has no pool."""
        return STEMS[self.stem_kind][1]

    @property
    def stem_conv_size(self) -> int:
        """Feature-map side after conv1 (before the max-pool)."""
        return conv_out(self.input_size, self.stem_stride)

    def to_dict(self) -> dict[str, int | str]:
        return {
            "input_size": self.input_size,
            "in_channels": self.in_channels,
            "stem_kind": self.stem_kind,
            "split_multiple": self.split_multiple,
        }


@dataclass(frozen=True)
class UnitShape:
    """The concrete shape of one unit.

    Attributes:
        in_channels: channels entering the unit.
        out_channels: channels leaving it.
        stride: 2 for the first unit of a stage, else 1.
        kernel: depthwise kernel size.
        left: channels of the left side: the identity half (stride 1) or branch1's output (stride 2).
        size: input feature-map side.
    """

    in_channels: int
    out_channels: int
    stride: int
    kernel: int
    left: int
    size: int

    @property
    def right(self) -> int:
        """Channels produced by branch2 (the side with the convolutions)."""
        return self.out_channels - self.left

    @property
    def branch_in(self) -> int:
        """Channels entering branch2: all of them when downsampling, else those the identity side left over."""
        return self.in_channels if self.stride == 2 else self.in_channels - self.left

    @property
    def out_size(self) -> int:
        return conv_out(self.size, self.stride)


def conv_out(size: int, stride: int) -> int:
    """Output side of a 'same'-padded odd-kernel conv or pool: ceil(size / stride)."""
    return (size + stride - 1) // stride


def split_channels(width: int, split: float, multiple: int) -> int:
    """Channels kept by the left side of a unit with `width` channels, rounded and kept off the ends.

    Raises:
        ValueError: when either side would be left without channels.
    """
    left = int(round(width * split / multiple)) * multiple
    left = min(max(left, multiple), width - multiple)
    if left <= 0 or left >= width:
        raise ValueError(f"width {width}: split {split} leaves a side without channels (multiple {multiple})")
    return left


def stem_out_size(geometry: Geometry) -> int:
    """Feature-map side after the stem (conv1, then the max-pool if there is one): what stage2 receives."""
    return conv_out(geometry.stem_conv_size, geometry.stem_pool_stride)


def unit_shapes(arch: Arch, geometry: Geometry) -> list[list[UnitShape]]:
    """Shapes of every unit, stage by stage (stage i is named `stage{i + 2}`)."""
    size = stem_out_size(geometry)
    channels = arch.stem
    stages = []
    for stage in arch.stages:
        shapes = []
        for j, unit in enumerate(stage.units):
            stride = 2 if j == 0 else 1
            shape = UnitShape(
                in_channels=channels,
                out_channels=stage.width,
                stride=stride,
                kernel=unit.kernel,
                left=split_channels(stage.width if stride == 2 else channels, unit.split, geometry.split_multiple),
                size=size,
            )
            shapes.append(shape)
            channels, size = stage.width, shape.out_size
        stages.append(shapes)
    return stages


def head_size(arch: Arch, geometry: Geometry) -> int:
    """Feature-map side entering conv5."""
    size = stem_out_size(geometry)
    for _ in arch.stages:
        size = conv_out(size, 2)
    return size


def stage_name(index: int) -> str:
    return f"stage{index + FIRST_STAGE}"
