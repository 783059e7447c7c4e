from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from search_space import REFERENCES, arch_cost

# torchvision's documented parameter counts and GFLOPS for its four ShuffleNet V2 models (1000 classes, 224x224).
TORCHVISION = {
    "shufflenet_v2_x0_5": (1_366_792, 0.04),
    "shufflenet_v2_x1_0": (2_278_604, 0.145),
    "shufflenet_v2_x1_5": (3_503_624, 0.296),
    "shufflenet_v2_x2_0": (7_393_996, 0.583),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_reference_params_and_flops_equal_torchvision(imagenet_space, name):
    arch = imagenet_space.reference(name)
    model = imagenet_space.build(arch, num_classes=1000)
    params, gflops = TORCHVISION[name]
    assert sum(p.numel() for p in model.parameters()) == params
    cost = imagenet_space.cost(arch)
    assert cost.params == params
    assert round(cost.macs / 1e9, 3 if gflops >= 0.1 else 2) == gflops


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_reference_state_dict_layout_matches_torchvision(imagenet_space, name):
    """Names and shapes that torchvision's checkpoints use, spelled out for the first units."""
    model = imagenet_space.build(imagenet_space.reference(name))
    sd = model.state_dict()
    _, channels = REFERENCES[name]
    stem, c2 = channels[0], channels[1]
    assert sd["conv1.0.weight"].shape == (stem, 3, 3, 3)
    assert sd["stage2.0.branch1.0.weight"].shape == (stem, 1, 3, 3)
    assert sd["stage2.0.branch1.2.weight"].shape == (c2 // 2, stem, 1, 1)
    assert sd["stage2.0.branch2.0.weight"].shape == (c2 // 2, stem, 1, 1)
    assert sd["stage2.1.branch2.0.weight"].shape == (c2 // 2, c2 // 2, 1, 1)
    assert not any(k.startswith("stage2.1.branch1") for k in sd)
    assert sd["conv5.0.weight"].shape == (channels[-1], channels[-2], 1, 1)
    assert sd["fc.weight"].shape == (1000, channels[-1])


def test_cost_equals_built_params_for_sampled_archs(imagenet_space, fashion_space):
    rng = np.random.default_rng(3)
    for space, classes in ((imagenet_space, 1000), (fashion_space, 10)):
        for _ in range(15):
            arch = space.sample(rng)
            model = space.build(arch, num_classes=classes)
            assert space.cost(arch, classes).params == sum(p.numel() for p in model.parameters())


def test_cost_macs_equal_hooked_count(fashion_space):
    """Multiply-adds counted from the real conv/linear calls agree with the analytic count."""
    arch = fashion_space.sample(np.random.default_rng(11))
    model = fashion_space.build(arch, num_classes=10).eval()
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            k = module.weight[0].numel()  # cin/groups * kh * kw
            total += k * output.numel()
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * output.shape[0]

    for m in model.modules():
        m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    assert total == arch_cost(arch, fashion_space.geometry, 10).macs


def test_forward_shapes_both_stems(imagenet_space, fashion_space):
    rng = np.random.default_rng(0)
    out = imagenet_space.build(imagenet_space.sample(rng), num_classes=7).eval()(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 7)
    out = fashion_space.build(fashion_space.sample(rng), num_classes=10).eval()(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)


def test_half_split_unit_equals_torchvision_chunk(fashion_space):
    """With split 0.5 the identity side is exactly x.chunk(2)[0], as in torchvision's unit."""
    model = fashion_space.build(fashion_space.reference("shufflenet_v2_x0_5"), 10).eval()
    unit = model.stage2[1]
    x = torch.randn(2, 48, 14, 14)
    x1, x2 = x.chunk(2, dim=1)
    expected = torch.cat((x1, unit.branch2(x2)), dim=1)
    b, c, h, w = expected.shape
    expected = expected.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
    with torch.no_grad():
        torch.testing.assert_close(unit(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_state_dict_equals_torchvision_names_and_shapes(imagenet_space, name):
    """Every tensor name and shape of torchvision's model (recorded by benchmarks/torchvision_parity.py), so its
    checkpoints load with strict=True; that script also checks the logits are equal."""
    expected = json.loads((Path(__file__).parent / "data" / "torchvision_shapes.json").read_text())[name]
    ours = {k: list(v.shape) for k, v in imagenet_space.build(imagenet_space.reference(name)).state_dict().items()}
    assert ours == expected
    assert list(ours) == list(expected)  # same order too


@pytest.mark.parametrize("space_name", ["imagenet_space", "fashion_space"])  # the two stem kinds
def test_network_supernet_and_latency_ops_take_the_stem_from_the_geometry(space_name, request):
    from latency_lut.ops import arch_ops
    from search_space import Supernet
    from search_space.layout import stem_out_size

    space = request.getfixturevalue(space_name)
    g, arch = space.geometry, space.smallest()
    x = torch.randn(1, g.in_channels, g.input_size, g.input_size)
    model = space.build(arch, 10).eval()
    assert model.conv1[0].stride == (g.stem_stride, g.stem_stride)
    assert model.conv1(x).shape[-1] == g.stem_conv_size
    assert model.maxpool(model.conv1(x)).shape[-1] == stem_out_size(g)
    seen = []
    supernet = Supernet(space, 10).eval()
    supernet.stage2[0].register_forward_pre_hook(lambda _module, args: seen.append(args[0].shape[-1]))
    with torch.no_grad():
        supernet(x, arch)
    assert seen == [stem_out_size(g)]
    stem, first_unit = arch_ops(arch, g)[:2]
    assert (stem.stride, stem.size, first_unit.size) == (g.stem_stride, g.input_size, stem_out_size(g))
