"""Clean exits of the README's commands: a config error is one line on stderr, with exit code 2 from
``python recipes/...`` / ``hf-lpft``. Under ``accelerate launch`` the recipe prints the same line and exits 2,
but accelerate's launcher (``simple_launcher`` of accelerate 1.x) turns any non-zero exit of its child into
its own exit code 1 and, without ``-q``, adds a ``CalledProcessError`` traceback; its "values were not passed"
warning goes away with the config file ``accelerate config default`` writes. The tests pin down exactly what
the README says about it. Ctrl-C: the line and its resume command are tested in tests/test_resume.py; here
only that they survive ``accelerate launch``, which follows the terminal's SIGINT with a SIGTERM to its child.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hf_lpft._faults import PAUSE_MARK

ROOT = Path(__file__).resolve().parents[1]
LINE = "hf-lpft: configuration error: unknown section 'bad' in '--bad.option'; allowed: "


def child_env(tmp_path: Path) -> dict[str, str]:
    """This checkout's hf_lpft first on the path (also for the launcher's child); an HF home of the test's own."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf_home"))


def test_python_recipe_config_error_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "recipes/quickstart.py", "--bad.option", "x"], cwd=ROOT, text=True,
                          capture_output=True, env=child_env(tmp_path), timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(LINE) and done.stderr.count("\n") == 1, done.stderr
    assert done.stdout == ""


def test_accelerate_launch_config_error_is_one_line(tmp_path):
    """`accelerate config default` once (the README's step), then `accelerate launch -q`: the recipe's line and
    nothing else (no launcher warning, no traceback); exit code 1, accelerate's code for any failure."""
    env = child_env(tmp_path)
    write_basic_config_for(tmp_path)
    launcher = Path(sys.executable).parent / "accelerate"
    done = subprocess.run([str(launcher), "launch", "-q", "recipes/quickstart.py", "--bad.option", "x"], cwd=ROOT,
                          text=True, capture_output=True, env=env, timeout=300)
    assert done.stderr.startswith(LINE) and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr and "were not passed" not in done.stderr
    assert done.returncode == 1, (done.returncode, done.stderr)  # accelerate's, not the recipe's 2: README says so


def test_ctrl_c_under_accelerate_launch_is_one_line_and_exit_130(tmp_path, tiny_ds_path):
    """Ctrl-C as a terminal sends it (SIGINT to the whole process group) during PFT of a run under accelerate
    launch: the child's one line with the resume command, accelerate's exit code 130, no traceback."""
    out, log = tmp_path / "out", tmp_path / "run.log"
    env = child_env(tmp_path) | {"HF_LPFT_KILL_AT": "personalize_epoch:1:pause", "HF_HUB_OFFLINE": "1"}
    write_basic_config_for(tmp_path)
    args = ["--data.dataset", tiny_ds_path, "--data.num_classes", "4", "--fedavg.rounds", "1", "--fedavg.batch_size",
            "16", "--pft.strategies", "ft", "--pft.epochs", "1", "--pft.batch_size", "16", "--run.num_threads", "1",
            "--run.output_dir", str(out), "--log_level", "WARNING"]
    last = ctrl_c_when_paused([str(Path(sys.executable).parent / "accelerate"), "launch", "-q", "-m", "hf_lpft.cli",
                               "run", *args], cwd=tmp_path, env=env, log=log)
    assert last == f"hf-lpft: interrupted; resume with: hf-lpft run --config {out / 'config.yaml'} --run.resume true"


def ctrl_c_when_paused(cmd: list[str], *, cwd: Path, env: dict, log: Path) -> str:
    """Start ``cmd`` in a session of its own with SIGINT not ignored (like a command typed in a terminal), send
    SIGINT to its process group once it pauses at the fault point (as Ctrl-C does), and return its last output
    line after checking it exited with 130 and no traceback."""
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=f, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while PAUSE_MARK not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    return text.replace("\r", "\n").strip().splitlines()[-1]


def write_basic_config_for(tmp_path: Path) -> None:
    """The config file `accelerate config default` writes (the same function), in the test's own HF home."""
    from accelerate.utils import write_basic_config

    write_basic_config(save_location=str(tmp_path / "hf_home" / "accelerate" / "default_config.yaml"))


