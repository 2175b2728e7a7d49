"""Personalized fine-tuning strategies, one per file, registered by decorator."""

from hf_lpft.strategies import ft, lp, lp_ft  # noqa: F401  (registration side effect)
from hf_lpft.strategies.base import STRATEGIES, Budget, Strategy, build_strategy, get_strategy, register_strategy

__all__ = ["STRATEGIES", "Budget", "Strategy", "build_strategy", "get_strategy", "register_strategy"]
