"""The whole study as a Flower App: general FL with a Flower strategy, PFT on every node, cross-client evaluation.

``APP_DIR`` (``python -m hf_lpft.flower_app`` prints it) is the Flower App to hand to ``flwr run``:
its ``pyproject.toml`` names the ServerApp and ClientApp of :mod:`hf_lpft.flower_app.apps` and
the run config (``config``, ``overrides``, ``output-dir``, ``num-nodes``, ``timeout``). The code itself comes
from the hf_lpft installed on each machine (the SuperLink's and every SuperNode's), so install the same
version everywhere; the run record lists the version each node reported.
"""

from pathlib import Path

APP_DIR = Path(__file__).parent / "app"

__all__ = ["APP_DIR"]
