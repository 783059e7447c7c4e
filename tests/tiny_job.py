"""The tiny synthetic job that the whole-run tests give search.py: an experiment file cut to seconds and a latency
table of the tiny space, both written by the test session."""

from __future__ import annotations

from pathlib import Path

import yaml

from latency_lut import Settings, profile, validate
from latency_lut.timing import Budget
from search_space import SearchSpace

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ROOT / "experiments" / "synthetic.yaml"
TINY = ROOT / "experiments" / "spaces" / "tiny.yaml"


def tiny_job_config(folder: Path, *, trials: int = 3, bn_calibration_images: int = 32,
                    calibrate_archs: int | None = None, images: int = 256) -> Path:
    """synthetic.yaml on the tiny space with `images` training images (a quarter as many to validate on), one
    epoch of supernet and of retraining, one winner."""
    raw = yaml.safe_load(SYNTHETIC.read_text())
    raw["space"] = str(TINY)
    raw["data"]["synthetic_size"] = images
    raw["supernet"].update(epochs=1)
    raw["retrain"].update(epochs=1)
    raw["evaluate"].update(bn_calibration_images=bn_calibration_images)
    raw["search"].update(trials=trials, top_k=1)
    if calibrate_archs is not None:
        raw["latency"].update(calibrate_archs=calibrate_archs)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def tiny_table(folder: Path, runtime: str = "onnxruntime", *, archs: int = 6, budget: Budget | None = None) -> Path:
    """A table of the tiny space for this CPU in `runtime`, its correction fitted on `archs` measured archs."""
    path = folder / f"tiny-{runtime}.json"
    space = SearchSpace.from_yaml(TINY)
    profile(space, path, "cpu", Settings(runtime=runtime, num_classes=10), budget=budget, progress=False)
    validate(path, space, n=archs, calibrate_frac=0.5, progress=False, **({"budget": budget} if budget else {}))
    return path
