"""The latency table: measured ops of one device, a correction, and predictions for whole archs.

A prediction is additive: the sum of the medians of an arch's ops (stem, units, head and the per-call overhead),
then the table's correction, ``scale * sum + overhead``, fitted by `python -m latency_lut validate`. Units are
independent given the stage widths, so the fastest and slowest archs of a space follow exactly from a dynamic
programme over the chain of stage widths.

File format (JSON, written atomically)::

    {"schema_version": 1, "kind": "shufflenas-latency-table",
     "fingerprint": {...device, software and settings, see Fingerprint...},
     "geometry": {"input_size": 224, "in_channels": 3, "stem_kind": "imagenet", "split_multiple": 2},
     "info": {"space": "imagenet", "method": "insitu", "complete": true, ...},
     "correction": {"scale": 1.02, "overhead_us": 150.0, "fitted_on": 20, ...} or null,
     "entries": [{"op": {"kind": "unit", "in_channels": 116, ...}, "median_us": 211.0, "p10_us": 205.2,
                  "p90_us": 260.1, "n": 9}, ...]}
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from latency_lut.errors import CorruptTable, FingerprintMismatch, LutError, MissingEntry
from latency_lut.fingerprint import Fingerprint, Settings
from latency_lut.ops import OpSignature, SpaceOps, arch_ops, op_names
from search_space import Arch, SearchSpace, Unit
from search_space.files import atomic_write
from search_space.layout import Geometry

SCHEMA_VERSION = 1
FILE_KIND = "shufflenas-latency-table"


@dataclass(frozen=True)
class Entry:
    """Timing of one op in microseconds (see `latency_lut.timing.Stats` for the statistic)."""

    median_us: float
    p10_us: float
    p90_us: float
    n: int

    def __post_init__(self) -> None:
        for name in ("median_us", "p10_us", "p90_us"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"entry {name}: expected a non-negative number, got {value!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise ValueError(f"entry n: expected a non-negative integer, got {self.n!r}")


@dataclass(frozen=True)
class Correction:
    """What maps a sum of op medians to a network's latency: ``scale * sum + overhead_us``.

    Attributes:
        scale: multiplies the sum of op medians (positive).
        overhead_us: added once per network call, microseconds (may be negative).
        fitted_on: how many measured archs the fit used (0: no fit, the identity correction).
        space: name of the space the archs came from.
        seed: seed that sampled them.
        fitted_at: when (ISO 8601, UTC).
        loss: the fit's loss on relative residuals ("soft_l1" or "linear").
    """

    scale: float = 1.0
    overhead_us: float = 0.0
    fitted_on: int = 0
    space: str = ""
    seed: int = 0
    fitted_at: str = ""
    loss: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"correction scale must be a positive number, got {self.scale!r}")
        if not (isinstance(self.overhead_us, (int, float)) and math.isfinite(self.overhead_us)):
            raise ValueError(f"correction overhead_us must be a finite number, got {self.overhead_us!r}")

    def apply_us(self, total_us: float | np.ndarray) -> float | np.ndarray:
        return self.scale * total_us + self.overhead_us

    @classmethod
    def from_dict(cls, data: Any) -> Correction:
        if not isinstance(data, dict):
            raise ValueError(f"correction: expected a mapping, got {type(data).__name__}")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown or "scale" not in data or "overhead_us" not in data:
            raise ValueError(f"correction: unknown fields {sorted(unknown)} or missing scale/overhead_us")
        return cls(**data)


@dataclass(frozen=True)
class Contribution:
    """One line of `LatencyTable.breakdown`: an op of the arch (or the correction's overhead) and its milliseconds."""

    name: str
    op: OpSignature | None
    ms: float


class LatencyTable:
    """Measured op latencies of one device and settings, with a correction; predicts whole archs.

    Build one with `LatencyTable.load` (or the profiler); `predict`, `predict_many`, `min_latency`, `max_latency`
    and `breakdown` read it.
    """

    def __init__(self, fingerprint: Fingerprint, geometry: Geometry,
                 entries: Mapping[OpSignature, Entry] | None = None, correction: Correction | None = None,
                 info: Mapping[str, Any] | None = None) -> None:
        if (geometry.input_size, geometry.in_channels, geometry.stem_kind) != (
                fingerprint.input_size, fingerprint.in_channels, fingerprint.stem_kind):
            raise LutError(f"geometry {geometry.to_dict()} disagrees with the fingerprint's input "
                           f"({fingerprint.input_size}, {fingerprint.in_channels}, {fingerprint.stem_kind})")
        self.fingerprint = fingerprint
        self.geometry = geometry
        self.correction = correction or Correction()
        self.info: dict[str, Any] = dict(info or {})
        self._entries: dict[OpSignature, Entry] = dict(entries or {})
        self._forget()

    # ---- entries -----------------------------------------------------------------------------------------------

    @property
    def entries(self) -> Mapping[OpSignature, Entry]:
        """Read-only view of the entries."""
        return MappingProxyType(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, op: object) -> bool:
        return op in self._entries

    def add(self, op: OpSignature, entry: Entry) -> None:
        """Add or replace one entry."""
        self._entries[op] = entry
        self._forget()

    def entry(self, op: OpSignature, where: str = "") -> Entry:
        """The entry of `op`; MissingEntry naming it when there is none."""
        try:
            return self._entries[op]
        except KeyError:
            raise MissingEntry(
                f"the latency table has no entry for {op}{where}; profile a space that contains it "
                f"(python -m latency_lut profile)", op) from None

    # ---- files -------------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, expect: Fingerprint | Settings | None = None, allow_mismatch: bool = False,
             device: str | torch.device | None = None) -> LatencyTable:
        """Read a table file and check that it fits the device and settings in use.

        Args:
            path: the JSON file.
            expect: the fingerprint in use; or settings, whose fingerprint is then taken on `device` (default: the
                table's device kind) with the table's input geometry; or None to skip the check.
            allow_mismatch: use the table even when its fingerprint differs from `expect`.
            device: device for `expect` given as settings.

        Raises:
            LutError: the file cannot be read.
            CorruptTable: it is not a complete, well-formed table (names the file).
            FingerprintMismatch: it was measured elsewhere or otherwise (lists the differing fields).
        """
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise LutError(f"{path}: cannot read latency table ({e.strerror})") from None
        except UnicodeDecodeError:
            raise CorruptTable(f"{path}: not a latency table (not UTF-8 text)") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CorruptTable(f"{path}: corrupt or truncated latency table (invalid JSON at line {e.lineno}, "
                               f"column {e.colno}: {e.msg})") from None
        try:
            table = cls.from_dict(data)
        except (ValueError, TypeError, KeyError) as e:
            raise CorruptTable(f"{path}: not a valid latency table ({e})") from None
        if expect is not None:
            table.check(expect, allow_mismatch=allow_mismatch, device=device, name=str(path))
        return table

    def check(self, expect: Fingerprint | Settings, allow_mismatch: bool = False,
              device: str | torch.device | None = None, name: str = "latency table") -> list[str]:
        """Compare the table's fingerprint with `expect` (see `load`); returns the differences (allowed or none).

        Raises:
            FingerprintMismatch: they differ and `allow_mismatch` is false.
        """
        if isinstance(expect, Settings):
            fp = self.fingerprint
            dev = device if device is not None else fp.device_kind
            expect = Fingerprint.current(dev, expect, self.geometry)
        differences = self.fingerprint.differences(expect)
        if differences and not allow_mismatch:
            raise FingerprintMismatch(
                f"{name} was measured with another device or settings: {'; '.join(differences)} "
                f"(allow_mismatch=True / --allow-mismatch uses it anyway)", differences)
        return differences

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": FILE_KIND,
            "fingerprint": self.fingerprint.to_dict(),
            "geometry": self.geometry.to_dict(),
            "info": self.info,
            "correction": None if self.correction == Correction() else asdict(self.correction),
            "entries": [{"op": op.to_dict(), **asdict(e)} for op, e in sorted(self._entries.items())],
        }

    @classmethod
    def from_dict(cls, data: Any) -> LatencyTable:
        """Inverse of `to_dict`; ValueError (CorruptTable) on anything malformed."""
        if not isinstance(data, dict) or data.get("kind") != FILE_KIND:
            raise CorruptTable(f"expected \"kind\": \"{FILE_KIND}\"")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise CorruptTable(f"schema_version {data.get('schema_version')!r}, this code reads {SCHEMA_VERSION}")
        missing = {"fingerprint", "geometry", "entries"} - set(data)
        if missing:
            raise CorruptTable(f"missing field(s) {sorted(missing)}")
        fingerprint = Fingerprint.from_dict(data["fingerprint"])
        if not isinstance(data["geometry"], dict):
            raise CorruptTable("geometry: expected a mapping")
        geometry = Geometry(**data["geometry"])
        if not isinstance(data["entries"], list):
            raise CorruptTable("entries: expected a list")
        entries: dict[OpSignature, Entry] = {}
        for i, item in enumerate(data["entries"]):
            if not isinstance(item, dict) or set(item) != {"op", *(f.name for f in fields(Entry))}:
                raise CorruptTable(f"entries[{i}]: expected op, median_us, p10_us, p90_us, n")
            try:
                op = OpSignature.from_dict(item["op"])
                entry = Entry(**{k: v for k, v in item.items() if k != "op"})
            except ValueError as e:
                raise CorruptTable(f"entries[{i}]: {e}") from None
            if op in entries:
                raise CorruptTable(f"entries[{i}]: {op} appears twice")
            entries[op] = entry
        correction = Correction.from_dict(data["correction"]) if data.get("correction") is not None else None
        info = data.get("info") or {}
        if not isinstance(info, dict):
            raise CorruptTable("info: expected a mapping")
        return cls(fingerprint, geometry, entries, correction, info)

    def save(self, path: str | Path) -> None:
        """Write the table atomically (a temporary file in the same folder, then os.replace)."""
        write_json_atomic(path, self.to_dict(), compact_key="entries")

    # ---- prediction --------------------------------------------------------------------------------------------

    def scaled(self, factor: float) -> LatencyTable:
        """A copy whose corrected predictions are `factor` times these (e.g. what one process measures near a target).

        The entries and the fingerprint are shared; only the correction changes.
        """
        if not (math.isfinite(factor) and factor > 0):
            raise LutError(f"scale factor {factor!r} must be a positive number")
        c = self.correction
        correction = replace(c, scale=c.scale * factor, overhead_us=c.overhead_us * factor)
        return LatencyTable(self.fingerprint, self.geometry, self._entries, correction, self.info)

    def predict(self, arch: Arch, corrected: bool = True) -> float:
        """Predicted latency of `arch` in milliseconds: the correction applied to the sum of its ops' medians.

        Raises:
            MissingEntry: an op of `arch` was not measured (names it).
        """
        total = self._arch_us(arch)
        return float(self.correction.apply_us(total) if corrected else total) / 1e3

    def predict_many(self, archs: Iterable[Arch], corrected: bool = True) -> np.ndarray:
        """`predict` for many archs at once (elementwise equal to it), as a float64 array of milliseconds.

        Per-choice sums are cached as dictionaries keyed by (stage, widths) and unit choice, so an arch costs a few
        dictionary lookups per unit (well over 100,000 archs/s on one CPU core).
        """
        totals = np.fromiter((self._arch_us(a) for a in archs), dtype=np.float64)
        return (self.correction.apply_us(totals) if corrected else totals) / 1e3

    def breakdown(self, arch: Arch) -> list[Contribution]:
        """What each op of `arch` contributes (scaled by the correction), then the correction's overhead.

        The contributions sum to `predict(arch)`.
        """
        scale = self.correction.scale
        out = []
        for name, op in zip(op_names(arch), arch_ops(arch, self.geometry), strict=True):
            out.append(Contribution(name, op, scale * self.entry(op, f" ({name} of {arch.encode()})").median_us / 1e3))
        out.append(Contribution("correction", None, self.correction.overhead_us / 1e3))
        return out

    def min_latency(self, space: SearchSpace) -> float:
        """The exact smallest `predict` over every arch of `space`, in milliseconds."""
        return self._extreme(space, min)

    def max_latency(self, space: SearchSpace) -> float:
        """The exact largest `predict` over every arch of `space`, in milliseconds."""
        return self._extreme(space, max)

    def missing(self, space: SearchSpace) -> list[OpSignature]:
        """The ops of `space` that have no entry."""
        return [op for op in SpaceOps(space).all_ops() if op not in self._entries]

    def _extreme(self, space: SearchSpace, pick: Any) -> float:
        if space.geometry != self.geometry:
            raise LutError(f"space {space.name!r} has geometry {space.geometry.to_dict()}, the latency table "
                           f"{self.geometry.to_dict()}")
        ops = SpaceOps(space)

        def us(op: OpSignature) -> float:
            return self.entry(op, f" (space {space.name!r})").median_us

        # best[w]: the extreme latency of stem plus stages so far, ending at width w.
        best = {w: us(op) for w, op in ops.stem.items()}
        for i, c in enumerate(space.stages):
            new = {}
            for w in c.widths:
                rest = ops.rest[i].get(w)
                unit = pick(us(op) for op in rest.values()) if rest else 0.0
                depth_part = pick((d - 1) * unit for d in c.depths)
                new[w] = pick(best[p] + pick(us(op) for op in ops.first[i][(p, w)].values()) for p in best) + depth_part
            best = new
        total = pick(best[w] + us(op) for (w, _), op in ops.head.items()) + us(ops.call)
        return float(self.correction.apply_us(total)) / 1e3

    def _forget(self) -> None:
        """Drop the prediction caches (after entries change)."""
        self._stem: dict[int, float] = {}
        self._head: dict[tuple[int, int], float] = {}
        self._first: dict[tuple[int, int, int], dict[Unit, float]] = {}
        self._rest: dict[tuple[int, int], dict[Unit, float]] = {}
        self._call: float | None = None

    def _arch_us(self, arch: Arch) -> float:
        try:
            return self._cached_us(arch)
        except (KeyError, TypeError):
            self._learn(arch)
            return self._cached_us(arch)

    def _cached_us(self, arch: Arch) -> float:
        stages = arch.stages
        total = self._stem[arch.stem]
        previous = arch.stem
        for i, stage in enumerate(stages):
            units, width = stage.units, stage.width
            total += self._first[(i, previous, width)][units[0]]
            if len(units) > 1:
                total += sum(map(self._rest[(i, width)].__getitem__, units[1:]))
            previous = width
        return total + self._head[(previous, arch.head)] + self._call

    def _learn(self, arch: Arch) -> None:
        """Fill the caches with the ops of `arch` (MissingEntry if one is not in the table)."""
        ops = arch_ops(arch, self.geometry)
        names = op_names(arch)
        values = [self.entry(op, f" ({name} of {arch.encode()})").median_us for name, op in zip(names, ops,
                                                                                                 strict=True)]
        self._stem[arch.stem] = values[0]
        self._call = values[-1]
        self._head[(arch.stages[-1].width, arch.head)] = values[-2]
        k, previous = 1, arch.stem
        for i, stage in enumerate(arch.stages):
            self._first.setdefault((i, previous, stage.width), {})[stage.units[0]] = values[k]
            rest = self._rest.setdefault((i, stage.width), {})
            for j, unit in enumerate(stage.units[1:], start=1):
                rest[unit] = values[k + j]
            k += stage.depth
            previous = stage.width


def write_json_atomic(path: str | Path, data: dict[str, Any], compact_key: str | None = None) -> None:
    """Write `data` as JSON to `path` atomically; the list under `compact_key` is written one item per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if compact_key is not None and isinstance(data.get(compact_key), list):
        head = {k: v for k, v in data.items() if k != compact_key}
        body = json.dumps(head, indent=1, allow_nan=False)[:-2]  # drop the closing "\n}"
        items = ",\n".join("  " + json.dumps(item, allow_nan=False) for item in data[compact_key])
        text = f"{body},\n \"{compact_key}\": [\n{items}\n ]\n}}\n"
    else:
        text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text))
