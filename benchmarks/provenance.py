"""Where a benchmark's figures come from: the command, the commit, the date, the machine and its load."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def machine() -> str:
    """`<cores>-core <CPU model>` of this machine."""
    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), "unknown CPU")
    return f"{os.cpu_count()}-core {name}"


def header() -> str:
    """One line for a results file: how to reproduce it, and where and when it was measured."""
    command = " ".join(["python", str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]])
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"Measured by `{command}` at commit {git('rev-parse', '--short', 'HEAD')} on "
            f"{datetime.date.today().isoformat()}, {machine()}, load average {load} at the end.")
