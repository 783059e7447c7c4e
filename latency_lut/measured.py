"""Whole-arch measurements kept beside a latency table, shared by every run that searches with it.

A run measures some archs end to end before it searches: the reference arch a relative budget is a multiple of,
and the archs near each budget that calibrate the table. Those measurements depend on the arch, the machine (device,
software, runtime, settings) and nothing else, so a second run on the same table and machine reads them here
instead of measuring again. An entry of another machine is never used: entries are filed under the machine's
fingerprint, so one cache folder shared by several machines serves each with its own.

The file is `<table>-measured.json`; writers take a lock beside it and rewrite it atomically, so runs that start
together both keep what they measured.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from filelock import FileLock

from search_space.files import atomic_write


def machine_key(machine: dict[str, Any]) -> str:
    """A short stable name for a machine fingerprint."""
    return hashlib.sha256(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:16]


class MeasuredArchs:
    """The end-to-end measurements one machine took of whole archs, beside the table at `table_path`.

    Records are plain dicts (a `Measurement.summary()` and whatever the caller adds), keyed by the arch's code and
    the number of classes of the network that was measured.
    """

    def __init__(self, table_path: Path, machine: dict[str, Any]) -> None:
        self.path = table_path.with_name(f"{table_path.stem}-measured.json")
        self.machine = machine
        self._key = machine_key(machine)

    @staticmethod
    def _name(code: str, num_classes: int) -> str:
        return f"{code}@{num_classes}"

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except json.JSONDecodeError:  # written atomically, so only a hand edit breaks it: measure again
            return {}
        return data if isinstance(data, dict) else {}

    def _mine(self, data: dict[str, Any]) -> dict[str, Any]:
        entry = data.get(self._key) or {}
        return entry.get("archs", {}) if entry.get("machine") == self.machine else {}

    def all(self, num_classes: int) -> dict[str, dict[str, Any]]:
        """Every record of this machine for networks of `num_classes` classes, by arch code."""
        suffix = f"@{num_classes}"
        return {name.removesuffix(suffix): record for name, record in self._mine(self._read()).items()
                if name.endswith(suffix)}

    def get(self, code: str, num_classes: int) -> dict[str, Any] | None:
        return self._mine(self._read()).get(self._name(code, num_classes))

    def put(self, code: str, num_classes: int, record: dict[str, Any]) -> None:
        """Add one record (read, merged and written under the lock, so concurrent runs lose nothing)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            data = self._read()
            archs = self._mine(data)
            archs[self._name(code, num_classes)] = record
            data[self._key] = {"machine": self.machine, "archs": archs}
            atomic_write(self.path, lambda f: json.dump(data, f, indent=1))
