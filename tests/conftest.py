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


@pytest.fixture(scope="session", autouse=True)
def cache_home(tmp_path_factory) -> Path:
    """Shared tables and supernets go to a folder of the test session, never to the user's cache."""
    import os

    home = tmp_path_factory.mktemp("shufflenas-home")
    previous = os.environ.get("SHUFFLENAS_HOME")
    os.environ["SHUFFLENAS_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("SHUFFLENAS_HOME", None)
    else:
        os.environ["SHUFFLENAS_HOME"] = previous
