"""Helpers of benchmarks/cuda_check.sh: the pieces of the one-shot CUDA check that are easier in Python.

    python benchmarks/cuda_check.py env --device cuda --out WORK/env.json
    python benchmarks/cuda_check.py imports
    python benchmarks/cuda_check.py config --data-root .data/fashion-mnist --out WORK/fashion_mnist.yaml [--small]
    python benchmarks/cuda_check.py runtimes --device cuda --out WORK/runtimes.json
    python benchmarks/cuda_check.py file-runtimes --runtimes WORK/runtimes.json --file winners/1-.../model.pt2
    python benchmarks/cuda_check.py first-epoch --device cuda --config WORK/fashion_mnist.yaml --mode heuristic \
        --steps 25 --max-seconds 40 --out WORK/epoch-heuristic.json
    python benchmarks/cuda_check.py loader --device cuda --source .data/fashion-mnist --tree WORK/jpeg-tree \
        --max-seconds 60 --out WORK/loader.json
    python benchmarks/cuda_check.py results --work WORK --out OUT/results.json --md OUT/cuda_check.md
    python benchmarks/cuda_check.py summary --results OUT/results.json

Each command prints what it found and exits non-zero on failure, so the shell script can log it and go on. `results`
reads only files (no torch), so it is cheap enough to rerun after every step.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
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

# SMALL=1 (the CPU dry run): the quick preset shrunk to a few steps, so that every step of search.py runs in seconds.
SMALL_PRESET = {
    "data": {"val_size": 1000},
    "supernet": {"epochs": 1, "max_steps_per_epoch": 5},
    "evaluate": {"bn_calibration_images": 250, "val_images": 250},
    "retrain": {"epochs": 1, "max_steps_per_epoch": 5},
}
PACKAGES = ("torch", "numpy", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "tensorrt", "optuna", "scipy",
            "matplotlib", "pyyaml", "tqdm",
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
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        info["onnxruntime_providers"] = None
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
    from experiments import checkpoints, data, evaluate, export, report, train, training  # noqa: F401
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


# ---- runtimes ----------------------------------------------------------------------------------------------------


def cmd_runtimes(args: argparse.Namespace) -> int:
    """Which runtimes can run on the device here, each with the one-line reason the CLIs give when it cannot."""
    from latency_lut import LutError, Settings, resolve_device
    from latency_lut.fingerprint import RUNTIMES, check_settings

    out: dict[str, Any] = {"device": args.device, "runtimes": {}}
    for runtime in RUNTIMES:
        try:
            check_settings(resolve_device(args.device), Settings(runtime=runtime, num_classes=NUM_CLASSES))
            out["runtimes"][runtime] = {"available": True, "error": None}
        except (LutError, ImportError) as e:
            out["runtimes"][runtime] = {"available": False, "error": " ".join(str(e).split())}
        r = out["runtimes"][runtime]
        print(f"{runtime:<13} {'available' if r['available'] else 'unavailable: ' + r['error']}")
    write_json(args.out, out)
    return 0


def cmd_file_runtimes(args: argparse.Namespace) -> int:
    """The available runtimes that run a shipped file (its suffix), one per line."""
    from latency_lut import SHIPPED_FILES

    runtimes = (read_json(Path(args.runtimes)) or {}).get("runtimes", {})
    suffix = Path(args.file).suffix
    for runtime, name in SHIPPED_FILES.items():
        if Path(name).suffix == suffix and runtimes.get(runtime, {}).get("available"):
            print(runtime)
    return 0


# ---- the supernet's first epoch -----------------------------------------------------------------------------------

EPOCH_MODES = ("heuristic", "off", "autotune")  # experiments/cudnn.py's modes; supernet training uses heuristic


def cmd_first_epoch(args: argparse.Namespace) -> int:
    """Training steps of the quick preset's supernet on `--steps` new archs, then on the same archs again.

    New archs bring convolution shapes cuDNN has not met in this process (a plan is built for each, or with
    autotuning several are timed); the same archs again meet only cached shapes. The ratio of the two per-step times
    is the one-time cost per new shape that a supernet's first epoch pays. Random images stand in for the data (the
    cost depends on the shapes, not the values). New archs get at most 70% of `--max-seconds`; the JSON is
    rewritten after every step, so a timeout keeps what ran.
    """
    import torch

    from experiments.cudnn import MODES, cudnn_mode

    device = torch.device(args.device)
    enabled, benchmark = MODES[args.mode]
    result: dict[str, Any] = {"mode": args.mode, "device": str(device), "new_shapes_s": [], "same_shapes_s": [],
                              "cudnn": {"enabled": enabled, "benchmark": benchmark} if device.type == "cuda" else None}
    with cudnn_mode(device, args.mode):
        _supernet_steps(args, device, result)
    n = len(result["same_shapes_s"])
    if n:
        new, same = sum(result["new_shapes_s"][:n]) / n, sum(result["same_shapes_s"]) / n
        result.update(steps_compared=n, new_shapes_step_s=new, same_shapes_step_s=same, ratio=new / same)
        print(f"{args.mode}: {n} steps on new archs {new:.3f} s/step, the same archs again {same:.3f} s/step "
              f"({new / same:.1f}x)")
    write_json(args.out, result)
    return 0 if n else 1


def _supernet_steps(args: argparse.Namespace, device: Any, result: dict[str, Any]) -> None:
    import contextlib

    import numpy as np
    import torch
    import torch.nn.functional as F

    from experiments.config import load_experiment
    from search_space import SearchSpace, Supernet

    recipe = load_experiment(args.config, "quick").supernet
    cuda = device.type == "cuda"
    space = SearchSpace.from_yaml(SPACE)
    torch.manual_seed(0)
    fmt = torch.channels_last if recipe.channels_last else torch.contiguous_format
    supernet = Supernet(space, NUM_CLASSES).to(device).to(memory_format=fmt)
    optimizer = torch.optim.SGD(supernet.parameters(), lr=recipe.lr, momentum=0.9, nesterov=True)
    g = space.geometry
    batch = args.batch_size or recipe.batch_size
    images = torch.randn(batch, g.in_channels, g.input_size, g.input_size, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.amp) if cuda else None
    result.update(batch_size=batch, amp=recipe.amp if cuda else "off", channels_last=recipe.channels_last)
    rng = np.random.default_rng(0)
    archs = [space.sample(rng) for _ in range(args.steps)]

    def step(arch: Any) -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
            logits = supernet(images, arch)
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    step(space.smallest())  # CUDA context, cuBLAS handles, the allocator: not what is measured here
    start = time.monotonic()
    for key, deadline in (("new_shapes_s", start + 0.7 * args.max_seconds), ("same_shapes_s", None)):
        for arch in archs[:len(result["new_shapes_s"])] if deadline is None else archs:
            if time.monotonic() > (deadline or start + args.max_seconds):
                result["stopped"] = f"{key}: the time given to it (--max-seconds {args.max_seconds}) ran out"
                break
            result[key].append(round(step(arch), 5))
            write_json(args.out, result)


# ---- the training loader against the same batches in memory -------------------------------------------------------

IMAGENET_CONFIG = ROOT / "experiments" / "imagenet.yaml"
LOADER_GOAL = 0.90  # the loader is not the bottleneck when training fed by it runs at >= 90% of the in-memory rate
_PRE_WARM_TIMED = 1  # steps on shapes already met, after the pre-warm, that size the blocks to the time given


def cmd_loader(args: argparse.Namespace) -> int:
    """Supernet training steps of experiments/imagenet.yaml's recipe at 224 px, fed by the ImageFolder training loader
    (as search.py's supernet training is) against the same steps on the same batches already on the device.

    A Fashion-MNIST JPEG tree is written first (benchmarks/make_jpeg_tree.py); the training split is repeated so
    that one loader pass is exactly one block of steps (warm-up + timed), so no decoding runs past a block into the
    next. Both feeds go through `_SupernetLoop._epoch`, the training loop itself (channels_last, the sandwich step
    with distillation, bf16 autocast, the optimiser and the schedule), with the same `--arch-sets` sandwich sets in
    the same order; a pre-warm on random images meets every convolution shape first, so that neither feed pays
    cuDNN's one-time plans. The batches in memory are the loader's own first pass (float32, normalised, on the
    device), so both feeds train on the same images. Blocks run memory, loader (, nvjpeg) and then in the reverse
    order, `--rounds` times over. Each block drops its first `--warmup` steps (the first batch waits for one worker
    to decode all of it) and times a multiple of the worker count: the workers start together and each decodes a
    whole batch, so batches arrive in bursts of one per worker, and a window of whole bursts times their rate
    wherever it starts. Later rounds are skipped when they would not fit in `--max-seconds`; the JSON is rewritten
    after every block.
    """
    import dataclasses
    import functools
    import importlib.util

    import numpy as np
    import torch
    from tqdm import tqdm

    from benchmarks.make_jpeg_tree import make_tree
    from experiments.config import load_experiment
    from experiments.cudnn import cudnn_mode
    from experiments.data import DEFAULT_FASHION_MNIST, load_splits
    from experiments.distributed import DistContext
    from experiments.training import _SupernetLoop
    from search_space import SearchSpace, Supernet

    deadline = time.monotonic() + args.max_seconds
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    counts = make_tree(Path(args.source or DEFAULT_FASHION_MNIST), Path(args.tree), per_class=args.per_class,
                       val_per_class=1, size=args.file_size, progress=False)
    tree_s = time.perf_counter() - start
    base = load_experiment(IMAGENET_CONFIG, None)
    cfg = dataclasses.replace(
        base, device=args.device,
        data=dataclasses.replace(base.data, root=str(Path(args.tree).resolve()), val_size=10,
                                 image_size=args.image_size or base.data.image_size),
        supernet=dataclasses.replace(base.supernet, batch_size=args.batch_size or base.supernet.batch_size),
    )
    recipe, batch = cfg.supernet, cfg.supernet.batch_size
    splits = load_splits(cfg.data, cfg.seed)
    workers = splits.train.workers
    warmup = args.warmup
    result: dict[str, Any] = {
        "device": str(device), "goal": LOADER_GOAL, "cores": len(os.sched_getaffinity(0)),
        "tree": {"images": counts["train"], "file_px": args.file_size, "seconds": round(tree_s, 1)},
        "image_size": splits.image_size, "batch_size": batch, "workers": workers, "decoder": cfg.data.decoder,
        "pin_memory": cuda, "amp": recipe.amp if cuda else "off", "channels_last": recipe.channels_last,
        "sampling": recipe.sampling, "sandwich_random": recipe.sandwich_random, "distill": recipe.distill,
        "arch_sets": args.arch_sets, "warmup_steps": warmup, "variants": {},
    }
    print(f"tree: {counts['train']} training images at {args.file_size} px in {tree_s:.1f} s; batch {batch}, "
          f"{workers} workers, {recipe.sampling} sampling, amp {result['amp']}")

    space = SearchSpace.from_yaml(cfg.space)
    torch.manual_seed(cfg.seed)
    loop = _SupernetLoop(Supernet(space, splits.num_classes), splits, cfg, {"kind": "cuda_check loader"},
                         Path(args.tree) / "no-run", cfg.seed, device, False, DistContext())  # no checkpoint there
    plan = [loop.archs() for _ in range(args.arch_sets)]  # the sandwich sets every block trains, in this order
    position = [0]

    def archs() -> list[Any]:
        position[0] += 1
        return plan[(position[0] - 1) % len(plan)]

    loop.archs = archs  # type: ignore[method-assign]
    bar = tqdm(disable=True)

    def run(batches: Any, steps: int, skip: int, first: int = 0) -> float:
        """`steps` training steps of the loop on `batches` (a function of the epoch), starting at sandwich set
        `first`; the seconds of all but the first `skip`."""
        marks: list[float] = []

        def feed(epoch: int) -> Any:
            for i, item in enumerate(batches(epoch)):
                if i == skip:
                    sync()
                    marks.append(time.perf_counter())
                yield item
            sync()
            marks.append(time.perf_counter())

        position[0] = first
        loop._batches = feed  # type: ignore[method-assign]
        loop.steps_per_epoch = steps
        loop._epoch(0, bar)
        return marks[-1] - marks[0]

    fmt = torch.channels_last if recipe.channels_last else torch.contiguous_format
    side = splits.image_size
    noise = torch.randn(batch, splits.in_channels, side, side, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, splits.num_classes, (batch,), device=device)
    with cudnn_mode(device, loop.cudnn):
        # The pre-warm: each sandwich set once, on random images; the sets it has no time for (a quarter of the time
        # given) are dropped, so that new shapes cannot eat the blocks' time.
        start = time.perf_counter()
        for k in range(len(plan)):
            if k and time.perf_counter() - start > args.max_seconds / 4:
                del plan[k:]
                break
            run(lambda _: [(noise, labels)], 1, 0, first=k)
        warm_s = time.perf_counter() - start
        step_s = run(lambda _: [(noise, labels)] * _PRE_WARM_TIMED, _PRE_WARM_TIMED, 0) / _PRE_WARM_TIMED
        result.update(arch_sets=len(plan), pre_warm={"steps": len(plan), "seconds": round(warm_s, 2),
                                                     "step_s": round(step_s, 4)})
        # Blocks of warm-up + a multiple of `workers` timed steps; the first round (its loader pass collected into
        # memory, then memory and loader) is sized to take at most half the time left.
        multiple = max(1, round(args.steps / workers))
        left = deadline - time.monotonic()
        while multiple > 1 and 3 * (warmup + multiple * workers) * step_s * 1.5 > left / 2:
            multiple -= 1
        steps = multiple * workers
        per_pass = (warmup + steps) * batch
        train = splits.train.subset(np.resize(np.arange(len(splits.train)), per_pass))  # one pass = one block
        loop.splits = dataclasses.replace(splits, train=train)
        real_batches = functools.partial(_SupernetLoop._batches, loop)  # the loop's own: its make_loader
        result.update(steps=steps, images_per_pass=per_pass)
        print(f"pre-warm: {len(plan)} sandwich sets in {warm_s:.1f} s, then {step_s:.3f} s/step; "
              f"blocks of {warmup} warm-up + {steps} timed steps")
        write_json(args.out, result)

        start = time.perf_counter()
        memory = list(loop._loader(0))  # the pass every loader block decodes again
        sync()
        result["memory_collect_s"] = round(time.perf_counter() - start, 2)
        sources: dict[str, Any] = {"memory": lambda _: iter(memory), "loader": real_batches}
        labels_of = {"memory": "batches in device memory",
                     "loader": f"ImageFolder loader (pil, {workers} workers{', pinned' if cuda else ''})"}
        skipped = None
        if not cuda:
            skipped = "skipped: nvJPEG decodes on a CUDA device"
        elif importlib.util.find_spec("torchvision") is None:
            skipped = "skipped: torchvision is not installed"
        else:
            nvjpeg = dataclasses.replace(train, decoder="torchvision")
            sources["nvjpeg"] = lambda epoch: _with_train(loop, splits, nvjpeg, real_batches, epoch)
            labels_of["nvjpeg"] = f"ImageFolder loader (torchvision nvJPEG, {workers} workers reading the files)"
        for name in sources:
            result["variants"][name] = {"feed": labels_of[name], "blocks": []}
        if skipped:
            feed = "ImageFolder loader (data.decoder: torchvision)"
            result["variants"]["nvjpeg"] = {"feed": feed, "skipped": skipped}

        for r in range(args.rounds):
            order = list(sources) if r % 2 == 0 else list(reversed(sources))
            seen = [b["seconds"] / steps for v in result["variants"].values() for b in v.get("blocks", [])]
            estimate = len(order) * (warmup + steps) * max(seen or [step_s]) * 1.2  # the whole round, or none of it
            if r > 0 and time.monotonic() + estimate > deadline:
                result["stopped"] = f"after round {r}: round {r + 1} would not fit in {args.max_seconds:g} s"
                break
            for name in order:
                variant = result["variants"][name]
                try:
                    seconds = run(sources[name], warmup + steps, warmup)
                except Exception as e:  # noqa: BLE001  (the GPU decoder is optional: its failure is a result)
                    if name != "nvjpeg":
                        raise
                    variant["error"] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
                    print(f"nvjpeg: {variant['error']}")
                    del sources["nvjpeg"]
                    continue
                variant["blocks"].append({"round": r + 1, "seconds": round(seconds, 3),
                                          "images_per_s": round(steps * batch / seconds, 1)})
                rate = _rate(steps * batch / seconds)
                print(f"round {r + 1} {name:<7} {steps} steps in {seconds:.2f} s: {rate} img/s")
                _loader_summary(result)
                write_json(args.out, result)
    _loader_summary(result)
    write_json(args.out, result)
    ratio = result.get("ratio")
    if ratio is None:
        print("error: no block of both the loader and memory ran", file=sys.stderr)
        return 1
    print(f"loader / memory: {ratio:.3f} (goal >= {LOADER_GOAL:.2f}: {'met' if ratio >= LOADER_GOAL else 'not met'})")
    return 0


def _rate(images_per_s: float) -> str:
    return f"{images_per_s:,.0f}" if images_per_s >= 100 else f"{images_per_s:.1f}"


def _with_train(loop: Any, splits: Any, train: Any, batches: Any, epoch: int) -> Any:
    """`batches(epoch)` with `train` as the loop's training split for the pass."""
    import dataclasses

    before = loop.splits
    loop.splits = dataclasses.replace(splits, train=train)
    try:
        yield from batches(epoch)
    finally:
        loop.splits = before


def _loader_summary(result: dict[str, Any]) -> None:
    """Each feed's images/s over all its blocks (images over seconds), and each against memory."""
    steps, batch = result.get("steps"), result["batch_size"]
    for v in result["variants"].values():
        blocks = v.get("blocks") or []
        if blocks:
            v["images_per_s"] = round(len(blocks) * steps * batch / sum(b["seconds"] for b in blocks), 1)
    memory = result["variants"].get("memory", {}).get("images_per_s")
    for v in result["variants"].values():
        if memory and v.get("images_per_s"):
            v["vs_memory"] = round(v["images_per_s"] / memory, 4)
    result["ratio"] = result["variants"].get("loader", {}).get("vs_memory")


# ---- results ------------------------------------------------------------------------------------------------------


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


def tables(work: Path) -> list[dict[str, Any]]:
    """Every latency table's settings, profiling time, range and held-out validation."""
    out = []
    for lut in sorted((work / "luts").glob("*.json")):
        data = read_json(lut) or {}
        fp, info = data.get("fingerprint") or {}, data.get("info") or {}
        row: dict[str, Any] = {"table": lut.stem, "runtime": fp.get("runtime"), "batch_size": fp.get("batch_size"),
                               "dtype": fp.get("dtype"), "entries": len(data.get("entries") or []),
                               "complete": info.get("complete"), "method": info.get("method"),
                               "profile_seconds": info.get("profile_seconds")}
        report = read_json(work / "validation" / f"validate-{lut.stem}.json")
        if report is None:  # where search.py validated a table itself
            report = read_json(work / "luts" / f"{lut.stem}-validation" / f"validate-{lut.stem}.json")
        if report:
            row.update({k: report.get(k) for k in ("n", "seconds", "held_out", "held_out_uncorrected", "correction",
                                                   "noise")})
            measured = [a["measured_ms"] for a in report.get("archs", [])]
            if measured:
                row["measured_range_ms"] = [min(measured), max(measured)]
        out.append(row)
    return out


def search_summary(run_dir: Path, home: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"run_dir_exists": run_dir.is_dir()}
    if not run_dir.is_dir():
        return out
    out["steps_s"] = read_json(run_dir / "steps.json")
    out["targets"] = read_json(run_dir / "targets.json")
    calibration = read_json(run_dir / "calibration.json")
    if calibration:
        ratios = [a["measured_ms"] / a["predicted_ms"] for a in calibration.get("archs", [])]
        out["calibration"] = {"ratio": calibration.get("ratio"), "archs": len(ratios),
                              "measured_over_predicted": [round(r, 3) for r in ratios]}
    predicted: dict[str, float] = {}  # the table's prediction of every candidate (rescaled by the calibration)
    for trials in sorted(run_dir.glob("trials*.csv")):
        with trials.open() as f:
            rows = list(csv.DictReader(f))
        out[f"{trials.stem}_rows"] = len(rows)
        predicted.update({r["arch"]: float(r["predicted_ms"]) for r in rows if r.get("predicted_ms")})
    ship = read_json(run_dir / "ship.json") or {}
    out["verdicts"] = [{"arch": arch, "predicted_ms": predicted.get(arch), "measured_ms": v.get("ms"),
                        "tries_ms": v.get("tries_ms")}
                       for arch, v in (ship.get("measured") or {}).items()]
    out["winners"] = []
    for path in sorted(run_dir.glob("winners/**/model_card.json")):
        card = read_json(path) or {}
        out["winners"].append({"folder": str(path.parent.relative_to(run_dir)),
                               **{k: card.get(k) for k in ("arch", "predicted_ms", "measured_ms", "target_ms",
                                                           "runtime", "search_accuracy", "val_accuracy",
                                                           "test_accuracy")}})
    for name in ("report.md", "pareto.png", "trials.csv"):
        out[f"has_{name}"] = (run_dir / name).exists()
    out["supernet_epochs"] = [
        {"folder": path.parent.name, "history": [{k: h.get(k) for k in ("epoch", "seconds", "images_per_s", "loss")}
                                                 for h in (read_json(path) or {}).get("history", [])]}
        for path in sorted(home.glob("supernets/*/supernet.json"))
    ]
    return out


def cmd_results(args: argparse.Namespace) -> int:
    work = Path(args.work)
    results = {
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": read_json(work / "settings.json"),
        "steps": read_steps(work / "steps.tsv"),
        "env": read_json(work / "env.json"),
        "runtimes": read_json(work / "runtimes.json"),
        "tables": tables(work),
        "search": search_summary(work / "run", work / "home"),
        "measured_files": [
            {"name": path.stem, **{k: m.get(k) for k in ("file", "runtime", "batch_size", "dtype", "p50_ms",
                                                         "p90_ms", "p99_ms", "calls")}}
            for path in sorted((work / "measure").glob("*.json")) if (m := read_json(path))
        ],
        "first_epoch": [m for mode in EPOCH_MODES if (m := read_json(work / f"epoch-{mode}.json"))],
        "loader": read_json(work / "loader.json"),
        "pack": read_json(work / "pack.json"),
    }
    write_json(args.out, results)
    if args.md:
        Path(args.md).write_text(markdown(results))
    return 0


def _pct(x: Any) -> str:
    return f"{100 * x:.0f}%" if isinstance(x, int | float) else "-"


def markdown(r: dict[str, Any]) -> str:
    """The figures of results.json as markdown tables."""
    settings, env = r.get("settings") or {}, r.get("env") or {}
    lines = [
        f"# benchmarks/cuda_check.sh on {env.get('device_name', settings.get('device'))}",
        "",
        f"Commit `{settings.get('commit')}`, started {settings.get('started')}; torch {env.get('torch')}, CUDA "
        f"{env.get('torch_cuda')}, cuDNN {env.get('cudnn')}, onnxruntime providers {env.get('onnxruntime_providers')}.",
        "",
        "| step | status | seconds |",
        "|---|---|---:|",
        *[f"| {s['name']} | {s['status']} | {s['seconds']:.1f} |" for s in r.get("steps") or []],
        "",
        "## Latency tables: held-out validation",
        "",
        "| runtime | batch | dtype | entries | profile s | n | MAPE | within ±10% | max error | Kendall τ "
        "| measured ms |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for t in r.get("tables") or []:
        held = t.get("held_out") or {}
        span = t.get("measured_range_ms")
        lines.append(f"| {t['runtime']} | {t['batch_size']} | {t['dtype']} | {t['entries']} | "
                     f"{t.get('profile_seconds') or 0:.0f} | {held.get('n', '-')} | "
                     f"{held.get('mape', float('nan')):.2f}% | {_pct(held.get('within_10'))} | "
                     f"{held.get('max_error', float('nan')):.1f}% | {held.get('kendall_tau', float('nan')):.3f} | "
                     f"{f'{span[0]:.3f}-{span[1]:.3f}' if span else '-'} |")
    search = r.get("search") or {}
    lines += ["", "## search.py --preset quick", ""]
    if search.get("steps_s"):
        lines.append("Steps (s): " + ", ".join(f"{k} {v:.1f}" for k, v in search["steps_s"].items()))
    for sn in search.get("supernet_epochs") or []:
        lines.append("Supernet epochs (s): " + ", ".join(f"{h['epoch']}: {h['seconds']:.1f}" for h in sn["history"]))
    if search.get("calibration"):
        c = search["calibration"]
        lines.append(f"Calibration: {c['archs']} archs measured/predicted {c['measured_over_predicted']}, ratio "
                     f"{c['ratio']}")
    verdicts = search.get("verdicts") or []
    if verdicts:
        ratios = sorted(v["measured_ms"] / v["predicted_ms"] for v in verdicts
                        if v.get("measured_ms") and v.get("predicted_ms"))
        lines.append(f"Verdicts: {len(verdicts)} shipped files measured, measured/predicted "
                     f"{ratios[0]:.2f}-{ratios[-1]:.2f} (median {ratios[len(ratios) // 2]:.2f})" if ratios else "")
    for w in search.get("winners") or []:
        lines.append(f"Winner `{w['arch']}` ({w['runtime']}): predicted {w['predicted_ms']:.3f} ms, measured "
                     f"{w['measured_ms']:.3f} ms, budget {w['target_ms']:.3f} ms, test accuracy "
                     f"{w['test_accuracy']:.4f}")
    lines += ["", "## Shipped files (python -m latency_lut measure, fresh process)", "",
              "| file | runtime | p50 ms | p90 ms | p99 ms | calls |", "|---|---|---:|---:|---:|---:|"]
    for m in r.get("measured_files") or []:
        lines.append(f"| {Path(m['file']).parent.name}/{Path(m['file']).name} | {m['runtime']} | {m['p50_ms']:.4f} | "
                     f"{m['p90_ms']:.4f} | {m['p99_ms']:.4f} | {m['calls']} |")
    lines += ["", "## Supernet steps: new convolution shapes vs the same again", "",
              "| cuDNN mode | steps | new shapes s/step | same shapes s/step | ratio |", "|---|---:|---:|---:|---:|"]
    for e in r.get("first_epoch") or []:
        if "ratio" in e:
            lines.append(f"| {e['mode']} | {e['steps_compared']} | {e['new_shapes_step_s']:.3f} | "
                         f"{e['same_shapes_step_s']:.3f} | {e['ratio']:.1f}x |")
        else:
            lines.append(f"| {e['mode']} | {len(e['new_shapes_s'])} (stopped) | - | - | - |")
    lines += ["", "## Supernet training: the ImageFolder loader vs the same batches in memory", ""]
    lines += loader_markdown(r.get("loader"))
    return "\n".join(lines) + "\n"


def loader_markdown(x: dict[str, Any] | None) -> list[str]:
    """The loader step's table: images/s of each feed and its ratio to the batches in memory."""
    if not x:
        return []
    tree = x.get("tree") or {}
    lines = [
        f"experiments/imagenet.yaml's supernet recipe ({x['sampling']} sampling with {x['sandwich_random']} random "
        f"archs, distillation {'on' if x['distill'] else 'off'}, amp {x['amp']}, channels_last "
        f"{'on' if x['channels_last'] else 'off'}), batch {x['batch_size']} at {x['image_size']} px on {x['device']}; "
        f"{x['workers']} decoding workers (the default for {x['cores']} cores); {tree.get('images')} Fashion-MNIST "
        f"JPEG files of {tree.get('file_px')} px, read from the page cache. Each block: {x['warmup_steps']} warm-up "
        f"+ {x.get('steps')} timed steps over the same {x['arch_sets']} sandwich set(s), every shape met before.",
        "",
        "| feed | images/s of each block | images/s | vs memory |",
        "|---|---:|---:|---:|",
    ]
    for name, v in (x.get("variants") or {}).items():
        if "images_per_s" in v:
            each = ", ".join(_rate(b["images_per_s"]) for b in v["blocks"])
            lines.append(f"| {v['feed']} | {each} | {_rate(v['images_per_s'])} | {v['vs_memory']:.3f} |")
        else:
            lines.append(f"| {v.get('feed', name)} | - | {v.get('skipped') or v.get('error') or 'not run'} | - |")
    ratio = x.get("ratio")
    if ratio is not None:
        verdict = "met" if ratio >= x["goal"] else "not met"
        lines += ["", f"Loader / memory: **{ratio:.3f}** (goal >= {x['goal']:.2f}: {verdict})."]
    if x.get("stopped"):
        lines += ["", f"Stopped: {x['stopped']}."]
    return lines


def cmd_summary(args: argparse.Namespace) -> int:
    """A few lines for the end of the console output (the rest is in results.json, cuda_check.md and log.txt)."""
    r = json.loads(Path(args.results).read_text())
    print(markdown(r))
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
    p = sub.add_parser("runtimes", help="which runtimes run on the device here, with the reason where one cannot")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", required=True)
    p = sub.add_parser("file-runtimes", help="the available runtimes that run a shipped file")
    p.add_argument("--runtimes", required=True)
    p.add_argument("--file", required=True)
    p = sub.add_parser("first-epoch", help="supernet steps on new archs, then the same archs again")
    p.add_argument("--device", default="cuda")
    p.add_argument("--config", required=True)
    p.add_argument("--mode", choices=EPOCH_MODES, default="heuristic")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=None, help="default: the quick preset's supernet batch")
    p.add_argument("--max-seconds", type=float, default=40.0)
    p.add_argument("--out", required=True)
    p = sub.add_parser("loader", help="supernet training fed by the ImageFolder loader vs the same batches in memory")
    p.add_argument("--device", default="cuda")
    p.add_argument("--source", default=None, help="folder of the Fashion-MNIST IDX files (default: Debian's)")
    p.add_argument("--tree", required=True, help="where the JPEG tree is written (kept: a rerun reuses it)")
    p.add_argument("--per-class", type=int, default=200, help="training images per class in the tree")
    p.add_argument("--file-size", type=int, default=224, help="side of the tree's JPEG files in pixels")
    p.add_argument("--batch-size", type=int, default=None, help="default: experiments/imagenet.yaml's (256)")
    p.add_argument("--image-size", type=int, default=None, help="training crop in pixels (default: its 224)")
    p.add_argument("--steps", type=int, default=32, help="timed steps per block, rounded to a multiple of the workers")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps at the start of each block")
    p.add_argument("--rounds", type=int, default=2, help="rounds of one block per feed, the order reversed each round")
    p.add_argument("--arch-sets", type=int, default=8, help="sandwich sets (largest, smallest, randoms) cycled")
    p.add_argument("--max-seconds", type=float, default=60.0, help="later rounds are skipped past this")
    p.add_argument("--out", required=True)
    p = sub.add_parser("results", help="collect every step's figures into one JSON file (and markdown)")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--md", default=None)
    p = sub.add_parser("summary", help="print the main figures of results.json")
    p.add_argument("--results", required=True)
    args = parser.parse_args(argv)
    commands = {"env": cmd_env, "imports": cmd_imports, "config": cmd_config, "runtimes": cmd_runtimes,
                "file-runtimes": cmd_file_runtimes, "first-epoch": cmd_first_epoch, "loader": cmd_loader,
                "results": cmd_results,
                "summary": cmd_summary}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
