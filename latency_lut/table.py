"""The latency table: measured ops of one device, a correction, and predictions for whole archs.

A prediction is additive: the sum of the medians of an arch's ops (stem, units, head and the per-call overhead),
each times its op factor, then the table's correction, ``scale * sum + overhead``; `python -m latency_lut validate`
fits both to whole networks measured end to end (ops without a factor count once). Units are
independent given the stage widths, so the fastest and slowest archs of a space follow exactly from a dynamic
programme over the chain of stage widths.

File format (JSON, written atomically)::

    {"schema_version": 1, "kind": "shufflenas-latency-table",
     "fingerprint": {...device, software and settings, see Fingerprint...},
     "geometry": {"input_size": 224, "in_channels": 3, "stem_kind": "imagenet", "split_multiple": 2},
     "info": {"space": "imagenet", "method": "insitu", "complete": true, ...},
     "correction": {"scale": 1.02, "overhead_us": 150.0, "fitted_on": 20, ...,
                    "op_factors": [{"op": {...}, "factor": 1.08}, ...]} or null,
     "entries": [{"op": {"kind": "unit", "in_channels": 116, ...}, "median_us": 211.0, "p10_us": 205.2,
                  "p90_us": 260.1, "n": 9}, ...]}
"""

from __future__ import annotations

