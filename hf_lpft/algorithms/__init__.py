"""General-FL algorithms (``fedavg.fl_strategy``), one per file, registered by decorator (``base``).

Every module in this package is imported here, so dropping a new algorithm file in this folder is all it
takes to register it; an algorithm defined elsewhere registers with ``register_algorithm`` (e.g. in a test).
"""

import importlib
import pkgutil

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

_SKIP = {"base"}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in _SKIP and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["ALGORITHMS", "AlgorithmConfig", "FLState", "GeneralFL", "WeightedSums", "build_algorithm", "from_message",
           "get_algorithm", "register_algorithm", "unregister_algorithm"]
