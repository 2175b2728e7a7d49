"""Test-only fault injection: SIGKILL this process at a named point of the pipeline.

``tests/test_resume.py`` sets ``HF_LPFT_KILL_AT=<point>:<n>`` in a child process; the n-th time (1-based)
the pipeline passes ``fault_point(<point>)`` the process kills itself with SIGKILL (no cleanup, no
``finally``), exactly like the OOM killer or a pulled plug. The test then resumes the run and checks the
results are identical to an uninterrupted run. ``<point>:<n>:pause`` instead prints ``PAUSE_MARK`` to stderr
and sleeps there, so that a test can interrupt the run from outside (a real SIGINT, as Ctrl-C sends) at a
known moment. Without the variable (every real run) a call is one environment lookup.
"""

from __future__ import annotations

import os
import signal
import sys
import time

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
ACTIONS = ("kill", "pause")
PAUSE_MARK = "hf_lpft._faults: paused at"
PAUSE_SECONDS = 600.0  # a paused run waits this long for the test's signal, then goes on
_counts: dict[str, int] = {}


def fault_point(point: str) -> None:
    """Kill this process if ``$HF_LPFT_KILL_AT`` asks for the current visit of ``point`` (tests only)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, nth, action = (spec.split(":") + ["kill"])[:3]
    if target not in POINTS or not nth.isdigit() or action not in ACTIONS or spec.count(":") > 2:
        raise ValueError(f"{ENV}={spec!r} must look like <point>:<n>[:<action>] with a point in {list(POINTS)} "
                         f"and an action in {list(ACTIONS)}")
    if target == point:
        _counts[point] = _counts.get(point, 0) + 1
        if _counts[point] == int(nth) and action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif _counts[point] == int(nth):
            print(f"{PAUSE_MARK} {point}:{nth} (pid {os.getpid()})", file=sys.stderr, flush=True)
            time.sleep(PAUSE_SECONDS)  # a signal's handler raises here (KeyboardInterrupt for SIGINT)