import itertools
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
    """What maps an arch's op medians to its latency: ``scale * sum(factor(op) * median(op)) + overhead_us``.

    Attributes:
        scale: multiplies the sum of op medians (positive).
        overhead_us: added once per network call, microseconds (may be negative).
        fitted_on: how many measured archs the fit used (0: no fit, the identity correction).
        space: name of the space the archs came from.
        seed: seed that sampled them.
        fitted_at: when (ISO 8601, UTC).
        loss: the fit's loss on relative residuals ("soft_l1" or "linear").
        op_factors: (op, factor) pairs, sorted by op: what one op costs inside whole networks against its entry,
            fitted by ridge regression on the measured networks (`validation.fit_op_factors`); ops not listed
            count once. Empty for a correction that is one line.
        ridge: the ridge penalty the factors were fitted with (0 without factors).
    """

    scale: float = 1.0
    overhead_us: float = 0.0
    fitted_on: int = 0
    space: str = ""
    seed: int = 0
    fitted_at: str = ""
    loss: str = ""
    op_factors: tuple[tuple[OpSignature, float], ...] = ()
    ridge: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"correction scale must be a positive number, got {self.scale!r}")
        if not (isinstance(self.overhead_us, (int, float)) and math.isfinite(self.overhead_us)):
            raise ValueError(f"correction overhead_us must be a finite number, got {self.overhead_us!r}")
        for op, factor in self.op_factors:
            if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
                raise ValueError(f"correction factor of {op}: expected a positive number, got {factor!r}")

    def apply_us(self, total_us: float | np.ndarray) -> float | np.ndarray:
        return self.scale * total_us + self.overhead_us

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["op_factors"] = [{"op": op.to_dict(), "factor": factor} for op, factor in self.op_factors]
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Correction:
        if not isinstance(data, dict):
            raise ValueError(f"correction: expected a mapping, got {type(data).__name__}")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown or "scale" not in data or "overhead_us" not in data:
            raise ValueError(f"correction: unknown fields {sorted(unknown)} or missing scale/overhead_us")
        factors = data.get("op_factors", [])
        if not isinstance(factors, list) or not all(isinstance(f, dict) and set(f) == {"op", "factor"}
                                                    for f in factors):
            raise ValueError("correction op_factors: expected a list of {\"op\": ..., \"factor\": ...}")
        pairs = tuple(sorted((OpSignature.from_dict(f["op"]), f["factor"]) for f in factors))
        if len({op for op, _ in pairs}) != len(pairs):
            raise ValueError("correction op_factors: an op appears twice")
        return cls(**{**data, "op_factors": pairs})


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
        self.info: dict[str, Any] = dict(info or {})
        self._entries: dict[OpSignature, Entry] = dict(entries or {})
        self.correction = correction or Correction()  # also clears the prediction caches

    @property
    def correction(self) -> Correction:
        return self._correction

    @correction.setter
    def correction(self, correction: Correction) -> None:
        self._correction = correction
        self._factors = dict(correction.op_factors)
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
            "correction": None if self.correction == Correction() else self.correction.to_dict(),
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

    def plain(self) -> LatencyTable:
        """This table without its correction: predictions are the plain sums of the entries."""
        if self._plain is None:
            self._plain = LatencyTable(self.fingerprint, self.geometry, self._entries, None, self.info)
        return self._plain

    def predict(self, arch: Arch, corrected: bool = True) -> float:
        """Predicted latency of `arch` in milliseconds: the correction applied to its ops' medians
        (`corrected=False`: their plain sum).

        Raises:
            MissingEntry: an op of `arch` was not measured (names it).
        """
        if not corrected and self._factors:
            return self.plain().predict(arch, corrected=False)
        total = self._arch_us(arch)
        return float(self.correction.apply_us(total) if corrected else total) / 1e3

    def predict_many(self, archs: Iterable[Arch], corrected: bool = True) -> np.ndarray:
        """`predict` for many archs at once, as a float64 array of milliseconds (equal to `predict`, bit for bit).

        The archs are read once into arrays of their choices; each op is then a 60-bit integer key (its slot kind,
        stage, widths, kernel and split), the table's medians are gathered for the distinct keys, and the sums run
        as array additions over the archs, in the order `predict` adds (see benchmarks/bench_lut.py for the speed).

        Raises:
            MissingEntry: an op of one of the archs was not measured (names it and the arch).
        """
        if not corrected and self._factors:
            return self.plain().predict_many(archs, corrected=False)
        archs = iter(archs)
        parts = []
        while chunk := list(itertools.islice(archs, _CHUNK)):
            keys = _SlotKeys.of(chunk, self._split_codes)
            parts.append(self._chunk_us(chunk, keys) if keys is not None else
                         np.fromiter(map(self._arch_us, chunk), np.float64, len(chunk)))
        totals = np.concatenate(parts) if parts else np.zeros(0)
        return (self.correction.apply_us(totals) if corrected else totals) / 1e3

    def breakdown(self, arch: Arch) -> list[Contribution]:
        """What each op of `arch` contributes (its factor and the scale applied), then the correction's overhead.

        The contributions sum to `predict(arch)`.
        """
        scale = self.correction.scale
        out = []
        for name, op in zip(op_names(arch), arch_ops(arch, self.geometry), strict=True):
            out.append(Contribution(name, op, scale * self._us(op, f" ({name} of {arch.encode()})") / 1e3))
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
            return self._us(op, f" (space {space.name!r})")

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

    def _us(self, op: OpSignature, where: str = "") -> float:
        """What `op` adds to a network's sum: its entry's median times its factor."""
        return self.entry(op, where).median_us * self._factors.get(op, 1.0)

    def _forget(self) -> None:
        """Drop the prediction caches (after the entries or the correction change)."""
        self._plain: LatencyTable | None = None
        self._stem: dict[int, float] = {}
        self._head: dict[tuple[int, int], float] = {}
        self._first: dict[tuple[int, int, int], dict[Unit, float]] = {}
        self._rest: dict[tuple[int, int], dict[Unit, float]] = {}
        self._call: float | None = None
        self._slot_us: dict[int, float] = {}  # predict_many: op key (see _SlotKeys) -> median
        self._known_keys = np.zeros(0, dtype=np.int64)  # the keys of _slot_us, sorted, and their medians
        self._known_us = np.zeros(0)
        self._split_codes = _SplitCodes()

    def _known_at(self, keys: np.ndarray) -> np.ndarray | None:
        """Where each of `keys` is in `_known_keys`; None when one is not there."""
        if not len(self._known_keys):
            return None
        at = np.minimum(np.searchsorted(self._known_keys, keys), len(self._known_keys) - 1)
        return at if np.array_equal(self._known_keys[at], keys) else None

    def _chunk_us(self, archs: list[Arch], keys: _SlotKeys) -> np.ndarray:
        """Uncorrected microseconds of `archs`, whose ops `keys` holds."""
        every = keys.all()
        at = self._known_at(every)
        if at is None:  # ops not seen before: learn them from an arch that has each, then look again
            for index in np.flatnonzero(~np.isin(every, self._known_keys)).tolist():
                if int(every[index]) not in self._slot_us:  # not learnt meanwhile from an arch that shares it
                    a = keys.arch_of(index)
                    values = self._learn(archs[a])  # stem, units..., head, call: the order of keys.of_arch
                    self._slot_us.update(zip(keys.of_arch(a).tolist(), values[:-1], strict=True))
            self._known_keys = np.array(sorted(self._slot_us), dtype=np.int64)
            self._known_us = np.array([self._slot_us[k] for k in self._known_keys.tolist()])
            at = self._known_at(every)
        if self._call is None:
            self._learn(archs[0])
        # Row r holds each arch's r-th op (zero past its last): adding the rows in turn adds every arch's ops in
        # forward order, as `_cached_us` does, so the sums equal `predict`'s exactly (x + 0.0 is x).
        rows = np.zeros((keys.width, len(archs)))
        rows[keys.rows, keys.columns] = self._known_us[at]
        total = rows[0].copy()
        for row in rows[1:]:
            total += row
        total += self._call
        return total

    def _arch_us(self, arch: Arch) -> float:
        try:
            return self._cached_us(arch)
        except (KeyError, TypeError):
            self._learn(arch)
            return self._cached_us(arch)

    def _cached_us(self, arch: Arch) -> float:
        # One op at a time, in forward order: predict_many adds in the same order, so both give the same floats.
        total = self._stem[arch.stem]
        previous = arch.stem
        for i, stage in enumerate(arch.stages):
            units, width = stage.units, stage.width
            total += self._first[(i, previous, width)][units[0]]
            if len(units) > 1:
                rest = self._rest[(i, width)]
                for unit in units[1:]:
                    total += rest[unit]
            previous = width
        total += self._head[(previous, arch.head)]
        return total + self._call

    def _learn(self, arch: Arch) -> list[float]:
        """Fill the caches with the ops of `arch` and return their medians in forward order (stem, units, head,
        call); MissingEntry if one is not in the table."""
        ops = arch_ops(arch, self.geometry)
        if any(op not in self._entries for op in ops):  # name the first missing op and where it sits
            for name, op in zip(op_names(arch), ops, strict=True):
                self.entry(op, f" ({name} of {arch.encode()})")
        values = [self._us(op) for op in ops]
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
        return values


