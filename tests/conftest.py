"""Fixtures every test package uses: the shipped search spaces, loaded once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from search_space import SearchSpace

SPACES = Path(__file__).resolve().parents[1] / "experiments" / "spaces"


@pytest.fixture(scope="session")
def imagenet_space() -> SearchSpace:
    return SearchSpace.from_yaml(SPACES / "imagenet.yaml")


@pytest.fixture(scope="session")
def fashion_space() -> SearchSpace:
    return SearchSpace.from_yaml(SPACES / "fashion_mnist.yaml")
