"""Personalized fine-tuning strategies, one per file, registered by decorator.

Every module in this package is imported here, so dropping a new strategy file in this folder is all
it takes to register it.
"""

from hf_lpft.registry import import_entries
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

import_entries(__name__, __path__)

__all__ = ["EXPORT_KINDS", "STRATEGIES", "Budget", "Strategy", "build_strategy", "display_name", "get_strategy",
           "register_strategy", "unregister_strategy"]
