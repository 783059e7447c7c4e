"""What can be built: architectures, the search space, plain ShuffleNet V2 networks and the weight-sharing supernet.

This package knows nothing of latency tables, searchers or training (it never imports optuna or ray).
"""

from search_space.arch import Arch, Stage, Unit
from search_space.cost import Cost, arch_cost
from search_space.layout import Geometry, UnitShape, unit_shapes
from search_space.network import ShuffleNetV2
from search_space.space import REFERENCES, SearchSpace, SpaceError, parse_arch, reference_arch, space_to_dict
from search_space.supernet import Supernet

__all__ = [
    "REFERENCES",
    "Arch",
    "Cost",
    "Geometry",
    "SearchSpace",
    "ShuffleNetV2",
    "SpaceError",
    "Stage",
    "Supernet",
    "Unit",
    "UnitShape",
    "arch_cost",
    "parse_arch",
    "reference_arch",
    "space_to_dict",
    "unit_shapes",
]
