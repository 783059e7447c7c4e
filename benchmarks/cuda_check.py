"""Helpers of benchmarks/cuda_check.sh: the pieces of the one-shot CUDA check that are easier in Python.

    python benchmarks/cuda_check.py env --device cuda --out WORK/env.json
    python benchmarks/cuda_check.py imports
    python benchmarks/cuda_check.py config --data-root .data/fashion-mnist --out WORK/fashion_mnist.yaml [--small]
    python benchmarks/cuda_check.py target --lut LUT --device cuda --out WORK/target.json [--frac 0.4]
    python benchmarks/cuda_check.py validation-md --report WORK/validation/validate-cuda_lut.json --out OUT/x.md
    python benchmarks/cuda_check.py results --work WORK --out OUT/results.json

Each command prints what it found and exits non-zero on failure, so the shell script can log it and go on. `results`
reads only files (no torch), so it is cheap enough to rerun after every step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "experiments" / "fashion_mnist.yaml"
SPACE = ROOT / "experiments" / "spaces" / "fashion_mnist.yaml"
NUM_CLASSES = 10  # Fashion-MNIST; the latency table's head op depends on it
REFERENCE = "shufflenet_v2_x0_5"

# SMALL=1 (the CPU dry run): the quick preset shrunk to a few steps, so that every step of search.py runs in seconds.
SMALL_PRESET = {
    "data": {"val_size": 1000},
    "supernet": {"epochs": 1, "max_steps_per_epoch": 5},
    "evaluate": {"bn_calibration_images": 250, "val_images": 250},
    "retrain": {"epochs": 1, "max_steps_per_epoch": 5},
}
PACKAGES = ("torch", "numpy", "onnx", "onnxscript", "onnxruntime", "optuna", "scipy", "matplotlib", "pyyaml", "tqdm",
            "typing_extensions", "markupsafe", "sqlalchemy", "alembic", "colorlog", "mako")


def write_json(path: str | Path, data: Any) -> None:
    """Atomically (a temporary file in the same folder, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """The file's data, or None when it is missing or unreadable (a step that did not get that far)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ---- env ----------------------------------------------------------------------------------------------------------


def cmd_env(args: argparse.Namespace) -> int:
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "packages": {name: version(name) for name in PACKAGES},
    }
    if torch.cuda.is_available():
        dev = torch.device(args.device if args.device.startswith("cuda") else "cuda")
        props = torch.cuda.get_device_properties(dev)
        info.update(device_name=torch.cuda.get_device_name(dev),
                    capability=".".join(map(str, torch.cuda.get_device_capability(dev))),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    for key, value in info.items():
        print(f"{key:<16} {value}")
    write_json(args.out, info)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device} but torch sees no CUDA device", file=sys.stderr)
        return 1
    return 0


# ---- imports ------------------------------------------------------------------------------------------------------


def cmd_imports(args: argparse.Namespace) -> int:
    """Import what `search.py --searcher optuna` imports, and check that ray is not among it (the GPU machine has no
    ray)."""
    start = time.perf_counter()
    import onnxruntime  # noqa: F401
    import onnxscript  # noqa: F401
    import optuna
    import scipy.optimize  # noqa: F401  (latency_lut.validation fits its correction with it)

    import search  # noqa: F401  (search.py: the module itself, as `python search.py` loads it)
    from experiments import data, evaluate, export, report, train  # noqa: F401
    from latency_lut import profiler, validation  # noqa: F401
    from searchers import optuna_searcher  # noqa: F401

    print(f"optuna {optuna.__version__} from {Path(optuna.__file__).parent}")
    print(f"imports took {time.perf_counter() - start:.1f} s")
    loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
    if loaded:
        print(f"error: the optuna path imported ray: {loaded[:5]}", file=sys.stderr)
        return 1
    print("ray: not imported (good: the GPU machine has none)")
    return 0


# ---- config -------------------------------------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    """experiments/fashion_mnist.yaml with data.root set (and the space path made absolute, since the copy lives
    elsewhere); with --small, the quick preset shrunk for a CPU dry run."""
    import yaml

    from experiments.config import load_experiment

    raw = yaml.safe_load(CONFIG.read_text())
    raw["space"] = str(SPACE)
    raw.setdefault("data", {})["root"] = str(Path(args.data_root).resolve())
    if args.small:
        quick = raw["presets"]["quick"]
        for section, values in SMALL_PRESET.items():
            quick[section] = {**(quick.get(section) or {}), **values}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_experiment(out, "quick")  # the derived file must load as search.py will load it
    print(f"{out}: data.root {cfg.data.root}, supernet {cfg.supernet.epochs} epoch(s) x "
          f"{cfg.supernet.max_steps_per_epoch} steps, retrain {cfg.retrain.epochs} epoch(s), "
          f"trials {cfg.search.trials}")
    return 0


# ---- target -------------------------------------------------------------------------------------------------------


def cmd_target(args: argparse.Namespace) -> int:
    """A target between the fastest and the slowest arch (`--frac` of the way), so that it binds.

    From the latency table when it covers the space; else from end-to-end measurements of the smallest and the
    largest arch on the device (a table that did not get finished must not stop the search step).
    """
    import torch

    from latency_lut import LatencyTable, Settings, measure_model
    from search_space import SearchSpace

    torch.set_num_threads(1)
    space = SearchSpace.from_yaml(SPACE)
    reference = space.reference(REFERENCE)
    info: dict[str, Any] = {"frac": args.frac}
    lut = Path(args.lut)
    table = LatencyTable.load(lut) if lut.exists() else None
    if table is not None and not table.missing(space):
        c = table.correction
        info.update(source="table", lut_entries=len(table), lut_complete=table.info.get("complete"),
                    profile_seconds=table.info.get("profile_seconds"), min_ms=table.min_latency(space),
                    max_ms=table.max_latency(space), reference_predicted_ms=table.predict(reference),
                    correction={"scale": c.scale, "overhead_us": c.overhead_us, "fitted_on": c.fitted_on},
                    fingerprint=table.fingerprint.to_dict())
    else:
        why = "missing" if table is None else f"{len(table.missing(space))} op(s) missing"
        print(f"latency table {lut}: {why}; measuring the smallest and largest archs end to end instead")
        settings = Settings(num_classes=NUM_CLASSES)
        g = space.geometry

        def ms(arch: Any) -> float:
            net = space.build(arch, NUM_CLASSES)
            return measure_model(net, (g.in_channels, g.input_size, g.input_size), args.device, settings).p50_ms

        info.update(source="measured", lut_entries=0 if table is None else len(table),
                    min_ms=ms(space.smallest()), max_ms=ms(space.largest()), reference_measured_ms=ms(reference))
    target = info["min_ms"] + args.frac * (info["max_ms"] - info["min_ms"])
    info["target_ms"] = float(f"{target:.3g}")  # three significant digits: a readable command line
    for key in ("source", "min_ms", "max_ms", "reference_predicted_ms", "reference_measured_ms", "target_ms"):
        if key in info:
            print(f"{key:<24} {info[key]}")
    write_json(args.out, info)
    return 0


# ---- validation report --------------------------------------------------------------------------------------------


def cmd_validation_md(args: argparse.Namespace) -> int:
    report = json.loads(Path(args.report).read_text())
    fp, c, noise = report["fingerprint"], report["correction"], report["noise"]
    lines = [
        f"# Latency table on {fp['device_kind']}: held-out validation",
        "",
        f"{fp['device_name']} (compute capability {fp['compute_capability']}), torch {fp['torch_version']}, CUDA "
        f"{fp['cuda_version']}, cuDNN {fp['cudnn_version']}; {fp['runtime']}, batch {fp['batch_size']}, "
        f"{fp['dtype']}, {fp['memory_format']}; space `{report['space']}`, {report['n']} sampled archs (seed "
        f"{report['seed']}), {c['fitted_on']} of them fit the correction, the others are held out; "
        f"{report['seconds']} s.",
        "",
        "| archs | n | MAPE | within ±5% | within ±10% | max error | bias | Kendall τ |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, key in (("held out, corrected", "held_out"), ("held out, uncorrected", "held_out_uncorrected"),
                       ("calibration", "calibration")):
        m = report.get(key)
        if m:
            lines.append(f"| {label} | {m['n']} | {m['mape']:.2f}% | {100 * m['within_5']:.0f}% | "
                         f"{100 * m['within_10']:.0f}% | {m['max_error']:.1f}% | {m['bias']:+.2f}% | "
                         f"{m['kendall_tau']:.3f} |")
    lines += [
        "",
        f"Correction: scale {c['scale']:.4f}, overhead {c['overhead_us']:.1f} us ({c['loss']}).",
        f"Noise: round spread median {100 * noise['round_spread_median']:.1f}% (p90 "
        f"{100 * noise['round_spread_p90']:.1f}%), repeatability median {100 * noise['repeatability_median']:.1f}% "
        f"(p90 {100 * noise['repeatability_p90']:.1f}%).",
        "",
        "| arch | role | measured ms | predicted ms | error |",
        "|---|---|---:|---:|---:|",
    ]
    for a in sorted(report["archs"], key=lambda a: a["measured_ms"]):
        error = (a["predicted_ms"] - a["measured_ms"]) / a["measured_ms"] * 100
        lines.append(f"| `{a['arch']}` | {a['role']} | {a['measured_ms']:.3f} | {a['predicted_ms']:.3f} | "
                     f"{error:+.1f}% |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[6:10]))
    return 0


# ---- results ------------------------------------------------------------------------------------------------------


def parse_throughput(path: Path) -> list[dict[str, Any]]:
    """The rows of bench_training.py throughput's markdown table."""
    rows = []
    try:
        text = path.read_text()
    except OSError:
        return rows
    pattern = re.compile(r"^\| (.+?) \| ([\d.]+) \| (\d+) \| (\d+) \| ([\d.]+) \|$")
    for line in text.splitlines():
        m = pattern.match(line.strip())
        if m:
            rows.append({"arch": m[1], "mflops": float(m[2]), "plain_img_s": int(m[3]),
                         "supernet_img_s": int(m[4]), "supernet_over_plain": float(m[5])})
    return rows


def read_steps(path: Path) -> list[dict[str, Any]]:
    """steps.tsv, written by the shell script: name, status, exit code, seconds, limit."""
    steps = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return steps
    for line in lines:
        name, status, rc, seconds, limit = line.split("\t")
        steps.append({"name": name, "status": status, "rc": int(rc), "seconds": float(seconds),
                      "limit_s": int(limit)})
    return steps


def search_summary(run_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"run_dir_exists": run_dir.is_dir()}
    if not run_dir.is_dir():
        return out
    out["steps_s"] = read_json(run_dir / "steps.json")
    out["run"] = read_json(run_dir / "run.json")
    trials = run_dir / "trials.csv"
    if trials.exists():
        out["trials_rows"] = max(len(trials.read_text().splitlines()) - 1, 0)
    ship = read_json(run_dir / "ship.json") or {}
    out["measured"] = ship.get("measured")
    out["winners"] = [
        {k: card.get(k) for k in ("folder", "predicted_ms", "measured_ms", "measured_p90_ms", "target_ms",
                                  "search_accuracy", "val_accuracy", "test_accuracy")}
        for card in (ship.get("shipped") or {}).values()
    ]
    for name in ("report.md", "pareto.png", "trials.csv"):
        out[f"has_{name}"] = (run_dir / name).exists()
    out["model_cards"] = sorted(str(p.relative_to(run_dir)) for p in run_dir.glob("winners/*/model_card.json"))
    out["exported"] = sorted(str(p.relative_to(run_dir)) for p in run_dir.glob("winners/*/model.*"))
    return out


def cmd_results(args: argparse.Namespace) -> int:
    work = Path(args.work)
    validation = None
    reports = sorted((work / "validation").glob("validate-*.json"))
    if reports:
        report = read_json(reports[0]) or {}
        validation = {k: report.get(k) for k in ("n", "seconds", "held_out", "held_out_uncorrected", "correction",
                                                 "noise")}
    results = {
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": read_json(work / "settings.json"),
        "steps": read_steps(work / "steps.tsv"),
        "env": read_json(work / "env.json"),
        "lut_and_target": read_json(work / "target.json"),
        "validation": validation,
        "throughput": parse_throughput(work / "throughput.md"),
        "search": search_summary(work / "run"),
        "pack": read_json(work / "pack.json"),
    }
    write_json(args.out, results)
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    """A few lines for the end of the console output (the rest is in results.json and log.txt)."""
    r = json.loads(Path(args.results).read_text())
    for s in r["steps"]:
        print(f"{s['name']:<12} {s['status']:<8} {s['seconds']:7.1f} s")
    target = r.get("lut_and_target") or {}
    if target:
        print(f"target {target.get('target_ms')} ms from {target.get('source')}: fastest {target.get('min_ms'):.3f} "
              f"ms, slowest {target.get('max_ms'):.3f} ms")
    held = (r.get("validation") or {}).get("held_out")
    if held:
        print(f"LUT held out: MAPE {held['mape']:.2f}%, within 10% {100 * held['within_10']:.0f}%, Kendall tau "
              f"{held['kendall_tau']:.3f} (n {held['n']})")
    for row in r.get("throughput") or []:
        print(f"throughput {row['arch']}: plain {row['plain_img_s']} img/s, supernet {row['supernet_img_s']} img/s "
              f"({row['supernet_over_plain']:.2f})")
    for w in (r.get("search") or {}).get("winners") or []:
        print(f"winner {w['folder']}: predicted {w['predicted_ms']:.3f} ms, measured {w['measured_ms']:.3f} ms "
              f"(target {w['target_ms']}), test accuracy {w['test_accuracy']:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/cuda_check.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env", help="versions and the device")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", required=True)
    sub.add_parser("imports", help="import the optuna path of search.py; fail if it imports ray")
    p = sub.add_parser("config", help="the fashion_mnist experiment file with data.root set")
    p.add_argument("--data-root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--small", action="store_true", help="shrink the quick preset (CPU dry run)")
    p = sub.add_parser("target", help="a binding target between the fastest and slowest arch")
    p.add_argument("--lut", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--frac", type=float, default=0.4)
    p.add_argument("--out", required=True)
    p = sub.add_parser("validation-md", help="the validation report as markdown")
    p.add_argument("--report", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("results", help="collect every step's figures into one JSON file")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("summary", help="print the main figures of results.json")
    p.add_argument("--results", required=True)
    args = parser.parse_args(argv)
    commands = {"env": cmd_env, "imports": cmd_imports, "config": cmd_config, "target": cmd_target,
                "validation-md": cmd_validation_md, "results": cmd_results, "summary": cmd_summary}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
