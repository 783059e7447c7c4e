"""`python -m latency_lut {profile,validate,show,measure}`: build, check and read latency tables; time a model file.

    python -m latency_lut profile --space experiments/spaces/imagenet.yaml --device cpu [--threads 1] [--out FILE]
    python -m latency_lut profile --space experiments/spaces/imagenet.yaml --device cuda --runtime cudagraph
    python -m latency_lut validate --lut FILE --space experiments/spaces/imagenet.yaml [--n 100] [--fit ops]
    python -m latency_lut show --lut FILE [--space SPACE.yaml] [--arch CODE]
    python -m latency_lut measure runs/.../winners/1-<arch>/model.onnx --device cpu [--json]
    python -m latency_lut measure runs/.../winners/1-<arch>/model.pt2 --device cuda --runtime cudagraph

Bad input (a missing or malformed space, an unknown or absent device, a dtype the device does not take, a table
measured elsewhere, a corrupt table) ends with one `error: ...` line on stderr and exit code 2. An interrupted
profile saves what it measured and exits with 130; the same command continues it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from latency_lut.fingerprint import DTYPES, MEMORY_FORMATS, RUNTIMES, STATISTICS, Settings, default_runtime
from latency_lut.timing import Budget


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: ...`, exit code 2) instead of usage plus message."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m latency_lut", description="Per-device latency tables of ShuffleNet V2 ops.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("profile", help="measure every op of a space on one device (resumable)")
    p.add_argument("--space", required=True, help="space YAML file, e.g. experiments/spaces/imagenet.yaml")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="images per call (default 1)")
    p.add_argument("--threads", type=_positive_int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="default float32 (cpu: not float16)")
    p.add_argument("--runtime", choices=RUNTIMES, help="default: onnxruntime on cpu, eager on cuda; on cuda also "
                                                        "cudagraph, ort-cuda, ort-tensorrt (launch-free at batch 1)")
    p.add_argument("--statistic", default="p50", choices=STATISTICS,
                   help="what the table predicts of a network: a percentile over every call (default p50)")
    p.add_argument("--memory-format", default="contiguous", choices=MEMORY_FORMATS, help="eager and cudagraph only")
    p.add_argument("--num-classes", type=_positive_int, default=1000, help="classifier outputs (default 1000)")
    p.add_argument("--out", type=Path, help="table file (default: $SHUFFLENAS_HOME/luts/<space>-<device>-<runtime>-"
                                            "b<B>-t<T>-<dtype>-<statistic>.json, where search.py looks); an "
                                            "existing one is continued")
    p.add_argument("--allow-mismatch", action="store_true", help="continue a table measured with other settings")
    p.add_argument("--method", choices=("insitu", "isolated"), help="insitu (eager default) or isolated (the only "
                                                                      "one for the other runtimes)")
    p.add_argument("--rounds", type=_positive_int, default=5, help="interleaved rounds per op (default 5)")
    p.add_argument("--block-ms", type=float, default=30.0, help="target milliseconds per timed block (default 30)")
    p.add_argument("--group", type=_positive_int, default=16, help="probe networks timed together (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, inputs and round order (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    v = sub.add_parser("validate", help="measure sampled archs, fit the table's correction, report held-out error")
    v.add_argument("--lut", required=True, type=Path, help="table file (its correction is updated)")
    v.add_argument("--space", required=True, help="space YAML file the archs are sampled from")
    v.add_argument("--n", type=_positive_int, default=100, help="archs to measure (default 100)")
    v.add_argument("--seed", type=int, default=0, help="sampling and split seed (default 0)")
    v.add_argument("--calibrate-frac", type=float, default=0.5, help="share used to fit the correction (0.5)")
    v.add_argument("--fit", choices=("ops", "linear"), default="ops",
                   help="ops (default): scale * sum + overhead, then a factor per op fitted to the networks "
                        "(10 calibration archs or more); linear: the line alone")
    v.add_argument("--report-dir", type=Path, help="where the JSON report and PNG go (default: beside the table)")
    v.add_argument("--device", help="where to measure (default: the table's device kind)")
    v.add_argument("--rounds", type=_positive_int, default=24, help="interleaved rounds per arch (default 24)")
    v.add_argument("--block-ms", type=float, default=12.5, help="target milliseconds per timed block (default 12.5)")
    v.add_argument("--allow-mismatch", action="store_true", help="measure although the fingerprint differs")
    v.add_argument("--no-save", action="store_true", help="report only; leave the table's correction as it is")
    v.add_argument("--quiet", action="store_true", help="no progress bars")

    m = sub.add_parser("measure", help="time a model.onnx or model.pt2 as deployed, in a fresh process")
    m.add_argument("file", type=Path, help="model.onnx (ONNX Runtime) or model.pt2 (torch.export: eager or "
                                            "cudagraph)")
    m.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    m.add_argument("--runtime", choices=RUNTIMES, help="default: the file's (.onnx: onnxruntime on cpu, ort-cuda on "
                                                        "cuda; .pt2: eager); cudagraph and ort-tensorrt by name")
    m.add_argument("--threads", type=_positive_int, default=1, help="intra-op threads (default 1)")
    m.add_argument("--batch-size", type=_positive_int, default=1, help="images per call (default 1)")
    m.add_argument("--dtype", default="float32", choices=DTYPES, help="default float32")
    m.add_argument("--rounds", type=_positive_int, default=5, help="interleaved rounds (default 5)")
    m.add_argument("--seed", type=int, default=0, help="seed of the random input (default 0)")
    m.add_argument("--json", action="store_true", help="print the result as JSON")

    s = sub.add_parser("show", help="summarise a table; with --space its range, with --arch a breakdown")
    s.add_argument("--lut", required=True, type=Path, help="table file")
    s.add_argument("--space", help="space YAML file: print missing ops and the fastest/slowest predictions")
    s.add_argument("--arch", help="arch code: print its prediction op by op")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        if args.command == "profile":
            print("interrupted: measured entries are saved; run the same command again to continue",
                  file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as e:
        message = " ".join(str(e).split())
        print(f"error: {message}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from search_space import SearchSpace

    if args.command == "profile":
        from latency_lut.profiler import default_out, profile

        space = SearchSpace.from_yaml(args.space)
        settings = Settings(runtime=args.runtime or default_runtime(args.device), batch_size=args.batch_size,
                            threads=args.threads, dtype=args.dtype, memory_format=args.memory_format,
                            num_classes=args.num_classes, statistic=args.statistic)
        budget = Budget(rounds=args.rounds, block_s=args.block_ms / 1e3)
        out = args.out or default_out(space, args.device, settings)
        table = profile(space, out, args.device, settings, method=args.method, budget=budget, group=args.group,
                        allow_mismatch=args.allow_mismatch, progress=not args.quiet, seed=args.seed)
        print(f"{out}: {len(table)} entries, {table.info.get('profile_seconds', 0.0):.0f} s of profiling in all")
        return 0

    if args.command == "validate":
        from latency_lut.validation import DEFAULT_BUDGET, validate

        space = SearchSpace.from_yaml(args.space)
        budget = Budget(rounds=args.rounds, block_s=args.block_ms / 1e3, min_calls=DEFAULT_BUDGET.min_calls,
                        max_calls=DEFAULT_BUDGET.max_calls, warmup=DEFAULT_BUDGET.warmup)
        report = validate(args.lut, space, n=args.n, seed=args.seed, calibrate_frac=args.calibrate_frac,
                          report_dir=args.report_dir, device=args.device, allow_mismatch=args.allow_mismatch,
                          budget=budget, progress=not args.quiet, save=not args.no_save,
                          how=args.fit)
        _print_validation(report)
        return 0

    if args.command == "measure":
        return _measure(args)

    from latency_lut.ops import SpaceOps
    from latency_lut.table import LatencyTable
    from search_space import Arch

    table = LatencyTable.load(args.lut)
    fp = table.fingerprint
    c = table.correction
    print(f"{args.lut}: {len(table)} entries, {fp.device_kind} {fp.device_name!r}, {fp.runtime}, {fp.threads} "
          f"thread(s), batch {fp.batch_size}, {fp.dtype}, {fp.memory_format}, statistic {fp.statistic}, torch "
          f"{fp.torch_version}")
    print(f"  method {table.info.get('method')}, spaces {table.info.get('spaces')}, complete "
          f"{table.info.get('complete')}, {table.info.get('profile_seconds', 0.0):.0f} s of profiling")
    factors = (f", {len(c.op_factors)} op factors (ridge {c.ridge:g})" if c.op_factors else "")
    print(f"  correction: scale {c.scale:.4f}, overhead {c.overhead_us:.1f} us{factors}, fitted on {c.fitted_on} "
          f"archs")
    if args.space:
        space = SearchSpace.from_yaml(args.space)
        missing = table.missing(space)
        print(f"  space {space.name}: {len(SpaceOps(space).all_ops()) - len(missing)} of "
              f"{len(SpaceOps(space).all_ops())} ops measured")
        if not missing:
            print(f"  fastest {table.min_latency(space):.3f} ms, slowest {table.max_latency(space):.3f} ms")
    if args.arch:
        arch = Arch.decode(args.arch)
        for part in table.breakdown(arch):
            print(f"  {part.name:<16} {part.ms:9.3f} ms  {part.op if part.op is not None else ''}")
        print(f"  {'total':<16} {table.predict(arch):9.3f} ms")
    return 0


def _measure(args: argparse.Namespace) -> int:
    import json

    from latency_lut.fingerprint import Fingerprint
    from latency_lut.timing import FILE_BUDGET, measure_file_fresh, runtime_of_file

    runtime = args.runtime or runtime_of_file(args.file, args.device)
    settings = Settings(runtime=runtime, batch_size=args.batch_size, threads=args.threads, dtype=args.dtype)
    budget = Budget(rounds=args.rounds, block_s=FILE_BUDGET.block_s, min_calls=FILE_BUDGET.min_calls,
                    max_calls=FILE_BUDGET.max_calls, warmup=FILE_BUDGET.warmup)
    m = measure_file_fresh(args.file, args.device, settings, budget, seed=args.seed)
    result = {"file": str(args.file), "runtime": runtime, "device": args.device, "batch_size": args.batch_size,
              "threads": args.threads, "dtype": args.dtype, **m.summary(),
              "fingerprint": Fingerprint.machine(args.device, settings)}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        fp = result["fingerprint"]
        print(f"{args.file}: {runtime} on {args.device} ({fp['device_name']}), batch {args.batch_size}, "
              f"{args.threads} thread(s), {args.dtype}")
        print(f"  p50 {m.p50_ms:.4f} ms  p90 {m.p90_ms:.4f} ms  p99 {m.p99_ms:.4f} ms  ({m.calls} calls in "
              f"{len(m.round_medians_ms)} rounds; fastest round's median {m.best_round_ms:.4f} ms)")
    return 0


def _print_validation(report: dict) -> None:
    for label in ("held_out", "held_out_uncorrected"):
        m = report[label]
        print(f"{label:<21} n={m['n']:3d}  MAPE {m['mape']:5.2f}%  within 5% {m['within_5'] * 100:5.1f}%  within 10% "
              f"{m['within_10'] * 100:5.1f}%  max {m['max_error']:5.1f}%  bias {m['bias']:+5.2f}%  Kendall tau "
              f"{m['kendall_tau']:.3f}")
    c, noise = report["correction"], report["noise"]
    factors = f", {report['op_factors']} op factors (ridge {c['ridge']:g})" if report["op_factors"] else ""
    print(f"correction            scale {c['scale']:.4f}, overhead {c['overhead_us']:.1f} us{factors} (fitted on "
          f"{c['fitted_on']} archs)")
    print(f"measurement noise     round spread median {noise['round_spread_median'] * 100:.1f}%, repeatability "
          f"median {noise['repeatability_median'] * 100:.1f}% (p90 {noise['repeatability_p90'] * 100:.1f}%)")
    print(f"report {report['report']}, plot {report['plot']}")


if __name__ == "__main__":
    sys.exit(main())
