"""``hf-lpft run --help`` / ``personalize --help`` list every config field (generated from the dataclasses);
``hf-lpft --version``; the help options change nothing in parsing."""

import dataclasses
import os
import re
import subprocess
import sys

import pytest

import hf_lpft
from hf_lpft.cli import main, run_from_args
from hf_lpft.config import SECTIONS, cli_value, field_default


def _help(capsys, argv: list[str], call=main) -> str:
    with pytest.raises(SystemExit) as exc:
        call(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def _flat(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _blocks(text: str) -> dict[str, str]:
    """Help text of each ``--section.key`` option, whitespace removed (argparse wraps lines, also at hyphens)."""
    flat = _flat(text)
    names = [f"--{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    starts = [0]
    for name in names:  # in order: each option after the previous one (section by section, field order)
        found = re.compile(re.escape(name) + r"(?=[,a-zA-Z(\[|])").search(flat, starts[-1])  # not a longer name
        assert found, f"{name} missing from --help (or out of order)"
        starts.append(found.start())
    starts = starts[1:]
    ends = starts[1:] + [len(flat)]
    return {name: flat[a:b] for name, a, b in zip(names, starts, ends)}


@pytest.mark.parametrize("command", ["run", "personalize"])
def test_help_lists_every_field_with_type_default_and_help(capsys, command):
    out = _help(capsys, [command, "--help"])
    for section in SECTIONS:
        assert f"{section} options:" in out
    blocks = _blocks(out)
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            block = blocks[f"--{section}.{f.name}"]
            assert "(default:" + _flat(cli_value(field_default(f))) + ")" in block, block
            assert _flat(f.metadata["help"])[:40] in block, block
    assert "--fedavg.rounds,--roundsint" in blocks["--fedavg.rounds"]  # type and the short form
    assert "(default:30)" in blocks["--fedavg.rounds"] and "(default:ft,lp,lp_ft)" in blocks["--pft.strategies"]
    assert "--pft.lr,--lr" not in out  # lr is in fedavg and pft: only the qualified names are offered
    if command == "personalize":
        assert "Personalize a given global model" in out


def test_help_says_which_seed_is_which_and_offers_no_bare_seed(capsys):
    """--seed used to set data.seed (the partition) only because the name is unique: `--run.seeds 0 --seed 1`
    silently trained another partition. The help names both seeds and offers no --seed."""
    out = _help(capsys, ["run", "--help"])
    blocks = _blocks(out)
    assert "--data.seed,--seed" not in _flat(out) and "--data.seedint" in blocks["--data.seed"]
    assert "Partitionseed" in blocks["--data.seed"] and "Notthetrainingseed(run.seeds)" in blocks["--data.seed"]
    assert "--run.seeds,--seeds" in blocks["--run.seeds"] and "Trainingseeds" in blocks["--run.seeds"]
    assert "--data.seedisthepartition,--run.seedsthetrainingseeds" in _flat(out)  # the epilog


def test_help_shows_a_recipes_defaults(capsys):
    out = _help(capsys, ["--help"], call=lambda a: run_from_args(a, defaults={"fedavg": {"rounds": 3}}))
    assert "(default:3)" in _blocks(out)["--fedavg.rounds"]


def test_help_options_are_not_parsed_by_argparse(tmp_path, capsys):
    """Overrides still go through load_config: an unknown key fails, a short form and --config still work."""
    assert main(["run", "--fedavg.no_such_key", "1"]) == 2
    assert "unknown key(s) ['no_such_key'] in section 'fedavg'" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("fedavg:\n  rounds: -1\n")
    assert main(["run", "--config", str(cfg), "--data.n_per_domain", "40"]) == 2  # the file's value is checked
    assert "rounds" in capsys.readouterr().err


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"hf-lpft {hf_lpft.__version__}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "hf_lpft.cli", "--version"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.strip() == f"hf-lpft {hf_lpft.__version__}"
