"""Whole-arch measurements kept beside a table: per machine, merged across writers, rebuilt when unreadable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from latency_lut import MeasuredArchs

ROOT = Path(__file__).resolve().parents[2]
HERE = {"device_name": "This CPU", "runtime": "onnxruntime"}


def test_records_are_kept_per_machine_and_per_number_of_classes(tmp_path):
    table = tmp_path / "tiny-cpu.json"
    MeasuredArchs(table, HERE).put("s8_w16_h32", 10, {"p50_ms": 0.5})
    assert MeasuredArchs(table, HERE).get("s8_w16_h32", 10) == {"p50_ms": 0.5}
    assert MeasuredArchs(table, HERE).get("s8_w16_h32", 100) is None  # another head: another network
    assert MeasuredArchs(table, {**HERE, "device_name": "Another CPU"}).get("s8_w16_h32", 10) is None
    assert MeasuredArchs(table, HERE).all(10) == {"s8_w16_h32": {"p50_ms": 0.5}}
    assert MeasuredArchs(table, HERE).path == tmp_path / "tiny-cpu-measured.json"


def test_writers_at_once_lose_nothing(tmp_path):
    table = tmp_path / "tiny-cpu.json"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from latency_lut import MeasuredArchs
        for i in range(20):
            MeasuredArchs(Path({str(table)!r}), {HERE!r}).put(f"arch{{sys.argv[1]}}-{{i}}", 10, {{"p50_ms": i}})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(k)]) for k in (1, 2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert len(MeasuredArchs(table, HERE).all(10)) == 40


def test_an_unreadable_file_counts_as_empty_and_is_rewritten(tmp_path):
    table = tmp_path / "tiny-cpu.json"
    shared = MeasuredArchs(table, HERE)
    shared.path.write_text("{not json")
    assert shared.all(10) == {}
    shared.put("a", 10, {"p50_ms": 1.0})
    assert MeasuredArchs(table, HERE).get("a", 10) == {"p50_ms": 1.0}
