"""Profiling: measure every op of a space on one device and write the table as it goes.

Two ways to time an op:

- ``insitu`` (eager, the default): the op is timed inside a real network. Probe networks (`ops.probe_archs`, a
  few hundred archs of the space that together hold every op) run as their ops in turn, with a clock read between
  ops. Each op then runs where it runs in a network: its input was just written by the op before it and its
  weights were last touched one forward ago. Timed alone in a loop, an op finds its weights and buffers hot in
  cache: on this project's 2-core EPYC a unit ran 6-40% slower inside a network than alone (median 20%), the
  first unit after the stem 1.3-2.1x, the head 1.2-1.6x (its classifier's weights, 4 MB and up, exceed L2), and
  the stem not at all. Over the ~20 ops of a network these gaps average out, so a fitted correction repairs
  isolated sums too (benchmarks/results/lut_cpu.md), but in-situ sums are right before any correction, their
  per-op figures are what an op costs in a network (`LatencyTable.breakdown`), and one probe forward times a
  dozen ops at once, so profiling takes about half as long. On CUDA the clock is a CUDA event between ops.
- ``isolated`` (the only way for the runtimes other than eager): each op is its own module, its own ONNX Runtime
  session with its input and output bound once (onnxruntime, ort-cuda, ort-tensorrt), or its own CUDA graph
  (cudagraph); the ops of a group of probes are timed in interleaved rounds. The runtime's per-run cost (the
  ``call`` op: an identity model, or a graph of one tiny copy) is subtracted from each op and counted once per
  network: a network is one session run or one graph replay, whatever the number of its ops.

Both use `timing.measure_interleaved` on groups of probes: rounds visit every probe (or op) of the group in a
shuffled order, and an entry is the median of its fastest round. The allocator is pinned first
(`timing.pin_allocator`): otherwise whether a large activation costs page faults depends on the history of the
process, and the same unit measured 0.76 ms in one process and 1.45 ms in another.

Interrupting (Ctrl-C, SIGTERM) saves what has been measured; running the same command again measures only the
missing ops (probes are chosen afresh to cover exactly those) and never repeats an entry.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from latency_lut.errors import LutError
from latency_lut.fingerprint import Fingerprint, Settings, check_settings, is_ort, resolve_device
from latency_lut.ops import (
    CallOverhead,
    OpSignature,
    arch_ops,
    call_op,
    enumerate_ops,
    network_ops,
    op_inputs,
    probe_archs,
)
from latency_lut.table import Entry, LatencyTable
from latency_lut.timing import (
    Budget,
    ChainRunner,
    CudaGraphRunner,
    EagerRunner,
    OrtRunner,
    Runner,
    export_onnx,
    measure_interleaved,
    pin_allocator,
    summarize,
    thread_count,
)
from search_space import Arch, SearchSpace
from search_space.files import cache_home
from search_space.network import ShuffleNetV2

METHODS = ("insitu", "isolated")
DEFAULT_BUDGET = Budget(rounds=5, block_s=0.03, min_calls=3, max_calls=50, warmup=2)


def default_out(space: SearchSpace, device: str | torch.device, settings: Settings) -> Path:
    """<cache>/luts/<space>-<device kind>-<runtime>-b<batch>-t<threads>-<dtype>[-cl]-<statistic>.json, where <cache>
    is $SHUFFLENAS_HOME or ~/.cache/shufflenas (`search_space.files.cache_home`): every run on the machine shares it."""
    kind = resolve_device(device).type
    suffix = "-cl" if settings.memory_format == "channels_last" else ""
    name = (f"{space.name}-{kind}-{settings.runtime}-b{settings.batch_size}-t{settings.threads}-{settings.dtype}"
            f"{suffix}-{settings.statistic}.json")
    return cache_home() / "luts" / name


def default_method(settings: Settings) -> str:
    return "insitu" if settings.runtime == "eager" else "isolated"


def profile(space: SearchSpace, out: str | Path, device: str | torch.device = "cpu",
            settings: Settings | None = None, *, method: str | None = None, budget: Budget | None = None,
            group: int = 16, allow_mismatch: bool = False, progress: bool = True, save_every_s: float = 5.0,
            seed: int = 0) -> LatencyTable:
    """Measure every op of `space` not yet in the table at `out`, saving it every `save_every_s` seconds.

    Args:
        space: the space whose ops to measure (`enumerate_ops`).
        out: the table file; if it exists, its entries are kept and only missing ops are measured.
        device: "cpu", "cuda" or "cuda:N".
        settings: runtime, batch size, threads, dtype, memory format, classes (default `Settings()`).
        method: "insitu" or "isolated" (default: insitu for eager, isolated for the others; see module doc).
        budget: rounds and block length per probe or op.
        group: probes timed together in interleaved rounds.
        allow_mismatch: continue a table whose fingerprint differs from this machine's.
        progress: show a progress bar on stderr.
        save_every_s: seconds between saves (an interrupt saves too).
        seed: seeds the probes' weights and inputs and the order of the rounds.

    Returns:
        the table (also saved at `out`).

    Raises:
        LutError: bad settings for the device, a table for another geometry or method, an unreadable table.
        KeyboardInterrupt: after saving, when interrupted (SIGTERM is turned into one while profiling).
    """
    settings = settings or Settings()
    dev = resolve_device(device)
    method = _checked_method(dev, settings, method, group)
    budget = budget or DEFAULT_BUDGET
    out = Path(out)
    fingerprint = Fingerprint.current(dev, settings, space.geometry)
    table = _open_table(out, space, fingerprint, method, allow_mismatch)
    needed = [op for op in enumerate_ops(space) if op not in table]
    allocator = pin_allocator()
    table.info.update(method=method, budget=asdict(budget), group=group, complete=not needed, allocator=allocator)
    spaces = table.info.setdefault("spaces", [])
    if space.name not in spaces:
        spaces.append(space.name)
    if not needed:
        table.save(out)
        return table
    session = _Session(table, out, save_every_s)
    try:
        _measure_needed(space, session, needed, dev, settings, method, budget, group, progress, seed)
    finally:
        session.close()
    return table


def _checked_method(device: torch.device, settings: Settings, method: str | None, group: int) -> str:
    """The profiling method for `settings` (given or the runtime's default), after checking the arguments."""
    check_settings(device, settings)
    method = method or default_method(settings)
    if method not in METHODS:
        raise LutError(f"method {method!r} is not one of {list(METHODS)}")
    if method == "insitu" and settings.runtime != "eager":
        raise LutError(f"method insitu times ops inside an eager network; runtime {settings.runtime} needs isolated")
    if group < 1:
        raise LutError(f"group {group} must be at least 1")
    return method


def _measure_needed(space: SearchSpace, session: _Session, needed: Sequence[OpSignature], device: torch.device,
                    settings: Settings, method: str, budget: Budget, group: int, progress: bool, seed: int) -> None:
    """Measure the `needed` ops into the session's table: the call op first, then probe archs `group` at a time."""
    table = session.table
    total = len(table) + len(needed)
    # Probes take similar times while the ops they add vary (early ones add more), so the bar counts probes.
    bar = tqdm(total=1, unit="probe", desc=f"profile {space.name}", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, smoothing=0.1)
    rng = np.random.default_rng(seed)
    try:
        with thread_count(settings.threads), _sigterm_as_interrupt():
            call = call_op(space.geometry)
            if call not in table:
                session.add({call: _measure_call(space, device, settings, budget, rng)})
            # A runtime's per-run cost (ONNX Runtime's run, a graph replay) is in every op's own session or graph;
            # a network pays it once (the call op). Eager's call op is the forward's own overhead, not in any op.
            call_overhead_us = table.entries[call].median_us if settings.runtime != "eager" else 0.0
            todo = {op for op in needed if op.kind != "call"}
            probes = probe_archs(space, todo)
            bar.reset(total=len(probes))
            for start in range(0, len(probes), group):
                bar.set_postfix_str(f"ops {len(table)}/{total}", refresh=False)
                chunk = probes[start:start + group]
                found = measure_probes(space, chunk, todo, device, settings, method, budget, rng, seed + start,
                                       call_overhead_us)
                session.add(found)
                todo -= set(found)
                bar.update(len(chunk))
            bar.set_postfix_str(f"ops {len(table)}/{total}")
            if todo:
                raise LutError(f"profiling left {len(todo)} op(s) unmeasured, e.g. {min(todo)}")
            table.info["complete"] = True
    finally:
        bar.close()


def measure_probes(space: SearchSpace, probes: Sequence[Arch], todo: set[OpSignature], device: torch.device,
                   settings: Settings, method: str, budget: Budget, rng: np.random.Generator, seed: int,
                   call_overhead_us: float = 0.0) -> dict[OpSignature, Entry]:
    """Time the ops of `todo` found in `probes` (one group, interleaved rounds); returns their entries.

    Isolated entries have `call_overhead_us` (the runtime's per-run cost, measured as the call op) taken off.

    An op found several times in the group (insitu) pools its occurrences: the entry's median is the median of
    the occurrences' estimates, its percentiles and count cover all their samples.
    """
    nets, x = _build(space, probes, device, settings, seed)
    if method == "insitu":
        runners: list[Runner] = [ChainRunner(network_ops(net), x) for net in nets]
        blocks = measure_interleaved(runners, budget, rng)
        found: dict[OpSignature, list[list[np.ndarray]]] = defaultdict(list)
        for probe, probe_blocks in zip(probes, blocks, strict=True):
            for j, op in enumerate(arch_ops(probe, space.geometry)[:-1]):
                if op in todo:
                    found[op].append([b[:, j] for b in probe_blocks])
        return {op: _pool(occurrences) for op, occurrences in found.items()}

    chosen: dict[OpSignature, Runner] = {}
    for probe, net in zip(probes, nets, strict=True):
        ops = arch_ops(probe, space.geometry)[:-1]
        modules = network_ops(net)
        inputs = None
        for op, module in zip(ops, modules, strict=True):
            if op in todo and op not in chosen:
                inputs = inputs or op_inputs(net, x)
                xi = inputs[ops.index(op)].clone()  # a normal tensor (inference tensors cannot be traced)
                if is_ort(settings.runtime):
                    chosen[op] = OrtRunner(export_onnx(module, xi), xi.numpy(), settings.threads, settings.runtime,
                                           device.index or 0)
                elif settings.runtime == "cudagraph":
                    chosen[op] = CudaGraphRunner(module, xi)
                else:
                    chosen[op] = EagerRunner(module, xi)
    blocks = measure_interleaved(list(chosen.values()), budget, rng)
    out = {}
    for op, op_blocks in zip(chosen, blocks, strict=True):
        s = summarize(op_blocks)
        c = call_overhead_us
        out[op] = Entry(median_us=max(s.median_us - c, 0.0), p10_us=max(s.p10_us - c, 0.0),
                        p90_us=max(s.p90_us - c, 0.0), n=s.n)
    return out


def _pool(occurrences: list[list[np.ndarray]]) -> Entry:
    stats = [summarize(blocks) for blocks in occurrences]
    samples = np.concatenate([np.concatenate(blocks) for blocks in occurrences])
    return Entry(
        median_us=float(np.median([s.median_us for s in stats])),
        p10_us=float(np.percentile(samples, 10)) * 1e6,
        p90_us=float(np.percentile(samples, 90)) * 1e6,
        n=int(samples.size),
    )


def _build(space: SearchSpace, probes: Sequence[Arch], device: torch.device, settings: Settings,
           seed: int) -> tuple[list[ShuffleNetV2], torch.Tensor]:
    """The probes as plain networks on the device (eval mode, dtype, memory format), and an input batch."""
    g = space.geometry
    fmt = settings.torch_memory_format
    nets = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for probe in probes:
            net = ShuffleNetV2(probe, g, num_classes=settings.num_classes).eval()
            if not is_ort(settings.runtime):  # ONNX Runtime's ops are exported from the CPU module
                net = net.to(device=device, dtype=settings.torch_dtype, memory_format=fmt)
            nets.append(net)
        x = torch.randn(settings.batch_size, g.in_channels, g.input_size, g.input_size)
    if not is_ort(settings.runtime):
        x = x.to(device=device, dtype=settings.torch_dtype).contiguous(memory_format=fmt)
    return nets, x


def _measure_call(space: SearchSpace, device: torch.device, settings: Settings, budget: Budget,
                  rng: np.random.Generator) -> Entry:
    """The per-call overhead: ShuffleNetV2.forward without its ops (eager), an identity session (ONNX Runtime's
    runtimes) or a graph of one tiny copy (cudagraph: a graph must launch something)."""
    g = space.geometry
    x = torch.randn(settings.batch_size, g.in_channels, g.input_size, g.input_size)
    if is_ort(settings.runtime):
        runner: Runner = OrtRunner(export_onnx(_Passthrough(), x), x.numpy(), settings.threads, settings.runtime,
                                   device.index or 0)
    elif settings.runtime == "cudagraph":
        x = x.to(device=device, dtype=settings.torch_dtype).contiguous(memory_format=settings.torch_memory_format)
        runner = CudaGraphRunner(_PassthroughCopy(), x)
    else:
        x = x.to(device=device, dtype=settings.torch_dtype).contiguous(memory_format=settings.torch_memory_format)
        runner = EagerRunner(CallOverhead(len(space.stages)).to(device), x)
    many = Budget(rounds=max(budget.rounds, 5), block_s=budget.block_s, min_calls=max(budget.min_calls, 20),
                  max_calls=max(budget.max_calls, 200), warmup=max(budget.warmup, 5))
    s = summarize(measure_interleaved([runner], many, rng)[0])
    return Entry(median_us=s.median_us, p10_us=s.p10_us, p90_us=s.p90_us, n=s.n)


class _Passthrough(torch.nn.Module):
    """The smallest ONNX graph with the network's input: what one ONNX Runtime run costs with nothing to compute."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1, :1, :1]


class _PassthroughCopy(torch.nn.Module):
    """The smallest CUDA graph with the network's input: one kernel that copies a single element."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1, :1, :1].clone()


def _open_table(out: Path, space: SearchSpace, fingerprint: Fingerprint, method: str,
                allow_mismatch: bool) -> LatencyTable:
    if not out.exists():
        return LatencyTable(fingerprint, space.geometry, info={"spaces": [], "profile_seconds": 0.0})
    table = LatencyTable.load(out)
    table.check(fingerprint, allow_mismatch=allow_mismatch, name=str(out))
    if table.geometry != space.geometry:
        raise LutError(f"{out}: profiled for geometry {table.geometry.to_dict()}, space {space.name!r} has "
                       f"{space.geometry.to_dict()}; choose another --out")
    previous = table.info.get("method")
    if previous is not None and previous != method:
        raise LutError(f"{out}: profiled with method {previous}, not {method}; choose another --out")
    return table


class _Session:
    """Adds entries to the table and saves it atomically at most every `every_s` seconds, and once at the end."""

    def __init__(self, table: LatencyTable, out: Path, every_s: float) -> None:
        self.table, self.out, self.every_s = table, out, every_s
        self.started = self.saved = time.monotonic()
        self.dirty = False

    def add(self, entries: dict[OpSignature, Entry]) -> None:
        for op, entry in entries.items():
            self.table.add(op, entry)
        self.dirty = self.dirty or bool(entries)
        if time.monotonic() - self.saved >= self.every_s:
            self.save()

    def save(self) -> None:
        now = time.monotonic()
        self.table.info["profile_seconds"] = round(float(self.table.info.get("profile_seconds", 0.0))
                                                   + now - self.started, 3)
        self.started = self.saved = now
        self.table.save(self.out)
        self.dirty = False

    def close(self) -> None:
        self.save()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While profiling in the main thread, SIGTERM raises KeyboardInterrupt so that the table is saved."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous: Callable | int | None = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
