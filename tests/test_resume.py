"""Never lose work: SIGKILL the pipeline at distinct points, resume, and get byte-identical results.

Every run goes through the real CLI (``hf-lpft run ...``) in a child process. Importing the stack costs
~15 s a process here, so one helper process imports it once and forks a fresh child per run (its own
address space, no shared state; the helper itself never computes, so forking is safe). A child is killed
with SIGKILL by the test hook ``hf_lpft._faults`` (``HF_LPFT_KILL_AT=<point>:<n>``): no ``finally``
block, no atexit handler runs, as with the OOM killer.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from hf_lpft._faults import PAUSE_MARK

SERVER = textwrap.dedent(r"""
    import json, os, sys, traceback
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import signal
    from hf_lpft import cli, pipeline  # noqa: F401  (import the whole stack once)
    # as started from a terminal: SIGINT raises KeyboardInterrupt (pytest may run where it is ignored, e.g. `&`)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import io
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig = Figure()  # warm matplotlib's font cache once (no threads are started)
    FigureCanvasAgg(fig)
    fig.add_subplot().set_title("warm-up")
    fig.savefig(io.BytesIO(), format="png")
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the run: output to its log, kill point from the job
            fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ.pop("HF_LPFT_KILL_AT", None)
            if job["kill_at"]:
                os.environ["HF_LPFT_KILL_AT"] = job["kill_at"]
            try:
                code = cli.main(["run", *job["args"]])
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                          "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)
""")

# 3 clients (a, b, c), 2 FedAvg rounds, strategies ft (2 epochs) and lp_ft (1 LP + 1 FT epoch).
# (point, n): the n-th visit of the point is killed. Visits: fedavg_client 1-3 = round 1, 4-6 = round 2;
# personalize_epoch 1-6 = ft, 7 = lp_ft/a after its LP phase; export_model 1 = the global model.
KILLS = [
    ("fedavg_client", 5),      # inside round 2, after two of three clients trained
    ("fedavg_round", 1),       # between rounds 1 and 2 (round-1 checkpoint written)
    ("export_model", 1),       # while exporting the global model (all round checkpoints written)
    ("personalize_epoch", 7),  # inside lp_ft on client a, between its LP and FT phases
    ("unit_exported", 2),      # ft/b exported, its unit record not yet written
    ("strategy_done", 1),      # between strategies: ft done on every client, lp_ft not started
    pytest.param("export_model", 6, marks=pytest.mark.slow),  # while exporting lp_ft/b's model (same point, later)
    ("export_results", 1),     # final export: results.parquet written, run_record.json not
]


class Runner:
    """Talks to the helper process: one line of JSON per run, one line back with its exit status."""

    def __init__(self, tmp: Path):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("HF_LPFT_KILL_AT", None)
        self.tmp = tmp
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=str(tmp))
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, out: Path, args: list[str], kill_at: str | None = None, *, interrupt: int | None = None) -> dict:
        """Run ``hf-lpft run --run.output_dir <out> <args>``; with ``interrupt``, send that signal from outside
        once the run paused at ``kill_at`` (``<point>:<n>:pause``)."""
        return self.run_argv(["--run.output_dir", str(out), *args], f"{out.name}.log", kill_at, interrupt=interrupt)

    def run_argv(self, argv: list[str], log_name: str, kill_at: str | None = None, *,
                 interrupt: int | None = None) -> dict:
        log = self.tmp / log_name
        job = {"args": argv, "kill_at": kill_at, "log": str(log)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.proc.stdout.readline())["pid"]
        if interrupt is not None:
            while PAUSE_MARK not in (log.read_text() if log.exists() else ""):
                time.sleep(0.1)
            os.kill(pid, interrupt)
        status = json.loads(self.proc.stdout.readline())
        status["log"] = log.read_text() if log.exists() else ""
        return status

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.terminate()  # idle between jobs; its interpreter shutdown would only cost time
        self.proc.wait(timeout=60)
        self.proc.stdout.close()


def study_args(data: str) -> list[str]:
    return ["--data.dataset", data, "--data.num_classes", "4", "--model.backbone", "timm:test_resnet",
            "--fedavg.rounds", "2", "--fedavg.batch_size", "16", "--pft.strategies", "ft,lp_ft",
            "--pft.epochs", "2", "--pft.batch_size", "16", "--pft.strategy_args", "{lp_ft: {lp_epochs: 1}}",
            "--run.num_threads", "1", "--log_level", "WARNING"]


def temp_leftovers(root: Path) -> list[str]:
    """Names a writer uses while writing (ours: ``.<name>.<random>.tmp``) or hidden files of any kind."""
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    r = Runner(tmp_path_factory.mktemp("resume"))
    yield r
    r.close()


@pytest.fixture(scope="module")
def reference(runner, tiny_ds_path):
    out = runner.tmp / "reference"
    status = runner.run(out, study_args(tiny_ds_path))
    assert status["code"] == 0, status["log"]
    return out


def test_results_have_no_timing_columns(reference):
    """Byte comparison of results.parquet is fair: it holds no wall-clock values."""
    df = pd.read_parquet(reference / "results.parquet")
    assert not [c for c in df.columns if "second" in c or "time" in c], df.columns
    assert sorted(df.strategy.unique()) == ["ft", "global_model", "lp_ft"] and len(df) == 9
    assert not temp_leftovers(reference)


@pytest.mark.parametrize(("point", "nth"), KILLS, ids=[f"{p}-{n}" for p, n in (getattr(k, "values", k) for k in KILLS)])
def test_kill_then_resume_gives_identical_results(runner, reference, tiny_ds_path, point, nth):
    out = runner.tmp / f"killed_{point}_{nth}"
    killed = runner.run(out, study_args(tiny_ds_path), kill_at=f"{point}:{nth}")
    assert killed["signal"] == signal.SIGKILL, killed
    assert (out / "results.parquet").exists() == (point == "export_results")
    assert not (out / "run_record.json").exists()
    units = {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("units/*/*.json")}

    resumed = runner.run(out, [*study_args(tiny_ds_path), "--run.resume", "true"])
    assert resumed["code"] == 0, resumed["log"]
    assert (out / "results.parquet").read_bytes() == (reference / "results.parquet").read_bytes()
    for rel in ["global/model.safetensors", "clients/ft/b/model.safetensors", "clients/lp_ft/c/model.safetensors"]:
        assert (out / rel).read_bytes() == (reference / rel).read_bytes(), rel
    assert {p: p.stat().st_mtime_ns for p in units} == units, "completed units were redone"
    assert not temp_leftovers(out), "temporary files left behind after resume"
    assert json.loads((out / "run_record.json").read_text())["run_info"]["resumed"] is True


def test_ctrl_c_during_pft_names_the_resume_command_and_the_resume_says_what_it_reused(runner, reference,
                                                                                        tiny_ds_path):
    """A real SIGINT (what Ctrl-C sends) from outside while lp_ft personalizes client a, between its LP and FT
    phases: one line naming the command that resumes, no traceback, exit code 130. That command, run as printed,
    says in one line what it reuses (every FedAvg round, the three finished FT units) and ends with the results
    of the uninterrupted run."""
    out = runner.tmp / "interrupted"
    stopped = runner.run(out, study_args(tiny_ds_path), kill_at="personalize_epoch:7:pause", interrupt=signal.SIGINT)
    assert stopped["code"] == 130, stopped["log"]
    assert "Traceback" not in stopped["log"] and "KeyboardInterrupt" not in stopped["log"], stopped["log"]
    after = [line for line in stopped["log"].split(PAUSE_MARK, 1)[1].replace("\r", "\n").splitlines()[1:]
             if line.strip() and "personalize (seed 0)" not in line]  # the progress bar tqdm closes
    command = f"hf-lpft run --config {out / 'config.yaml'} --run.resume true"
    assert after == [f"hf-lpft: interrupted; resume with: {command}"], after

    argv = shlex.split(command)
    assert argv[:2] == ["hf-lpft", "run"]  # the console script is hf_lpft.cli:main, which the helper calls
    resumed = runner.run_argv(argv[2:], "interrupted_resumed.log")
    assert resumed["code"] == 0, resumed["log"]
    reused = [line for line in resumed["log"].splitlines() if "resuming" in line]
    assert reused == [f"INFO hf_lpft.pipeline: resuming {out}: reusing 2 of 2 FedAvg rounds and 3 of 6 finished "
                      "personalization units (ft 3/3, lp_ft 0/3); the rest runs now"], reused
    assert (out / "results.parquet").read_bytes() == (reference / "results.parquet").read_bytes()
    assert (out / "clients/lp_ft/a/model.safetensors").read_bytes() == \
        (reference / "clients/lp_ft/a/model.safetensors").read_bytes()
    assert not temp_leftovers(out)


def diverging_client(monkeypatch, client_id: str):
    """Make ``personalize`` hit a NaN loss for one client (the loop's own error), the others train normally."""
    import hf_lpft.run.units as units
    from hf_lpft.train.loop import NonFiniteLossError

    real = units.personalize

    def personalize(strategy, global_model, data, **kwargs):
        if data.client_id == client_id:
            raise NonFiniteLossError(f"client {client_id}: loss is nan in phase 'finetune', epoch 0; lower the learning rate")
        return real(strategy, global_model, data, **kwargs)
    monkeypatch.setattr(units, "personalize", personalize)


def test_diverging_client_is_recorded_and_the_others_go_on(tmp_path, tiny_ds_path, monkeypatch, capsys, one_thread):
    from hf_lpft import cli

    diverging_client(monkeypatch, "b")
    out = tmp_path / "out"
    args = ["run", *study_args(tiny_ds_path), "--run.output_dir", str(out), "--fedavg.rounds", "1"]
    assert cli.main(args) == 0
    df = pd.read_parquet(out / "results.parquet").set_index(["strategy", "client_id"])
    assert df.loc[("ft", "b"),
                  "error"].startswith("client b: loss is nan") and pd.isna(df.loc[("ft", "b"), "local_acc"])
    assert df.drop(index=[("ft", "b"), ("lp_ft", "b")]).error.isna().all()
    assert df.drop(index=[("ft", "b"), ("lp_ft", "b")]).local_acc.notna().all()
    assert "Failed (excluded from the table): ft/b/seed 0, lp_ft/b/seed 0" in (out / "summary.md").read_text()
    assert not (out / "clients" / "ft" / "b").exists() and (out / "clients" / "ft" / "c" / "model.safetensors").is_file()
    assert not temp_leftovers(out)


def test_on_error_raise_stops_with_a_clear_message_and_keeps_finished_units(tmp_path, tiny_ds_path, monkeypatch, capsys,
                                                                            one_thread):
    from hf_lpft import cli

    diverging_client(monkeypatch, "b")
    out = tmp_path / "out"
    args = ["run", *study_args(tiny_ds_path), "--run.output_dir", str(out), "--fedavg.rounds", "1",
            "--run.on_error", "raise"]
    assert cli.main(args) == 4
    err = capsys.readouterr().err
    assert "hf-lpft: training stopped: client b: loss is nan in phase 'finetune'" in err and "run.on_error continue" in err
    assert [p.name for p in (out / "checkpoints" / "seed_0" / "units" / "ft").iterdir()] == ["a.json"]
    assert not (out / "results.parquet").exists() and not temp_leftovers(out)


@pytest.fixture()
def one_thread():
    """Tiny models on a shared 2-core machine: one torch thread is faster than several fighting for it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("strategy", ["ft", "lora"])
def test_unit_results_do_not_depend_on_client_order(strategy, tiny_clients, accelerator, tmp_path, one_thread):
    """Each (seed, strategy, client) unit derives all its randomness (batch order, LoRA init) from its own seed,
    whatever the order of the clients and whatever the process did before."""
    from hf_lpft.config import load_config
    from hf_lpft.layout import RunLayout
    from hf_lpft.models.backbone import build_model
    from hf_lpft.run.preflight import build_strategies
    from hf_lpft.run.settings import eval_settings
    from hf_lpft.run.units import personalize_unit

    cfg = load_config(None, {"pft": {"strategies": [strategy], "epochs": 1, "batch_size": 16},
                             "run": {"output_dir": str(tmp_path), "distortion": False}})
    unit = build_strategies(cfg)[strategy]
    global_model = build_model("timm:test_resnet", num_classes=4, image_size=32, seed=1)

    def rows(order, history):
        import torch

        torch.manual_seed(history)  # whatever ran before in this process (a resumed run skips units, loads θ_G)
        out = {}
        for i in order:
            record = personalize_unit(cfg, unit, global_model, tiny_clients, i, seed=0,
                                      layout=RunLayout(tmp_path / str(order), cfg.run.seeds), accelerator=accelerator,
                                      evaluation=eval_settings(cfg.run, cfg.pft))
            out[i] = {k: record["row"][k] for k in ("local_acc", "acc_by_client", "final_train_loss")}
        return out
    forward, backward = rows([0, 1, 2], history=1), rows([2, 1, 0], history=2)
    assert forward == backward


@pytest.mark.parametrize("kill_at, source",
                         [("fedavg_cache_store:1", "fedavg"), ("personalize_epoch:3", "fedavg_cache")])
def test_kill_then_resume_with_a_fedavg_cache(runner, reference, tiny_ds_path, kill_at, source):
    """Killed while storing the FedAvg result (resume trains-from-checkpoint and stores it; the dead writer's
    temporary folder is removed) or after storing it (resume loads it): the same results either way."""
    cache, out = runner.tmp / f"cache_{kill_at}", runner.tmp / f"cached_{kill_at}"
    args = [*study_args(tiny_ds_path), "--run.fedavg_cache", str(cache)]
    killed = runner.run(out, args, kill_at=kill_at)
    assert killed["signal"] == signal.SIGKILL, killed
    assert bool(temp_leftovers(cache)) == (source == "fedavg")  # the killed store's temporary folder
    resumed = runner.run(out, [*args, "--run.resume", "true"])
    assert resumed["code"] == 0, resumed["log"]
    assert (out / "results.parquet").read_bytes() == (reference / "results.parquet").read_bytes()
    info = json.loads((out / "run_record.json").read_text())["run_info"]["global_model"]["0"]
    assert info["source"] == source and [p.name for p in cache.iterdir()] == [info["key"]]
    assert not temp_leftovers(out)
