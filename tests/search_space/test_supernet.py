from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from search_space import Supernet


def _randomise_bn(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics, so parity covers the slicing of running stats too."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def fashion_supernet(fashion_space):
    torch.manual_seed(0)
    net = Supernet(fashion_space, num_classes=10)
    with torch.no_grad():
        _randomise_bn(net, 1)
    return net.eval()


def test_supernet_extract_parity_over_sampled_archs(fashion_supernet, fashion_space):
    rng = np.random.default_rng(42)
    archs = [fashion_space.sample(rng) for _ in range(24)] + [fashion_space.largest(), fashion_space.smallest()]
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        for arch in archs:
            plain = fashion_supernet.extract(arch).eval()
            assert (fashion_supernet(x, arch) - plain(x)).abs().max().item() <= 1e-5, arch.encode()


def test_parity_imagenet_references(imagenet_space):
    torch.manual_seed(0)
    net = Supernet(imagenet_space, num_classes=1000)
    with torch.no_grad():
        _randomise_bn(net, 2)
    net.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        for name in ("shufflenet_v2_x0_5", "shufflenet_v2_x2_0"):
            arch = imagenet_space.reference(name)
            plain = net.extract(arch)
            assert sum(p.numel() for p in plain.parameters()) == imagenet_space.cost(arch).params
            assert (net(x, arch) - plain(x)).abs().max().item() <= 1e-5


def test_extract_copies_and_is_pure(fashion_supernet, fashion_space):
    arch = fashion_space.sample(np.random.default_rng(5))
    before = {k: v.clone() for k, v in fashion_supernet.state_dict().items()}
    plain = fashion_supernet.extract(arch)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(1.0)
    for k, v in fashion_supernet.state_dict().items():
        assert torch.equal(v, before[k]), k
    again = fashion_supernet.extract(arch)
    for (k, a), b in zip(again.state_dict().items(), fashion_supernet.extract(arch).state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_kernel_is_centre_of_the_largest(fashion_supernet, fashion_space):
    rng = np.random.default_rng(9)
    arch = next(a for a in (fashion_space.sample(rng) for _ in range(100)) if a.stages[0].units[1].kernel == 3)
    plain = fashion_supernet.extract(arch)
    big = fashion_supernet.stage2[1].branch2[3].weight
    small = plain.stage2[1].branch2[3].weight
    c = small.shape[0]
    assert torch.equal(small, big[:c, :, 2:5, 2:5])


def test_two_archs_on_two_threads(fashion_supernet, fashion_space):
    """No hidden state: concurrent forwards of different archs give their own results."""
    rng = np.random.default_rng(3)
    archs = [fashion_space.sample(rng) for _ in range(2)]
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        expected = [fashion_supernet(x, a) for a in archs]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def run(i):
        with torch.no_grad():
            for _ in range(5):
                results[i].append(fashion_supernet(x, archs[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        for out in results[i]:
            assert torch.equal(out, expected[i])


def test_training_mode_updates_only_the_active_slice(fashion_space):
    torch.manual_seed(0)
    net = Supernet(fashion_space, num_classes=10).train()
    arch = fashion_space.smallest()
    bn = net.conv1[1]
    before = bn.running_mean.clone()
    net(torch.randn(8, 1, 28, 28), arch).sum().backward()
    changed = (bn.running_mean != before).nonzero().flatten()
    assert len(changed) > 0 and changed.max().item() < arch.stem
    assert net.stage2[0].branch1[0].weight.grad is not None
    assert net.stage2[3].branch2[0].weight.grad is None  # unit beyond the smallest depth got no gradient


def test_extract_validates(fashion_supernet, imagenet_space):
    with pytest.raises(ValueError, match="not in"):
        fashion_supernet.extract(imagenet_space.reference("shufflenet_v2_x2_0"))


def test_cumulative_batchnorm_through_the_supernet_matches_the_plain_network(fashion_space):
    """momentum=None (what BN recalibration uses) averages batches in the supernet as nn.BatchNorm2d does."""
    torch.manual_seed(0)
    net = Supernet(fashion_space, num_classes=10)
    arch = fashion_space.sample(np.random.default_rng(4))
    plain = net.extract(arch)
    batches = [torch.randn(8, 1, 28, 28) for _ in range(3)]
    for model in (net, plain):
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        model.train()
    with torch.no_grad():
        for x in batches:
            net(x, arch)
            plain(x)
    sliced = net.eval().extract(arch).state_dict()
    for name, value in plain.state_dict().items():
        if "running" in name:
            torch.testing.assert_close(sliced[name], value, rtol=1e-4, atol=1e-5)
