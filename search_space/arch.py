"""One ShuffleNet V2 architecture: a frozen value with a stable, reversible string code.

The code keys the latency table's cache, the search records and the exported model card, so
`Arch.decode(a.encode()) == a` for every arch and `encode` is canonical (one arch, one code).

Code grammar (all lower case, safe in file names)::

    s24_w48-k3r0.5x4_w96-k3r0.5x8_w192-k3r0.5x4_h1024
    ^stem  ^stage: width, then runs of units    ^head (conv5) width

A unit is `k<kernel>r<split>`; `xN` repeats it N times (runs are always merged, which keeps codes
short and canonical). The split is written with `repr(float)`, which round-trips exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

FIRST_STAGE = 2  # torchvision numbers the stages stage2, stage3, stage4; so do we

_UNIT_RE = re.compile(r"^k(\d+)r([0-9.]+)(?:x(\d+))?$")


@dataclass(frozen=True)
class Unit:
    """One ShuffleNet V2 unit.

    Attributes:
        split: share of the channels kept by the identity side (0.5 in the paper). In a downsampling unit it is the
            share of the output produced by the left branch (branch1).
        kernel: depthwise kernel size (3, 5 or 7).
    """

    split: float
    kernel: int

    def encode(self) -> str:
        return f"k{self.kernel}r{self.split!r}"


@dataclass(frozen=True)
class Stage:
    """A stage: its output width and its units; the first unit downsamples (stride 2)."""

    width: int
    units: tuple[Unit, ...]

    @property
    def depth(self) -> int:
        return len(self.units)


@dataclass(frozen=True)
class Arch:
    """A whole network: stem width, stages, head (conv5) width."""

    stem: int
    stages: tuple[Stage, ...]
    head: int

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(s.depth for s in self.stages)

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(s.width for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML/JSON friendly)."""
        return {
            "stem": self.stem,
            "stages": [
                {"width": s.width, "units": [{"split": u.split, "kernel": u.kernel} for u in s.units]}
                for s in self.stages
            ],
            "head": self.head,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Arch:
        """Inverse of `to_dict`; rejects unknown or missing keys."""
        _check_keys(data, {"stem", "stages", "head"}, "arch")
        stages = []
        for i, s in enumerate(data["stages"]):
            where = f"arch.stages[{i}]"
            _check_keys(s, {"width", "units"}, where)
            units = []
            for j, u in enumerate(s["units"]):
                _check_keys(u, {"split", "kernel"}, f"{where}.units[{j}]")
                units.append(Unit(split=float(u["split"]), kernel=int(u["kernel"])))
            stages.append(Stage(width=int(s["width"]), units=tuple(units)))
        return cls(stem=int(data["stem"]), stages=tuple(stages), head=int(data["head"]))

    def encode(self) -> str:
        """The canonical string code of this arch."""
        parts = [f"s{self.stem}"]
        for stage in self.stages:
            runs: list[list[Any]] = []
            for unit in stage.units:
                if runs and runs[-1][0] == unit:
                    runs[-1][1] += 1
                else:
                    runs.append([unit, 1])
            body = "-".join(u.encode() + (f"x{n}" if n > 1 else "") for u, n in runs)
            parts.append(f"w{stage.width}-{body}")
        parts.append(f"h{self.head}")
        return "_".join(parts)

    @classmethod
    def decode(cls, code: str) -> Arch:
        """Parse a code made by `encode`; raises ValueError naming the bad part."""
        parts = code.strip().split("_")
        if len(parts) < 3 or not parts[0].startswith("s") or not parts[-1].startswith("h"):
            raise ValueError(f"arch code {code!r}: expected 's<stem>_w<width>-<units>..._h<head>'")
        try:
            stem = int(parts[0][1:])
            head = int(parts[-1][1:])
        except ValueError:
            raise ValueError(f"arch code {code!r}: stem and head must be integers") from None
        stages = []
        for part in parts[1:-1]:
            width_text, *unit_texts = part.split("-")
            if not width_text.startswith("w") or not width_text[1:].isdigit() or not unit_texts:
                raise ValueError(f"arch code {code!r}: bad stage {part!r}")
            units: list[Unit] = []
            for text in unit_texts:
                m = _UNIT_RE.match(text)
                if m is None:
                    raise ValueError(f"arch code {code!r}: bad unit {text!r}, expected k<kernel>r<split>[x<count>]")
                try:
                    split = float(m.group(2))
                except ValueError:
                    raise ValueError(f"arch code {code!r}: bad split in {text!r}") from None
                units.extend([Unit(split=split, kernel=int(m.group(1)))] * int(m.group(3) or 1))
            stages.append(Stage(width=int(width_text[1:]), units=tuple(units)))
        return cls(stem=stem, stages=tuple(stages), head=head)

    def __str__(self) -> str:
        return self.encode()


def _check_keys(data: Any, expected: set[str], where: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = set(data) - expected
    missing = expected - set(data)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}")
    if missing:
        raise ValueError(f"{where}: missing key(s) {sorted(missing)}")