_CHUNK = 1 << 15  # predict_many reads this many archs at a time: its arrays stay a few MB whatever the count
# Bits of a slot key, from the top: slot kind (stem, first unit, other unit, head), stage index, previous width (the
# stage's input; the last stage's for the head), width (stem, stage or head), kernel, split code.
_KEY_BITS = {"kind": 2, "stage": 6, "previous": 16, "width": 16, "kernel": 8, "split": 12}
_STEM, _FIRST, _REST, _HEAD = range(4)


class _SplitCodes:
    """Small integer codes for unit splits, in order of first appearance (a table's codes never change)."""

    def __init__(self) -> None:
        self._codes: dict[float, int] = {}
        self._sorted = np.zeros(0)
        self._sorted_codes = np.zeros(0, dtype=np.int64)

    def __call__(self, splits: np.ndarray) -> np.ndarray | None:
        """The codes of `splits`; None for a split that cannot have one (NaN, or more than the key holds)."""
        codes = self._lookup(splits)
        if codes is None:
            for value in np.unique(splits).tolist():
                self._codes.setdefault(value, len(self._codes))
            self._sorted = np.array(sorted(self._codes))
            self._sorted_codes = np.array([self._codes[v] for v in self._sorted.tolist()], dtype=np.int64)
            codes = self._lookup(splits)
        return codes if codes is not None and len(self._codes) <= 1 << _KEY_BITS["split"] else None

    def _lookup(self, splits: np.ndarray) -> np.ndarray | None:
        if not len(self._sorted):
            return None if len(splits) else np.zeros(0, dtype=np.int64)
        at = np.minimum(np.searchsorted(self._sorted, splits), len(self._sorted) - 1)
        return self._sorted_codes[at] if np.array_equal(self._sorted[at], splits) else None


