"""Where a benchmark's figures come from: the command, the commit, the date, the machine and its load."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git(*args: str) -> str:
    """The output of a git command in this checkout ("unknown" outside one)."""
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def commit() -> str:
    """The short commit of this checkout, marked when tracked files outside benchmarks/results/ differ from it (the
    results files are what a benchmark rewrites while it runs)."""
    changed = [line for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
               if line.strip() and not line[3:].startswith("benchmarks/results/")]
    head = git("rev-parse", "--short", "HEAD")
    return head + (" (with uncommitted changes)" if changed and head != "unknown" else "")


def machine() -> str:
    """`<cores>-core <CPU model>` of this machine."""
    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), "unknown CPU")
    return f"{os.cpu_count()}-core {name}"


def header() -> str:
    """One line for a results file: how to reproduce it, and where and when it was measured."""
    command = " ".join(["python", str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]])
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"Measured by `{command}` at commit {commit()} on "
            f"{datetime.date.today().isoformat()}, {machine()}, load average {load} at the end.")
