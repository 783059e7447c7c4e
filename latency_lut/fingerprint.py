"""Where and how a table was measured: measurement settings, device resolution and the device fingerprint.

A table is only valid on the device and with the settings it was measured with; `Fingerprint` records both, and
loading a table checks it against the fingerprint of the machine in use (see `LatencyTable.load`).

Dtype policy: on CUDA every dtype runs the model converted with ``.to(dtype)`` (the same thing an exported half
model runs; autocast would add casts between ops that an exported model does not have). On the CPU the eager
runtime takes float32 and bfloat16 (oneDNN has bfloat16 kernels); float16 is refused there, because most CPUs run
it through slow reference kernels and a table of those times describes no deployment. ONNX Runtime is measured in
float32 only, on the execution provider its runtime names.

Runtimes (`RUNTIMES`), each with the file a model ships as (`SHIPPED_FILES`):

- ``eager`` (cpu, cuda): PyTorch op by op, `model.pt2` as its torch.export module.
- ``onnxruntime`` (cpu): `model.onnx` on ONNX Runtime's CPUExecutionProvider.
- ``cudagraph`` (cuda): `model.pt2`'s module captured once as a CUDA graph on static buffers; a call is one replay.
  At batch 1 a small network on a GPU is bound by kernel launches (eager launches each op from Python), and a
  graph replays them all with one launch.
- ``ort-cuda`` (cuda): `model.onnx` on ONNX Runtime's CUDAExecutionProvider (the ``onnxruntime-gpu`` package,
  the project's ``[gpu]`` extra), with its input and output bound to device memory.
- ``ort-tensorrt`` (cuda): `model.onnx` on ONNX Runtime's TensorrtExecutionProvider (onnxruntime-gpu with the
  TensorRT libraries), CUDA for what TensorRT does not take.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch

from latency_lut.errors import LutError
from search_space.layout import Geometry

RUNTIMES = ("eager", "onnxruntime", "cudagraph", "ort-cuda", "ort-tensorrt")
STATISTICS = ("p50", "p90", "p99")
# The file a model ships as for each runtime, which is what a latency promise is checked on.
SHIPPED_FILES = {"eager": "model.pt2", "onnxruntime": "model.onnx", "cudagraph": "model.pt2",
                 "ort-cuda": "model.onnx", "ort-tensorrt": "model.onnx"}
# ONNX Runtime's execution provider for each runtime that runs model.onnx.
ORT_PROVIDERS = {"onnxruntime": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
                 "ort-tensorrt": "TensorrtExecutionProvider"}
CUDA_RUNTIMES = ("cudagraph", "ort-cuda", "ort-tensorrt")  # need a CUDA device


def default_runtime(device: str | torch.device) -> str:
    """The runtime a device's models are deployed with unless one is named: ONNX Runtime on a CPU, eager on CUDA.

    At batch 1 on a CPU, eager PyTorch spends most of a small network's time dispatching operators; ONNX Runtime
    runs the same network about 10x faster, and that is the runtime `model.onnx` ships for. On CUDA, eager needs
    nothing beyond torch and runs `model.pt2` as users load it; the launch-free runtimes are chosen by name
    (cudagraph needs static input shapes in the serving code, ort-cuda and ort-tensorrt need onnxruntime-gpu).
    """
    return "onnxruntime" if str(device).strip().lower() == "cpu" else "eager"


def is_ort(runtime: str) -> bool:
    """Whether `runtime` runs model.onnx in ONNX Runtime (on the CPU or a GPU execution provider)."""
    return runtime in ORT_PROVIDERS


def ort_version() -> str:
    """The installed onnxruntime's version.

    Raises:
        LutError: onnxruntime is not installed.
    """
    try:
        import onnxruntime
    except ImportError:
        raise LutError("runtime onnxruntime is not installed (pip install onnxruntime, or the project's [export] "
                       "extra; onnxruntime-gpu, the [gpu] extra, for ort-cuda and ort-tensorrt)") from None
    return str(onnxruntime.__version__)


def check_runtime_installed(runtime: str) -> None:
    """Refuse a runtime whose software is missing here, in one line that says what to install.

    Raises:
        LutError: onnxruntime missing, or an onnxruntime without the execution provider the runtime names (the
            CPU-only package has no CUDAExecutionProvider).
    """
    if not is_ort(runtime):
        return
    version = ort_version()
    import onnxruntime

    provider, available = ORT_PROVIDERS[runtime], onnxruntime.get_available_providers()
    if provider not in available:
        raise LutError(f"runtime {runtime} needs ONNX Runtime's {provider}, and onnxruntime {version} here has only "
                       f"{', '.join(available)}: install onnxruntime-gpu in place of onnxruntime (pip uninstall "
                       f"onnxruntime; pip install 'shufflenas[gpu]')")
DTYPES = ("float32", "float16", "bfloat16")
MEMORY_FORMATS = ("contiguous", "channels_last")


@dataclass(frozen=True)
class Settings:
    """How ops and networks are run when measured.

    Attributes:
        runtime: one of `RUNTIMES` (see the module docstring): "eager" (PyTorch, inference mode), "onnxruntime"
            (CPUExecutionProvider, sequential execution), "cudagraph", "ort-cuda" or "ort-tensorrt" (CUDA only).
        batch_size: images per call.
        threads: intra-op threads (torch.set_num_threads, or ONNX Runtime's intra_op_num_threads).
        dtype: "float32", "float16" or "bfloat16" (see the module docstring for what each device accepts).
        memory_format: "contiguous" (NCHW) or "channels_last" (eager and cudagraph only).
        num_classes: classifier outputs (part of the head op).
        statistic: what a network's latency means: "p50", "p90" or "p99" over every call of a measurement. The
            table's correction is fitted to it, and a budget promises it.
    """

    runtime: str = "eager"
    batch_size: int = 1
    threads: int = 1
    dtype: str = "float32"
    memory_format: str = "contiguous"
    num_classes: int = 1000
    statistic: str = "p50"

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise LutError(f"statistic {self.statistic!r} is not one of {list(STATISTICS)}")
        if self.runtime not in RUNTIMES:
            raise LutError(f"runtime {self.runtime!r} is not one of {list(RUNTIMES)}")
        if self.dtype not in DTYPES:
            raise LutError(f"dtype {self.dtype!r} is not one of {list(DTYPES)}")
        if self.memory_format not in MEMORY_FORMATS:
            raise LutError(f"memory format {self.memory_format!r} is not one of {list(MEMORY_FORMATS)}")
        for name in ("batch_size", "threads", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LutError(f"{name} must be a positive integer, got {value!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def torch_memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.memory_format == "channels_last" else torch.contiguous_format


def resolve_device(text: str | torch.device) -> torch.device:
    """`cpu`, `cuda` or `cuda:N` as a torch.device, refusing a CUDA device that is not there.

    Raises:
        LutError: an unknown device, or CUDA requested where it is absent.
    """
    name = str(text).strip().lower()
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise LutError(f"device {str(text)!r}: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise LutError(f"device {name}: CUDA is not available ({why}, torch {torch.__version__})")
    index = int(name[5:]) if ":" in name else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise LutError(f"device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


def check_settings(device: torch.device, settings: Settings) -> None:
    """Refuse combinations this package does not measure (see the module docstring).

    Raises:
        LutError: naming the device, runtime and dtype.
    """
    runtime = settings.runtime
    if device.type == "cpu" and settings.dtype == "float16":
        raise LutError("dtype float16 on cpu is refused: most CPUs run it through slow reference kernels, so the "
                       "table would describe no deployment; use float32 or bfloat16 on cpu, or a cuda device")
    if runtime == "onnxruntime" and device.type != "cpu":
        raise LutError(f"runtime onnxruntime is measured on the CPU execution provider only, not on {device} (on "
                       f"CUDA: runtime ort-cuda, ort-tensorrt, cudagraph or eager)")
    if runtime in CUDA_RUNTIMES and device.type != "cuda":
        raise LutError(f"runtime {runtime} runs on a CUDA device only, not on {device} (on the cpu: runtime "
                       f"onnxruntime or eager)")
    if is_ort(runtime):
        if settings.dtype != "float32":
            raise LutError(f"runtime {runtime}: dtype {settings.dtype} is not supported, use float32")
        if settings.memory_format != "contiguous":
            raise LutError(f"runtime {runtime}: memory format channels_last applies to the eager and cudagraph "
                           f"runtimes only")
    check_runtime_installed(runtime)


def cpu_name() -> str:
    """The CPU model string (/proc/cpuinfo's model name, else what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


@dataclass(frozen=True)
class Fingerprint:
    """Everything a table's numbers depend on: the device, the software and the settings.

    Two fingerprints must be equal for a table to be used; `differences` lists the fields that are not.
    """

    device_kind: str  # "cpu" or "cuda"
    device_name: str  # CPU model string, or GPU name
    compute_capability: str  # "9.0" on CUDA, "" on the CPU
    torch_version: str
    cuda_version: str  # "" without CUDA
    cudnn_version: str  # "" without CUDA
    runtime: str
    runtime_version: str  # onnxruntime's version, "" for eager (torch_version says it)
    threads: int
    batch_size: int
    dtype: str
    memory_format: str
    input_size: int
    in_channels: int
    stem_kind: str
    num_classes: int
    statistic: str

    # What identifies the machine and the measurement, without the model's input (`machine`).
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("input_size", "in_channels", "stem_kind", "num_classes")

    @classmethod
    def current(cls, device: str | torch.device, settings: Settings, geometry: Geometry) -> Fingerprint:
        """The fingerprint of this machine measuring with `settings` on `device` for inputs of `geometry`."""
        dev = resolve_device(device)
        check_settings(dev, settings)
        if dev.type == "cuda":
            major, minor = torch.cuda.get_device_capability(dev)
            name, capability = torch.cuda.get_device_name(dev), f"{major}.{minor}"
            cuda, cudnn = torch.version.cuda or "", str(torch.backends.cudnn.version() or "")
        else:
            name, capability, cuda, cudnn = cpu_name(), "", "", ""
        runtime_version = ort_version() if is_ort(settings.runtime) else ""
        return cls(
            device_kind=dev.type,
            device_name=name,
            compute_capability=capability,
            torch_version=torch.__version__,
            cuda_version=cuda,
            cudnn_version=cudnn,
            runtime=settings.runtime,
            runtime_version=runtime_version,
            threads=settings.threads,
            batch_size=settings.batch_size,
            dtype=settings.dtype,
            memory_format=settings.memory_format,
            input_size=geometry.input_size,
            in_channels=geometry.in_channels,
            stem_kind=geometry.stem_kind,
            num_classes=settings.num_classes,
            statistic=settings.statistic,
        )

    @classmethod
    def machine(cls, device: str | torch.device, settings: Settings) -> dict[str, Any]:
        """What a measurement of any model depends on: device, software and settings (no input geometry).

        Model cards and cached verdicts keep it; a verdict measured on another machine is measured again.
        """
        full = cls.current(device, settings, Geometry()).to_dict()
        return {k: v for k, v in full.items() if k not in cls.MODEL_FIELDS}

    @property
    def settings(self) -> Settings:
        return Settings(runtime=self.runtime, batch_size=self.batch_size, threads=self.threads, dtype=self.dtype,
                        memory_format=self.memory_format, num_classes=self.num_classes, statistic=self.statistic)

    def differences(self, other: Fingerprint) -> list[str]:
        """One `field: table X, now Y` string per field where `self` (the table) and `other` (now) differ."""
        return [
            f"{f.name}: table {getattr(self, f.name)!r}, now {getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Fingerprint:
        """Inverse of `to_dict`; ValueError on unknown, missing or mistyped fields."""
        if not isinstance(data, dict):
            raise ValueError(f"fingerprint: expected a mapping, got {type(data).__name__}")
        names = {f.name: f.type for f in fields(cls)}
        # Tables made before the statistic was a setting fitted their correction to the fastest round's median.
        data = {"statistic": "best-round", **data}
        unknown, missing = set(data) - set(names), set(names) - set(data)
        if unknown or missing:
            raise ValueError(f"fingerprint: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}")
        for name, kind in names.items():
            expected = int if kind == "int" else str
            if isinstance(data[name], bool) or not isinstance(data[name], expected):
                raise ValueError(f"fingerprint.{name}: expected {expected.__name__}, got {data[name]!r}")
        return cls(**data)