@dataclass(frozen=True)
class _SlotKeys:
    """The ops of a list of archs as integer keys: per arch its stem, its units in order and its head.

    Attributes:
        stem, units, head: the keys; `units` holds every arch's units, arch after arch.
        unit_arch: the arch of each unit.
        unit_start, unit_count: where each arch's units begin in `units`, and how many it has.
        rows, columns: where each key of `all()` goes in predict_many's (op position, arch) array.
        width: the most ops (stem, units, head) of any arch.
    """

    stem: np.ndarray
    units: np.ndarray
    head: np.ndarray
    unit_arch: np.ndarray
    unit_start: np.ndarray
    unit_count: np.ndarray
    rows: np.ndarray
    columns: np.ndarray
    width: int

    @classmethod
    def of(cls, archs: list[Arch], split_codes: _SplitCodes) -> _SlotKeys | None:
        """The keys of `archs`; None when a choice does not fit its bits (then predict_many adds arch by arch)."""
        n = len(archs)
        stage_lists = [a.stages for a in archs]
        stage_count = np.fromiter(map(len, stage_lists), np.int64, n)
        stages = list(itertools.chain.from_iterable(stage_lists))
        unit_lists = [s.units for s in stages]
        depth = np.fromiter(map(len, unit_lists), np.int64, len(stages))
        units = list(itertools.chain.from_iterable(unit_lists))
        width = np.fromiter([s.width for s in stages], np.int64, len(stages))
        kernel = np.fromiter([u.kernel for u in units], np.int64, len(units))
        split = split_codes(np.fromiter([u.split for u in units], np.float64, len(units)))
        stem = np.fromiter([a.stem for a in archs], np.int64, n)
        head = np.fromiter([a.head for a in archs], np.int64, n)
        if (split is None or stage_count.min() < 1 or depth.min() < 1 or stage_count.max() >= 1 << _KEY_BITS["stage"]
                or not all(_fits(v, _KEY_BITS[f]) for v, f in ((width, "width"), (stem, "width"), (head, "width"),
                                                              (kernel, "kernel")))):
            return None
        # Per stage: its arch, its index in the arch, and its input width (the previous stage's, or the stem's).
        stage_start = np.cumsum(stage_count) - stage_count
        stage_index = np.arange(len(stages)) - np.repeat(stage_start, stage_count)
        previous = np.concatenate(([0], width[:-1]))
        previous[stage_start] = stem
        # Per unit: its stage, and whether it is the stage's first (the downsampling unit, keyed by both widths).
        unit_stage = np.repeat(np.arange(len(stages)), depth)
        first = np.arange(len(units)) == np.repeat(np.cumsum(depth) - depth, depth)
        unit_count = np.add.reduceat(depth, stage_start)
        unit_start = np.cumsum(unit_count) - unit_count
        unit_arch = np.repeat(np.arange(n), unit_count)
        position = np.arange(len(units)) - unit_start[unit_arch]  # the unit's place among its arch's units
        last_width = width[stage_start + stage_count - 1]
        zeros = np.zeros(n, dtype=np.int64)
        return cls(
            stem=_key(_STEM, zeros, zeros, stem, zeros, zeros),
            units=_key(np.where(first, _FIRST, _REST), stage_index[unit_stage],
                       np.where(first, previous[unit_stage], 0), width[unit_stage], kernel, split),
            head=_key(_HEAD, zeros, last_width, head, zeros, zeros),
            unit_arch=unit_arch, unit_start=unit_start, unit_count=unit_count,
            rows=np.concatenate((zeros, 1 + position, 1 + unit_count)),
            columns=np.concatenate((np.arange(n), unit_arch, np.arange(n))),
            width=int(unit_count.max()) + 2,
        )

    def all(self) -> np.ndarray:
        return np.concatenate((self.stem, self.units, self.head))

    def arch_of(self, index: int) -> int:
        """The arch of the `index`-th key of `all()`."""
        return int(self.columns[index])

    def of_arch(self, a: int) -> np.ndarray:
        """The keys of arch `a` in forward order: stem, units, head."""
        start = self.unit_start[a]
        return np.concatenate(([self.stem[a]], self.units[start:start + self.unit_count[a]], [self.head[a]]))


def _fits(values: np.ndarray, bits: int) -> bool:
    return bool(len(values) == 0 or (values.min() >= 0 and values.max() < 1 << bits))


def _key(kind, stage, previous, width, kernel, split) -> np.ndarray:
    key = np.asarray(kind, dtype=np.int64)
    for value, field in ((stage, "stage"), (previous, "previous"), (width, "width"), (kernel, "kernel"),
                         (split, "split")):
        key = (key << _KEY_BITS[field]) | value
    return key


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
