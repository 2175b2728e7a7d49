"""Personalized fine-tuning strategies, one per file, registered by decorator.

Every module in this package is imported here, so dropping a new strategy file in this folder is all
it takes to register it.
"""

import importlib
import pkgutil

from hf_lpft.strategies.base import (
    EXPORT_KINDS,
    STRATEGIES,
    Budget,
    Strategy,
    build_strategy,
    display_name,
    get_strategy,
    register_strategy,
    unregister_strategy,
)

_SKIP = {"base"}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in _SKIP and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["EXPORT_KINDS", "STRATEGIES", "Budget", "Strategy", "build_strategy", "display_name", "get_strategy",
           "register_strategy", "unregister_strategy"]
