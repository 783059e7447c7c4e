"""The files a run directory holds, and how they are written and read.

A supernet run writes RUN_DIR/supernet.pt (resumable state, rewritten after every epoch) and supernet.json; replica
k of a recipe trains in `replica_dir(RUN_DIR, k)`. A retraining writes RUN_DIR/retrain.pt (resumable state),
model.pt (the network alone) and retrain.json. Every checkpoint is a plain dict with a `kind` and a `format`, written
atomically and read with `torch.load(..., weights_only=True)`; a file of another kind, another format or no
checkpoint at all is refused with a `RunDirError` naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from search_space import Arch, Geometry, SearchSpace, Supernet
from search_space.files import atomic_write
from search_space.network import ShuffleNetV2

SUPERNET_CHECKPOINT = "supernet.pt"  # resumable supernet state, rewritten after every epoch
RETRAIN_CHECKPOINT = "retrain.pt"  # resumable retraining state, rewritten after every epoch
MODEL_FILE = "model.pt"  # the retrained network alone: weights, arch code, geometry, classes, accuracies
CHECKPOINT_FORMAT = 1


class RunDirError(ValueError):
    """A run directory that cannot be continued: made by another configuration, or holding an unreadable file."""


def replica_dir(run_dir: str | Path, replica: int) -> Path:
    """Where replica `replica` of a supernet recipe trains: RUN_DIR itself for the first, RUN_DIR/replicaK after."""
    return Path(run_dir) if replica == 0 else Path(run_dir) / f"replica{replica}"


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    """Write `obj` with `torch.save`, atomically: a crash leaves the previous file or the new one, never half."""
    atomic_write(Path(path), lambda f: torch.save(obj, f), mode="wb")


def load_checkpoint(path: str | Path, kind: str) -> dict[str, Any]:
    """Read a checkpoint of `kind` ("supernet", "retrain" or "model") on the CPU.

    Raises:
        FileNotFoundError: there is no file at `path`.
        RunDirError: the file is unreadable, or a checkpoint of another kind or format.
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such checkpoint") from None
    except Exception as e:  # a truncated or foreign file: say which, not a pickle traceback
        raise RunDirError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise RunDirError(f"{path}: expected a {kind} checkpoint (format {CHECKPOINT_FORMAT}), found {found!r}")
    return ckpt


def load_weights(model: nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """`model.load_state_dict(state)`, with a `RunDirError` naming `path` when the shapes do not fit."""
    try:
        model.load_state_dict(state)
    except RuntimeError:  # shapes that do not fit: e.g. a supernet saved before its layout changed
        raise RunDirError(f"{path}: its weights do not fit this {type(model).__name__} (written by another version "
                          f"of shufflenas?); delete it to start over") from None


def write_json(path: str | Path, data: Any) -> None:
    """A run's summary (supernet.json, retrain.json), written atomically."""
    atomic_write(Path(path), lambda f: f.write(json.dumps(data, indent=1) + "\n"))


def save_model(model: ShuffleNetV2, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """A plain network alone: state_dict, arch code, geometry, class count and plain `extra` data (normalisation
    mean and std, accuracies). `load_model` reads it back without a supernet or a space file."""
    save_checkpoint(
        {
            "format": CHECKPOINT_FORMAT,
            "kind": "model",
            "arch": model.arch.encode(),
            "geometry": model.geometry.to_dict(),
            "num_classes": model.num_classes,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            **(extra or {}),
        },
        path,
    )


def load_model(path: str | Path, device: str | torch.device = "cpu") -> ShuffleNetV2:
    """Rebuild a plain network from a file written by `save_model` (RUN_DIR/model.pt, or an export's), eval mode."""
    ckpt = load_checkpoint(path, "model")
    model = ShuffleNetV2(Arch.decode(ckpt["arch"]), Geometry(**ckpt["geometry"]), num_classes=ckpt["num_classes"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()


def load_supernet(path: str | Path, device: str | torch.device = "cpu") -> Supernet:
    """Rebuild a trained supernet (eval mode) from RUN_DIR/supernet.pt; the checkpoint holds its space."""
    ckpt = load_checkpoint(path, "supernet")
    space = SearchSpace.from_dict(ckpt["identity"]["space"])
    supernet = Supernet(space, ckpt["identity"]["num_classes"])
    # With supernet.ema_decay the averaged weights are the ones candidates are scored with.
    weights = ckpt["model"] if "ema" not in ckpt else {**ckpt["model"], **ckpt["ema"]["params"]}
    load_weights(supernet, weights, path)
    return supernet.to(device).eval()
