"""How fast an arch runs on one device: profile its ops, predict whole archs, calibrate and validate.

    python -m latency_lut profile --space SPACE.yaml --device cpu        # measure every op (resumable)
    python -m latency_lut validate --lut FILE --space SPACE.yaml         # fit the correction, report the error
    python -m latency_lut measure model.onnx --device cpu                 # time a shipped file as deployed

    table = LatencyTable.load(path, expect=Settings(threads=1))          # refuses a table measured elsewhere
    table.predict(arch)                                                  # milliseconds
    table.predict_many(archs)                                            # numpy array, > 100k archs/s
    table.min_latency(space), table.max_latency(space)                   # exact over the whole space

This package knows search_space and nothing above it (it never imports optuna or ray).
"""

from latency_lut.errors import CorruptTable, FingerprintMismatch, LutError, MissingEntry
from latency_lut.fingerprint import (
    SHIPPED_FILES,
    STATISTICS,
    Fingerprint,
    Settings,
    default_runtime,
    resolve_device,
)
from latency_lut.measured import MeasuredArchs
from latency_lut.ops import OpSignature, arch_ops, enumerate_ops, probe_archs
from latency_lut.profiler import default_out, profile
from latency_lut.table import Contribution, Correction, Entry, LatencyTable
from latency_lut.timing import (
    FILE_BUDGET,
    Budget,
    Measurement,
    measure_file,
    measure_file_fresh,
    measure_model,
    measure_model_fresh,
    runtime_of_file,
)
from latency_lut.validation import validate

__all__ = [
    "FILE_BUDGET",
    "SHIPPED_FILES",
    "STATISTICS",
    "Budget",
    "Contribution",
    "CorruptTable",
    "Correction",
    "Entry",
    "Fingerprint",
    "FingerprintMismatch",
    "LatencyTable",
    "LutError",
    "MeasuredArchs",
    "Measurement",
    "MissingEntry",
    "OpSignature",
    "Settings",
    "arch_ops",
    "default_runtime",
    "default_out",
    "enumerate_ops",
    "measure_file",
    "measure_file_fresh",
    "measure_model",
    "measure_model_fresh",
    "probe_archs",
    "profile",
    "resolve_device",
    "runtime_of_file",
    "validate",
]
