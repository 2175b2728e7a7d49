"""Test-only fault injection: SIGKILL this process at a named point of the pipeline.

``tests/test_resume.py`` sets ``HF_LPFT_KILL_AT=<point>:<n>`` in a child process; the n-th time (1-based)
the pipeline passes ``fault_point(<point>)`` the process kills itself with SIGKILL (no cleanup, no
``finally``), exactly like the OOM killer or a pulled plug. The test then resumes the run and checks the
results are identical to an uninterrupted run. Without the variable (every real run) a call is one
environment lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "HF_LPFT_KILL_AT"
POINTS = (
    "fedavg_client",       # inside a FedAvg round: a client has trained, the round is not aggregated yet
    "fedavg_round",        # between FedAvg rounds: the round checkpoint is written
    "personalize_epoch",   # inside a client's personalization: after an epoch of one of its phases
    "unit_exported",       # a unit's model is exported but its record (the "done" mark) is not written
    "strategy_done",       # between strategies: every client of one strategy is done
    "export_model",        # during a model export: files written into the temporary folder, not renamed
    "export_results",      # during the final export: results.parquet written, run_record.json not yet
    "fedavg_cache_store",  # storing a FedAvg result in run.fedavg_cache: files written, not renamed onto the key
)
_counts: dict[str, int] = {}


def fault_point(point: str) -> None:
    """Kill this process if ``$HF_LPFT_KILL_AT`` asks for the current visit of ``point`` (tests only)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, nth = spec.rpartition(":")
    if target not in POINTS or not nth.isdigit():
        raise ValueError(f"{ENV}={spec!r} must look like <point>:<n> with a point in {list(POINTS)}")
    if target == point:
        _counts[point] = _counts.get(point, 0) + 1
        if _counts[point] == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)
