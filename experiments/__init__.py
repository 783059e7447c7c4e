"""How a run is carried out: experiment configs, data, training, evaluation, export and the report."""

import os

# Idle OpenMP threads sleep instead of spinning. With spinning, two training threads on two cores that another
# process also uses ran 10x slower here (20 vs 200 images/s). It only takes effect if set before torch starts its
# thread pool, which is why it sits in the package's first import (and at the top of search.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
