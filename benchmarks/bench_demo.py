"""The whole job as a new user runs it: `make demo` in a fresh clone, then a second budget and a family of budgets
on the same data, each step's wall time from the run's steps.json, and the winners re-measured independently.

    python benchmarks/bench_demo.py                       # about 30-40 minutes on a 2-core CPU
    python benchmarks/bench_demo.py --report              # rewrite benchmarks/results/demo.md from the cache

Phases (each cached in benchmarks/results/demo.json when done; a rerun continues with the next):
  cold     a fresh clone of HEAD, an empty cache folder: `make demo` (venv, latency table, supernet, search, ship)
  second   the same clone and cache, another budget (0.8x the reference): the supernet and table are reused
  family   the same, three budgets in one run (0.8x, 1x, 1.25x the reference)

Each winner's shipped file is measured again with `python -m latency_lut measure` (a fresh process) and compared
with its model card. The figures say how long the job takes, how much of it is retraining, what reusing the
supernet saves, and what a family of budgets costs next to one budget.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from provenance import git, machine  # benchmarks/, the folder of this script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REFERENCE = "shufflenet_v2_x0_5"
PHASES = {
    "cold": None,  # make demo: its own budget (the reference itself)
    "second": f"0.8x{REFERENCE}",
    "family": f"0.8x{REFERENCE},1x{REFERENCE},1.25x{REFERENCE}",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/shufflenas-bench-demo"),
                        help="where the fresh clone and its cache folder go (default /tmp/shufflenas-bench-demo)")
    parser.add_argument("--state", type=Path, default=RESULTS / "demo.json", help="cached results")
    parser.add_argument("--out", type=Path, default=RESULTS / "demo.md", help="the markdown table")
    parser.add_argument("--report", action="store_true", help="only rewrite the markdown from the cache")
    args = parser.parse_args(argv)
    state = json.loads(args.state.read_text()) if args.state.exists() else {"phases": {}}
    if not args.report:
        commit = git("rev-parse", "--short", "HEAD")
        if state.get("commit") not in (None, commit):
            print(f"cache {args.state} is of commit {state['commit']}, HEAD is {commit}: starting over",
                  file=sys.stderr)
            state = {"phases": {}}
        state.update(commit=commit, date=datetime.date.today().isoformat(), machine=machine())
        clone = args.work / "clone"
        home = args.work / "home"
        if "cold" not in state["phases"]:
            subprocess.run(["rm", "-rf", str(args.work)], check=True)
            args.work.mkdir(parents=True)
            subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        for phase, target in PHASES.items():
            if phase in state["phases"]:
                continue
            state["phases"][phase] = run_phase(phase, target, clone, home)
            _save(args.state, state)
    args.out.write_text(markdown(state))
    print(f"wrote {args.out}")
    return 0


def run_phase(phase: str, target: str | None, clone: Path, home: Path) -> dict:
    env = {**os.environ, "SHUFFLENAS_HOME": str(home)}
    if target is None:
        command = ["make", "demo"]
    else:
        command = [".venv/bin/python", "search.py", "--target-ms", target, "--device", "cpu", "--preset", "quick"]
    before = set((clone / "runs").glob("*")) if (clone / "runs").exists() else set()
    print(f"[{phase}] {' '.join(command)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=clone, env=env)
    wall = time.perf_counter() - start
    (run_dir,) = (set((clone / "runs").glob("*")) - before) or _run_dir_of(clone, target)
    steps = json.loads((run_dir / "steps.json").read_text())
    winners = []
    for card_path in sorted((run_dir / "winners").rglob("model_card.json")):
        if ".staging" in card_path.parts:
            continue
        card = json.loads(card_path.read_text())
        shipped = card_path.parent / card["shipped_file"]
        again = subprocess.run([str(clone / ".venv" / "bin" / "python"), "-m", "latency_lut", "measure", str(shipped),
                                "--json"], cwd=clone, env=env, capture_output=True, text=True, check=True)
        winners.append({"target": card["target"], "target_ms": card["target_ms"], "arch": card["arch"],
                        "statistic": card["statistic"], "measured_ms": card["measured_ms"],
                        "remeasured_ms": json.loads(again.stdout)[f"{card['statistic']}_ms"],
                        "test_accuracy": card["test_accuracy"], "params": card["params"]})
    report = (run_dir / "report.md").read_text()
    rejected = report.count("| before training |") + report.count("| after training |")
    return {"command": " ".join(command), "exit": done.returncode, "wall_s": round(wall, 1),
            "steps_s": round(sum(v for k, v in steps.items() if k != "ship: retraining"), 1), "steps": steps,
            "winners": winners, "rejected": rejected, "binds": "does not bind" not in report}


def _run_dir_of(clone: Path, target: str | None) -> list[Path]:
    """The run directory of a rerun phase (it exists already): the one whose run.json names its budgets."""
    want = REFERENCE if target is None else ",".join(t.removeprefix("1x") for t in target.split(","))
    return [p for p in (clone / "runs").glob("*") if json.loads((p / "run.json").read_text())["targets"] == want]


def markdown(state: dict) -> str:
    phases = state["phases"]
    lines = [
        "# The whole job: `make demo`, a second budget, a family of budgets",
        "",
        f"Measured by `python benchmarks/bench_demo.py` at commit {state.get('commit')} on {state.get('date')}, "
        f"{state.get('machine')}. Latency: p50 over every call of `model.onnx` in ONNX Runtime, one thread, "
        "batch 1, measured in a fresh process.",
        "",
        "| phase | command | wall s (steps) | lut | target | supernet | calibrate | search | ship (retraining) | "
        "report | binds | rejected |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in phases.items():
        s = p["steps"]
        total = sum(v for k, v in s.items() if k != "ship: retraining")
        lines.append(
            f"| {name} | `{p['command']}` | {p['wall_s']:.0f} ({total:.0f}) | {s.get('lut', 0):.0f} | "
            f"{s.get('target', 0):.0f} | "
            f"{s.get('supernet', 0):.1f} | {s.get('calibrate', 0):.0f} | {s.get('search', 0):.0f} | "
            f"{s.get('ship', 0):.0f} ({s.get('ship: retraining', 0):.0f}) | {s.get('report', 0):.0f} | "
            f"{'yes' if p['binds'] else 'no'} | {p['rejected']} |")
    lines += ["", "| phase | budget | budget ms | arch | params | card ms | `latency_lut measure` ms | agree | "
              "test acc |", "|---|---|---|---|---|---|---|---|---|"]
    for name, p in phases.items():
        for w in p["winners"]:
            agree = w["remeasured_ms"] / w["measured_ms"] - 1
            lines.append(f"| {name} | {w['target']} | {w['target_ms']:.3f} | `{w['arch']}` | {w['params']:,} | "
                         f"{w['measured_ms']:.3f} | {w['remeasured_ms']:.3f} | {agree:+.1%} | "
                         f"{100 * w['test_accuracy']:.2f}% |")
    if {"second", "family"} <= set(phases):
        def without_retraining(p: dict) -> float:  # the steps' own times, kept across a resumed phase
            return sum(v for k, v in p["steps"].items() if k != "ship: retraining") - p["steps"].get(
                "ship: retraining", 0.0)

        ratio = without_retraining(phases["family"]) / without_retraining(phases["second"])
        lines += ["", f"A family of three budgets costs {ratio:.2f}x one budget on the same data, retraining "
                  f"excluded ({without_retraining(phases['family']):.0f} s against "
                  f"{without_retraining(phases['second']):.0f} s). The second budget's supernet step took "
                  f"{phases['second']['steps'].get('supernet', 0):.1f} s (loaded from the store)."]
    return "\n".join(lines) + "\n"


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
