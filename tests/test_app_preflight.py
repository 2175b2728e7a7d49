"""The Flower App runs the pipeline's preflight (``preflight(cfg, engine="flower-app")``) before its first message.

Each case is one of tests/test_preflight.py's own (the same arguments, not re-typed): a bad Hub setting, an
infeasible size, an unknown scheme option, a bad strategy option. The App's server (``run_study`` on a fake
Grid that records every call) must reject it with exactly the pipeline's message, within
``PREFLIGHT_SECONDS``, without a single call on the Grid (no message, not even a node lookup) and without
creating its output folder. Only the checks that need no data apply: the nodes hold the data.
"""

from __future__ import annotations

import shlex
import time

import pytest
import test_preflight as pipeline_cases
from test_preflight import BASE, CLI_CASES, HUB_CASES, PREFLIGHT_SECONDS

from hf_lpft.config import ConfigError, load_config
from hf_lpft.pipeline import run

pytest.importorskip("flwr", reason="Flower is not installed: pip install 'hf-lpft[flower]'")

# test_preflight's fixtures, the same objects (its datasets and manifests, fake Hub, training tripwire)
ctx, server, hub_env, tripwire = (pipeline_cases.ctx, pipeline_cases.server, pipeline_cases.hub_env,
                                  pipeline_cases.tripwire)

# The data-free cases: options the scheme does not read, sizes an embedded builder cannot provide (the other
# size cases need the dataset, which only the nodes hold), strategy options.
APP_CASES = [c for c in CLI_CASES if c[0] in ("scheme_option", "strategy")
             or (c[0] == "size" and "n_per_domain" in c[1])]


class RecordingGrid:
    """A Flower Grid that records every call and has no node: any call means the App went past its preflight."""

    def __init__(self):
        self.calls: list[str] = []

    def get_node_ids(self):
        self.calls.append("get_node_ids")
        return []

    def push_messages(self, messages):
        self.calls.append("push_messages")
        return []

    def pull_messages(self, message_ids):
        self.calls.append("pull_messages")
        return []

    def send_and_receive(self, messages, *, timeout=None):
        self.calls.append("send_and_receive")
        return []


def split_config(args: list[str]) -> tuple[str | None, list[str]]:
    """(the ``--config`` YAML file or None, the other arguments) of ``hf-lpft run`` arguments."""
    if "--config" not in args:
        return None, args
    k = args.index("--config")
    return args[k + 1], args[:k] + args[k + 2:]


def pipeline_message(args: list[str]) -> str:
    """The built-in pipeline's message for the config of ``args`` (its training is a tripwire)."""
    with pytest.raises(ConfigError) as info:
        run(load_config(*split_config(args)))
    return str(info.value)


def app_rejects(args: list[str]) -> tuple[str, float, list[str]]:
    """(message, seconds, grid calls) of the Flower App's server on the study of ``args`` (as ``flwr run``
    passes it: the run config's ``config`` file and ``overrides``)."""
    from hf_lpft.flower_app.server import run_study, study_config

    path, overrides = split_config(args)
    grid, start = RecordingGrid(), time.perf_counter()
    with pytest.raises(ConfigError) as info:
        run_study(grid, study_config({"config": path, "overrides": shlex.join(overrides)}), num_nodes=2,
                  timeout=1.0)
    return str(info.value), time.perf_counter() - start, grid.calls


def check_same_rejection(args: list[str], out, expected: list[str]) -> None:
    message = pipeline_message(args)
    for text in expected:
        assert text in message, f"{text!r} not in the pipeline's message: {message}"
    app, seconds, calls = app_rejects(args)
    print(f"Flower App rejected in {seconds:.3f} s before any message: {app}")
    assert app == message
    assert calls == [], f"the App called the Grid before rejecting: {calls}"
    assert seconds < PREFLIGHT_SECONDS, f"took {seconds:.1f} s"
    assert not out.exists(), "a rejected study created its output folder"


@pytest.mark.parametrize(("extra", "expected"), [c[2:] for c in APP_CASES], ids=[f"{c[0]}-{c[1]}" for c in APP_CASES])
def test_app_rejects_before_its_first_message_as_the_pipeline(ctx, tripwire, tmp_path, extra, expected):
    out = tmp_path / "out"
    args = ["--data.dataset", ctx.data, "--run.output_dir", str(out), *BASE[:-2], *extra(ctx)]
    check_same_rejection(args, out, expected)


@pytest.mark.parametrize(("setup", "repo", "expected"), [c[1:] for c in HUB_CASES], ids=[c[0] for c in HUB_CASES])
def test_app_rejects_a_bad_hub_setting_before_its_first_message(ctx, tripwire, hub_env, monkeypatch, tmp_path,
                                                               setup, repo, expected):
    setup(monkeypatch, hub_env)
    out = tmp_path / "out"
    args = ["--data.dataset", ctx.data, "--run.output_dir", str(out), *BASE[:-2], "--push_to_hub",
            "--hub_repo_id", repo]
    check_same_rejection(args, out, expected)


@pytest.mark.parametrize(("overrides", "expected"), [
    (["--pft.eval_every", "2"], "pft.eval_every=2: epoch curves score every client's test split"),
    (["--pft.batched_probe", "true"], "pft.batched_probe=true trains all clients' heads in one process"),
    (["--fedavg.fl_strategy", "fedadam", "--fedavg.fl_strategy_args", "{lr: 0.01}"], "unknown option"),
])
def test_app_refuses_what_a_federation_cannot_honour_before_its_first_message(ctx, tmp_path, overrides, expected):
    out = tmp_path / "out"
    message, seconds, calls = app_rejects(["--data.dataset", ctx.data, "--run.output_dir", str(out), *BASE[:-2],
                                           *overrides])
    assert expected in message and calls == [] and seconds < PREFLIGHT_SECONDS and not out.exists()
