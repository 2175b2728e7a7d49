"""General-FL algorithms (``fedavg.fl_strategy``), one per file, registered by decorator (``base``).

Every module in this package is imported here, so dropping a new algorithm file in this folder is all it
takes to register it; an algorithm defined elsewhere registers with ``register_algorithm`` (e.g. in a test).
"""

from hf_lpft.algorithms.base import (
    ALGORITHMS,
    AlgorithmConfig,
    FLState,
    GeneralFL,
    WeightedSums,
    build_algorithm,
    from_message,
    get_algorithm,
    register_algorithm,
    unregister_algorithm,
)
from hf_lpft.registry import import_entries

import_entries(__name__, __path__)

__all__ = ["ALGORITHMS", "AlgorithmConfig", "FLState", "GeneralFL", "WeightedSums", "build_algorithm", "from_message",
           "get_algorithm", "register_algorithm", "unregister_algorithm"]
