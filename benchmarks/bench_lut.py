"""Latency tables on this CPU: profile time and size, held-out accuracy, and prediction throughput.

    .venv/bin/python benchmarks/bench_lut.py [--work-dir DIR] [--n 300] [--skip-imagenet-ort] [--only NAME ...]
    .venv/bin/python benchmarks/bench_lut.py --work-dir DIR --report-only     # rewrite the results file only
    .venv/bin/python benchmarks/bench_lut.py --throughput-only [--archs 100000]  # prediction speed alone

For each case (space x runtime) it runs the two commands a user runs, in a fresh table file under --work-dir
(default: a new temporary folder):

    python -m latency_lut profile  --space SPACE --runtime R --num-classes C --out DIR/NAME.json --quiet
    python -m latency_lut validate --lut DIR/NAME.json --space SPACE --n 300 --seed 0 --report-dir DIR --quiet

CPU, 1 thread, batch 1, float32; heavy steps run one at a time (the machine has two shared cores). Writes
benchmarks/results/lut_cpu.md.

Then (and alone with --throughput-only) it times `LatencyTable.predict_many` on 100,000 sampled archs of each
shipped space against two references measured in the same run, interleaved: `predict` called once per arch, and a
plain sum of `arch_ops` entries; it checks that the three agree, and writes the archs/s and their ratios to
benchmarks/results/lut_predict.md. The table there holds every op of the space with seeded random medians: how fast
a prediction runs does not depend on the values.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "experiments" / "spaces"
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import commit  # noqa: E402

# name, space file, runtime, method (None: the runtime's default), classes
CASES = [
    ("imagenet-eager", "imagenet.yaml", "eager", None, 1000),
    ("fashion_mnist-eager", "fashion_mnist.yaml", "eager", None, 10),
    ("fashion_mnist-onnxruntime", "fashion_mnist.yaml", "onnxruntime", None, 10),
    ("imagenet-onnxruntime", "imagenet.yaml", "onnxruntime", None, 1000),
    ("imagenet-eager-isolated", "imagenet.yaml", "eager", "isolated", 1000),  # the design comparison
]


def run(command: list[str]) -> float:
    """Run a command from the repository root; return its wall time in seconds (raise on failure)."""
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    sys.stdout.write(done.stdout)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return seconds


def case(work: Path, name: str, space_file: str, runtime: str, method: str | None, classes: int, n: int) -> dict:
    lut = work / f"{name}.json"
    space = str(SPACES / space_file)
    profile_cmd = [sys.executable, "-m", "latency_lut", "profile", "--space", space, "--runtime", runtime,
                   "--num-classes", str(classes), "--out", str(lut), "--quiet"]
    profile_cmd += ["--method", method] if method else []
    lut.unlink(missing_ok=True)  # a fresh table: profile would otherwise continue an old one
    load_before = os.getloadavg()[0]
    validate_cmd = [sys.executable, "-m", "latency_lut", "validate", "--lut", str(lut), "--space", space, "--n",
                    str(n), "--seed", "0", "--calibrate-frac", "0.5", "--report-dir", str(work), "--quiet"]
    profile_s = run(profile_cmd)
    table = json.loads(lut.read_text())
    validate_s = run(validate_cmd)
    result = {"name": name, "profile_s": profile_s, "profiling_s": table["info"]["profile_seconds"],
              "entries": len(table["entries"]), "validate_s": validate_s, "load": (load_before, os.getloadavg()[0]),
              "commands": [_show(profile_cmd, work), _show(validate_cmd, work)],
              "commit": commit(), "date": datetime.date.today().isoformat()}
    (work / f"bench-{name}.json").write_text(json.dumps(result, indent=1))
    return load_case(work, name)


def load_case(work: Path, name: str) -> dict:
    """A finished case from its files in `work` (what `case` wrote), with the validation report."""
    result = json.loads((work / f"bench-{name}.json").read_text())
    result["report"] = json.loads((work / f"validate-{name}.json").read_text())
    return result


def measured_at(results: list[dict], key: str) -> str:
    """The commit or date the cases were measured at (as each case recorded it; HEAD or today for older cases)."""
    now = commit() if key == "commit" else datetime.date.today().isoformat()
    values = sorted({r.get(key, now) for r in results})
    return ", ".join(values) if values else now


def cross_validated(report: dict, splits: int = 50, frac: float = 0.5) -> dict:
    """Held-out accuracy over many random calibration splits of the same measurements (less luck than one split),
    each fitted as the report's was (the line, and the op factors with the report's ridge penalty)."""
    from latency_lut import LatencyTable
    from latency_lut.validation import fit
    from search_space import Arch

    table = LatencyTable.load(report["table"]).plain()
    archs = [Arch.decode(a["arch"]) for a in report["archs"]]
    measured = np.array([a["measured_ms"] for a in report["archs"]]) * 1e3
    how, ridge = report.get("fit", "linear"), report["correction"].get("ridge") or None
    rng = np.random.default_rng(0)
    n_cal = int(round(frac * len(archs)))
    within, mape = [], []
    for _ in range(splits):
        order = rng.permutation(len(archs))
        cal, held = order[:n_cal], order[n_cal:]
        correction = fit(table, [archs[i] for i in cal], measured[cal], how, ridge=ridge)
        fitted = LatencyTable(table.fingerprint, table.geometry, table.entries, correction)
        error = np.abs(fitted.predict_many([archs[i] for i in held]) * 1e3 / measured[held] - 1) * 100
        within.append(np.mean(error <= 10))
        mape.append(np.mean(error))
    return {"mape": float(np.mean(mape)), "within_10": float(np.mean(within)),
            "within_10_p5": float(np.percentile(within, 5))}


def _show(command: list[str], work: Path) -> str:
    text = "python " + " ".join(command[1:])
    return text.replace(str(work), "$WORK").replace(str(ROOT) + "/", "")


def throughput(space_file: str, count: int, rounds: int = 7) -> dict:
    """Archs/s of predict_many, predict and a plain sum of entries on `count` sampled archs (fastest of `rounds`,
    interleaved), and the largest relative difference between predict_many and predict."""
    from latency_lut import Entry, Fingerprint, LatencyTable, Settings, arch_ops, enumerate_ops
    from search_space import SearchSpace

    space = SearchSpace.from_yaml(SPACES / space_file)
    rng = np.random.default_rng(0)
    entries = {}
    for op in enumerate_ops(space):
        median = float(rng.uniform(10, 1000))
        entries[op] = Entry(median_us=median, p10_us=median, p90_us=median, n=1)
    table = LatencyTable(Fingerprint.current("cpu", Settings(), space.geometry), space.geometry, entries)
    archs = [space.sample(rng) for _ in range(count)]
    table.predict_many(archs[:1000])  # learn the ops, as a search does within its first trials
    for arch in archs[:1000]:
        table.predict(arch)
    few = archs[: max(1, count // 10)]  # the plain sum is slow: timed on a tenth
    seconds = {"predict_many": np.inf, "predict": np.inf, "sum of entries": np.inf}
    for _ in range(rounds):
        start = time.perf_counter()
        many = table.predict_many(archs)
        seconds["predict_many"] = min(seconds["predict_many"], time.perf_counter() - start)
        start = time.perf_counter()
        single = np.array([table.predict(a) for a in archs])
        seconds["predict"] = min(seconds["predict"], time.perf_counter() - start)
        start = time.perf_counter()
        naive = [sum(entries[op].median_us for op in arch_ops(a, space.geometry)) for a in few]
        seconds["sum of entries"] = min(seconds["sum of entries"], (time.perf_counter() - start) * count / len(few))
    np.testing.assert_allclose(table.predict_many(few, corrected=False) * 1e3, naive, rtol=1e-9)
    return {"space": space.name, "archs": count, "rounds": rounds,
            "archs_per_s": {k: count / v for k, v in seconds.items()},
            "max_rel_diff": float(np.max(np.abs(many / single - 1)))}


def throughput_markdown(rates: list[dict], command: str) -> str:
    import datetime
    import platform

    from latency_lut.fingerprint import cpu_name

    lines = [
        "# Latency-table prediction speed",
        "",
        f"`{command}` at commit {commit()}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu_name()} ({platform.machine()}), "
        f"2 shared cores, one thread; Python {platform.python_version()}, numpy {np.__version__}; load average "
        f"{os.getloadavg()[0]:.1f}.",
        "",
        "Each space: that many archs sampled with seed 0, the fastest of the rounds, the three paths interleaved in "
        "one process (so they see the same machine load); the table holds every op of the space (seeded random "
        "medians). *predict_many / predict* is the speed-up of one array call over calling `predict` per arch.",
        "",
        "| space | archs | predict_many (archs/s) | predict (archs/s) | sum of entries (archs/s) | "
        "predict_many / predict | max relative difference to predict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rates:
        a = r["archs_per_s"]
        lines.append(f"| {r['space']} | {r['archs']:,} | {a['predict_many']:,.0f} | {a['predict']:,.0f} | "
                     f"{a['sum of entries']:,.0f} | {a['predict_many'] / a['predict']:.2f} | "
                     f"{r['max_rel_diff']:.1e} |")
    lines += ["", "- *sum of entries*: `sum(table.entries[op].median_us for op in arch_ops(arch, geometry))`, what a "
              "prediction costs without the table's caches.",
              "- predict_many reads the archs' choices into arrays, keys every op by an integer, gathers the medians "
              "with one `searchsorted` and adds them as array rows, in the order `predict` adds them; `predict` "
              "looks each op up in dictionaries.", ""]
    return "\n".join(lines)


def markdown(results: list[dict], n: int, splits: bool = True) -> str:
    """The results file; `splits=False` leaves out the re-split tables (their fits take minutes)."""
    import platform

    import torch

    from latency_lut.fingerprint import cpu_name

    lines = [
        "# Latency tables on this CPU",
        "",
        f"`python benchmarks/bench_lut.py` at commit {measured_at(results, 'commit')}, "
        f"{measured_at(results, 'date')}. "
        f"{cpu_name()} ({platform.machine()}), 2 shared cores; torch {torch.__version__}; 1 thread, batch 1, float32. "
        "Method: eager tables time each op inside probe networks "
        "(`insitu`), ONNX Runtime tables time each op as its own session (`isolated`); an op entry is its median "
        "in the fastest of several interleaved rounds, and a network's measured latency is the table's statistic "
        f"({', '.join(sorted({r['report'].get('statistic', 'best-round') for r in results}))}) over every call of "
        "its measurement, which the correction is fitted to: a line (`scale * sum + overhead`), then a factor per "
        "op for what it costs inside whole networks (ridge regression, `--fit ops`). Held-out archs were not used "
        "for the correction. "
        "`imagenet-eager-isolated` times each eager op alone instead (the alternative design), for comparison. Load "
        "average at the start and end of each case: above 1, other processes shared the two cores.",
        "",
        "| table | entries | profile (s, wall) | validate (s, wall) | held-out MAPE | within ±5% | within ±10% | "
        "max err | Kendall τ | uncorrected MAPE / within ±10% | noise: round spread / repeatability (median) | "
        "load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        h, u, noise = r["report"]["held_out"], r["report"]["held_out_uncorrected"], r["report"]["noise"]
        lines.append(
            f"| {r['name']} | {r['entries']} | {r['profile_s']:.0f} | {r['validate_s']:.0f} | {h['mape']:.2f}% | "
            f"{h['within_5'] * 100:.0f}% | {h['within_10'] * 100:.0f}% | {h['max_error']:.1f}% | "
            f"{h['kendall_tau']:.3f} | {u['mape']:.2f}% / {u['within_10'] * 100:.0f}% | "
            f"{noise['round_spread_median'] * 100:.1f}% / {noise['repeatability_median'] * 100:.1f}% | "
            f"{r['load'][0]:.1f} → {r['load'][1]:.1f} |")
    if not splits:
        return "\n".join(lines)
    lines += ["", f"Validation: {n} sampled archs (seed 0), half calibrate the correction, the other half are held "
              "out. The same measurements, re-split at random 50 times (one split is luck too), each split fitted "
              "alike (the op factors with the seed 0 split's penalty), and fitted with the line alone:", "",
              "| table | correction fitted (seed 0 split) | mean held-out MAPE | mean within ±10% | "
              "5th-percentile split within ±10% | the line alone: mean within ±10% |", "|---|---|---|---|---|---|"]
    for r in results:
        c, cv = r["report"]["correction"], cross_validated(r["report"])
        line_only = cross_validated({**r["report"], "fit": "linear"})
        factors = (f", {r['report']['op_factors']} op factors (ridge {c['ridge']:g})"
                   if r["report"].get("op_factors") else "")
        lines.append(f"| {r['name']} | scale {c['scale']:.4f}, overhead {c['overhead_us']:.1f} us{factors} | "
                     f"{cv['mape']:.2f}% | {cv['within_10'] * 100:.1f}% | {cv['within_10_p5'] * 100:.0f}% | "
                     f"{line_only['within_10'] * 100:.1f}% |")
    sizes = (10, 30, 60, 150)
    lines += ["", "How many calibration archs the op factors need: the same measurements, a calibration share of each "
              "size drawn at random 20 times (the penalty cross-validated in each), the rest held out (mean within "
              "±10%, op factors / the line alone):", "",
              "| table | " + " | ".join(f"{k} archs" for k in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for r in results:
        n_archs = len(r["report"]["archs"])
        cells = []
        for k in sizes:
            if k >= n_archs:
                cells.append("-")
                continue
            ops = cross_validated({**r["report"], "correction": {**r["report"]["correction"], "ridge": None}},
                                  frac=k / n_archs, splits=20)
            line_only = cross_validated({**r["report"], "fit": "linear"}, frac=k / n_archs, splits=20)
            cells.append(f"{ops['within_10'] * 100:.0f}% / {line_only['within_10'] * 100:.0f}%")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += ["", "Reading the table:", "",
              "- *uncorrected*: the plain sum of the op entries (and the per-call overhead entry); *held-out*: after "
              "the correction fitted on the calibration archs.",
              "- *round spread*: how much slower the typical round was than the fastest, i.e. the machine's noise "
              "during the validation; *repeatability*: how far the estimate from the even rounds lies from the "
              "estimate from the odd rounds, i.e. the error floor of one measured latency here.",
              "- Eager tables time each op inside probe networks (`insitu`): its input was just written by the op "
              "before it, as in a network. Ops timed alone (the `isolated` row, and every ONNX Runtime table, whose "
              "sessions cannot be timed op by op) find their weights hot in cache and miss what ONNX Runtime does "
              "across op boundaries in a whole network. The correction's line carries the per-call cost and the "
              "statistic (p50 over every call of a network against each op's fastest round); its op factors carry "
              "each op's own gap between its entry and what it costs inside networks, learnt from the calibration "
              "networks. The two imagenet eager rows compare timing ops in place with timing them alone only when "
              "their noise columns agree: each case is measured minutes after the one before, and this machine's "
              "speed changes by tens of percent from one spell to the next.",
              "- Every measurement pins glibc's mmap/trim thresholds (`latency_lut.timing.pin_allocator`); without "
              "it, page faults on large activations depend on the process's history (one unit measured 0.76 ms "
              "in one process and 1.45 ms in another).",
              "- ONNX Runtime ops are exported with the TorchScript-based exporter (about 30 ms per op; the dynamo "
              "exporter takes about 1 s per op, which would make the imagenet table a half-hour job)."]
    lines += ["", "Commands:", "", "```"]
    for r in results:
        lines += r["commands"]
    lines += ["```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work-dir", type=Path, help="where tables and reports go (default: a new temp folder)")
    parser.add_argument("--n", type=int, default=300, help="archs per validation (default 300)")
    parser.add_argument("--only", nargs="*", help="case names to run (default: all)")
    parser.add_argument("--skip-imagenet-ort", action="store_true", help="skip the imagenet onnxruntime case")
    parser.add_argument("--archs", type=int, default=100_000, help="archs per space for the throughput figure")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/lut_cpu.md")
    parser.add_argument("--throughput-out", type=Path, default=ROOT / "benchmarks/results/lut_predict.md")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: rewrite --out from the finished cases in --work-dir")
    parser.add_argument("--throughput-only", action="store_true",
                        help="only the prediction speed (no profiling): writes --throughput-out")
    args = parser.parse_args()
    if args.throughput_only:
        command = "python benchmarks/bench_lut.py --throughput-only" + (
            f" --archs {args.archs}" if args.archs != 100_000 else "")
        write_throughput(args.throughput_out, args.archs, command)
        return
    if args.report_only and args.work_dir is None:
        parser.error("--report-only needs --work-dir")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_lut-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"tables and reports in {work}", flush=True)
    results = []
    for name, space_file, runtime, method, classes in CASES:
        if args.only and name not in args.only:
            continue
        if args.skip_imagenet_ort and name == "imagenet-onnxruntime":
            continue
        if args.report_only:
            if (work / f"bench-{name}.json").exists():
                results.append(load_case(work, name))
            continue
        results.append(case(work, name, space_file, runtime, method, classes, args.n))
        print(markdown(results, args.n, splits=False), flush=True)
    text = markdown(results, args.n)
    args.out.write_text(text)
    print(text)
    if not args.report_only:
        write_throughput(args.throughput_out, args.archs, "python benchmarks/bench_lut.py")


def write_throughput(out: Path, archs: int, command: str) -> None:
    rates = []
    for space_file in ("imagenet.yaml", "fashion_mnist.yaml"):
        rates.append(throughput(space_file, archs))
        print(json.dumps(rates[-1]), flush=True)
    text = throughput_markdown(rates, command)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
