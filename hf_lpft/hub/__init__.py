"""Publishing to the Hugging Face Hub: Hub-ready export, push, and loading personalized clients back.

Submodules are imported on first use (they pull in torch, datasets and huggingface_hub).
"""

from __future__ import annotations

import importlib

_EXPORTS = {"export_run": "export", "HubFolders": "export", "push_run": "push", "PushResult": "push",
            "load_personalized": "load"}

__all__ = [*_EXPORTS, "HubPushError"]


class HubPushError(RuntimeError):
    """Publishing failed; the message says what is and is not on the Hub, and how to retry."""


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"hf_lpft.hub.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'hf_lpft.hub' has no attribute {name!r}")
