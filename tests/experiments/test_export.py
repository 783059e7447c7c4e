from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from experiments.export import export_all, load_model, main, model_from_weights, read_arch
from search_space import SearchSpace, Supernet

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_space() -> SearchSpace:
    return SearchSpace.from_yaml(ROOT / "experiments/spaces/tiny.yaml")


@pytest.fixture(scope="module")
def exported(tiny_space, tmp_path_factory):
    torch.manual_seed(0)
    arch = tiny_space.sample(np.random.default_rng(0))
    model = tiny_space.build(arch, num_classes=10).eval()
    out = tmp_path_factory.mktemp("export")
    card = export_all(model, out, card={"val_accuracy": 0.5}, extra={"mean": [0.5], "std": [0.25]})
    return model, out, card


def test_every_artifact_is_written_and_agrees(exported):
    model, out, card = exported
    assert sorted(p.name for p in out.iterdir()) == ["arch.yaml", "model.onnx", "model.pt", "model.pt2",
                                                      "model_card.json"]
    x = torch.randn(5, 1, 28, 28)
    with torch.inference_mode():
        want = model(x)
        assert torch.equal(load_model(out / "model.pt")(x), want)
        program = torch.export.load(out / "model.pt2").module()
        torch.testing.assert_close(program(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(program(x[:1]), want[:1], rtol=1e-5, atol=1e-5)  # dynamic batch
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"images": x.numpy()})
    assert np.abs(got - want.numpy()).max() <= 1e-4
    saved = json.loads((out / "model_card.json").read_text())
    assert saved == json.loads(json.dumps(card))
    assert saved["arch"] == model.arch.encode() and saved["val_accuracy"] == 0.5
    assert saved["params"] == sum(p.numel() for p in model.parameters())
    assert saved["onnx_max_abs_diff"] <= 1e-4
    assert read_arch(str(out / "arch.yaml")) == model.arch
    payload = torch.load(out / "model.pt", weights_only=True)
    assert payload["mean"] == [0.5]


def test_weights_from_a_supernet_checkpoint(tiny_space, tmp_path):
    torch.manual_seed(1)
    supernet = Supernet(tiny_space, 10).eval()
    torch.save({"model": supernet.state_dict()}, tmp_path / "supernet.pt")
    arch = tiny_space.largest()
    model = model_from_weights(tiny_space, arch, tmp_path / "supernet.pt", 10)
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), supernet(x, arch), rtol=1e-5, atol=1e-5)


def test_cli_exports_and_rejects_bad_input(exported, tiny_space, tmp_path, capsys):
    model, out, _ = exported
    space = str(ROOT / "experiments/spaces/tiny.yaml")
    code = model.arch.encode()
    weights = str(out / "model.pt")

    def cli(arch, weights, dest):
        return main(["--arch", arch, "--space", space, "--weights", weights, "--out", str(dest)])

    assert cli(code, weights, tmp_path / "a") == 0
    assert (tmp_path / "a" / "model.onnx").exists()
    other = tiny_space.smallest().encode() if code != tiny_space.smallest().encode() else tiny_space.largest().encode()
    assert cli(other, weights, tmp_path / "b") == 2
    assert "holds arch" in capsys.readouterr().err
    assert cli(code, str(tmp_path / "nope.pt"), tmp_path) == 2
    assert cli("s8_bogus", weights, tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