def test_interrupts_outside_training_are_one_line(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the config loads, or in another command: one line, exit 130. The resume command is offered
    only when the output folder holds this run's own config.yaml (a run writes it before any work)."""
    from hf_lpft import cli
    from hf_lpft.config import load_config

    def stop(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "load_config", stop)
    assert cli.main(["run", "--fedavg.rounds", "1"]) == 130
    assert capsys.readouterr().err == "hf-lpft: interrupted before the run started; nothing was written\n"
    monkeypatch.setattr(cli, "list_strategies", stop)
    assert cli.main(["strategies"]) == 130
    assert capsys.readouterr().err == "hf-lpft strategies: interrupted\n"

    out = tmp_path / "my run"
    cfg = load_config(None, ["--run.output_dir", str(out)])
    assert cli.interrupted_message(cfg).endswith("held anything of this run; nothing to resume, run the same "
                                                 "command again")
    out.mkdir()
    (out / "config.yaml").write_text(load_config(None, ["--run.output_dir", str(out), "--fedavg.rounds", "3"]).to_yaml())
    assert "nothing to resume" in cli.interrupted_message(cfg)  # another run's config: resuming it would be wrong
    (out / "config.yaml").write_text(cfg.to_yaml())
    assert cli.interrupted_message(cfg) == \
        f"hf-lpft: interrupted; resume with: hf-lpft run --config '{out}/config.yaml' --run.resume true"


def test_ctrl_c_in_a_sweep_recipe_is_one_line_naming_the_rerun(tmp_path, tiny_ds_path):
    """Ctrl-C during a Table 2 block's PFT: one line that gives the command to rerun (the sweep resumes), exit
    130, no traceback (a sweep point runs with run.resume on: sweep_config in studies/sweep.py)."""
    folder = tmp_path / "blocks"
    folder.mkdir()
    (folder / "base.yaml").write_text(f"data: {{dataset: {tiny_ds_path}, num_classes: 4}}\n"
                                      "fedavg: {rounds: 1, batch_size: 16}\n"
                                      "pft: {strategies: [ft], epochs: 1, batch_size: 16}\n"
                                      "run: {seeds: [0], num_threads: 1}\n")
    (folder / "blocks.yaml").write_text("blocks:\n  tiny: {config: {}}\n")
    cmd = ["recipes/table2.py", "--folder", str(folder), "--output_dir", str(tmp_path / "out"), "--log_level", "WARNING"]
    env = child_env(tmp_path) | {"HF_LPFT_KILL_AT": "personalize_epoch:1:pause", "HF_HUB_OFFLINE": "1"}
    last = ctrl_c_when_paused([sys.executable, *cmd], cwd=ROOT, env=env, log=tmp_path / "run.log")
    assert last == f"table2: interrupted; rerun python {' '.join(cmd)} to continue: finished runs and seeds are reused"


def test_run_recipe_without_resume_says_so(capsys):
    from hf_lpft.cli import run_recipe

    def stop(argv):
        raise KeyboardInterrupt
    assert run_recipe(stop, [], "theory", resumes=False) == 130
    assert capsys.readouterr().err == "theory: interrupted; nothing to resume, run it again\n"
    assert run_recipe(lambda argv: 7, ["x"], "theory") == 7


def test_log_lines_do_not_break_progress_bars():
    """A line logged while a bar is drawn is a line of its own (a plain StreamHandler glues it to the bar)."""
    import io
    import logging

    from tqdm import tqdm

    from hf_lpft import cli

    out = io.StringIO()
    handler = cli._ProgressAwareHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("hf_lpft.test_bars")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with tqdm(total=2, file=out, desc="FedAvg") as bar:
            logger.warning("phase finetune")
            bar.update(2)
    finally:
        logger.removeHandler(handler)
    lines = [line.strip() for line in out.getvalue().replace("\r", "\n").splitlines()]
    assert "WARNING hf_lpft.test_bars: phase finetune" in lines, lines
    assert any(line.startswith("FedAvg: 100%") for line in lines), lines
