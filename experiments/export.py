"""Export a plain ShuffleNet V2: arch.yaml, model.pt, model.pt2 (torch.export), model.onnx (checked), model card.

    python -m experiments.export --arch CODE_OR_ARCH_YAML --space SPACE.yaml --weights WEIGHTS --out DIR

WEIGHTS is a model.pt written here, a retraining checkpoint, or a supernet checkpoint (the arch's weights are
extracted from it). Export only ever sees the plain network, never the supernet.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from experiments.checkpoints import load_model, save_model  # noqa: F401 (load_model: part of this API)
from search_space import Arch, SearchSpace, ShuffleNetV2, Supernet
from search_space.files import atomic_write

ONNX_TOLERANCE = 1e-4  # max abs logit difference between ONNX Runtime and eager PyTorch
MAX_BATCH = 1024  # upper bound of the exported dynamic batch dimension


def export_program(model: ShuffleNetV2, path: str | Path) -> None:
    """torch.export with a dynamic batch dimension (the example batch must be at least 2 for that)."""
    g = model.geometry
    x = torch.randn(2, g.in_channels, g.input_size, g.input_size)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.export.export(model.eval(), (x,), dynamic_shapes={"x": {0: batch}})
    atomic_write(path, lambda f: torch.export.save(program, f), mode="wb")


def export_onnx(model: ShuffleNetV2, path: str | Path, seed: int = 0) -> float:
    """ONNX through the dynamo exporter, then checked with ONNX Runtime; returns the max abs difference.

    Raises:
        RuntimeError: ONNX Runtime disagrees with eager PyTorch by more than ONNX_TOLERANCE.
    """
    import onnxruntime as ort

    g = model.geometry
    model = model.eval()
    x = torch.randn(2, g.in_channels, g.input_size, g.input_size)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    # The exporter warns about every torchvision op it cannot register; none of them is used here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (x,), dynamo=True, input_names=["images"], output_names=["logits"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}}, verbose=False,
        )
    program.save(str(tmp), external_data=False)  # one self-contained file: small models fit the 2 GB limit
    check = torch.from_numpy(np.random.default_rng(seed).standard_normal(
        (3, g.in_channels, g.input_size, g.input_size)).astype(np.float32))  # another batch size than exported
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"images": check.numpy()})
    with torch.inference_mode():
        want = model(check).numpy()
    diff = float(np.abs(got - want).max())
    if diff > ONNX_TOLERANCE:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{path}: ONNX Runtime differs from PyTorch by {diff:.2e} (> {ONNX_TOLERANCE})")
    tmp.replace(path)
    return diff


def export_all(model: ShuffleNetV2, out_dir: str | Path, card: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write every artifact of one model into `out_dir`; returns the model card (also written as model_card.json).

    Args:
        model: the plain network (its weights are what gets exported).
        out_dir: destination folder.
        card: facts for the model card (accuracies, latencies, fingerprint, seed, recipe, ...).
        extra: plain data stored inside model.pt beside the weights (e.g. normalisation mean/std).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    arch = model.arch
    atomic_write(out / "arch.yaml", lambda f: yaml.safe_dump(
        {"code": arch.encode(), "geometry": model.geometry.to_dict(), "num_classes": model.num_classes,
         **arch.to_dict()}, f, sort_keys=False))
    save_model(model, out / "model.pt", extra)
    export_program(model, out / "model.pt2")
    diff = export_onnx(model, out / "model.onnx")
    params = sum(p.numel() for p in model.parameters())
    from search_space.cost import arch_cost

    cost = arch_cost(arch, model.geometry, model.num_classes)
    full_card = {
        "arch": arch.encode(),
        "params": params,
        "mflops": cost.mflops,
        "geometry": model.geometry.to_dict(),
        "num_classes": model.num_classes,
        "onnx_max_abs_diff": diff,
        "files": ["arch.yaml", "model.pt", "model.pt2", "model.onnx"],
        **(card or {}),
    }
    atomic_write(out / "model_card.json", lambda f: json.dump(full_card, f, indent=2, default=str))
    return full_card


def read_arch(text: str) -> Arch:
    """An arch from a code or from an arch.yaml file written by `export_all`."""
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"{path}: cannot read arch file ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping with 'code' or stem/stages/head")
        if "code" in data:
            return Arch.decode(str(data["code"]))
        return Arch.from_dict(data)
    return Arch.decode(text)


def model_from_weights(space: SearchSpace, arch: Arch, weights: str | Path, num_classes: int) -> ShuffleNetV2:
    """The plain network of `arch` with weights from a model.pt, a plain state_dict checkpoint or a supernet."""
    payload = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict):
        raise ValueError(f"{weights}: not a checkpoint (expected a dict)")
    state = payload.get("state_dict", payload.get("model", payload))
    if "arch" in payload and Arch.decode(payload["arch"]) != arch:
        raise ValueError(f"{weights}: holds arch {payload['arch']}, not {arch.encode()}")
    num_classes = int(payload.get("num_classes", num_classes))
    space.validate(arch)
    plain = ShuffleNetV2(arch, space.geometry, num_classes)
    if set(state) == set(plain.state_dict()) and all(state[k].shape == v.shape for k, v in plain.state_dict().items()):
        plain.load_state_dict(state)
        return plain.eval()
    supernet = Supernet(space, num_classes)
    try:
        supernet.load_state_dict(state)
    except RuntimeError:
        raise ValueError(f"{weights}: its weights fit neither arch {arch.encode()} nor the supernet of space "
                         f"{space.name!r}") from None
    return supernet.eval().extract(arch).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True, help="an arch code, or an arch.yaml written by an export")
    parser.add_argument("--space", required=True, help="the space YAML the arch belongs to (geometry, validation)")
    parser.add_argument("--weights", required=True, help="model.pt, a retraining checkpoint or a supernet checkpoint")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-classes", type=int, default=10, help="classifier size when the weights do not say")
    args = parser.parse_args(argv)
    try:
        space = SearchSpace.from_yaml(args.space)
        arch = read_arch(args.arch)
        if not Path(args.weights).is_file():
            raise FileNotFoundError(f"weights file {args.weights} does not exist")
        model = model_from_weights(space, arch, args.weights, args.num_classes)
        card = export_all(model, args.out, card={"source_weights": str(args.weights)})
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {card['arch']} to {args.out} (ONNX max abs diff {card['onnx_max_abs_diff']:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
