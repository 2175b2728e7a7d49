"""Strategies describe themselves: adding one touches only its own file (here: only this test)."""

import pytest
from huggingface_hub import ModelCard

from hf_lpft.config import load_config
from hf_lpft.pipeline import run
from hf_lpft.strategies import STRATEGIES, Strategy, register_strategy, unregister_strategy
from hf_lpft.strategies.lp_ft import LPFT
from hf_lpft.train.phase import Phase


class _Throwaway(Strategy):
    """Fine-tune only the head then everything, one epoch each: registered by the test, not the package."""

    name = "throwaway_ft"
    display_name = "Throwaway FT"
    description = "A strategy that exists only inside tests/test_strategy_registry.py."
    export_kind = "full"

    def phases(self) -> list[Phase]:
        return [Phase("probe", "head", 1, self.budget.lr, bn="frozen"), Phase("finetune", "all", 1, self.budget.lr)]


@pytest.fixture()
def throwaway():
    register_strategy(_Throwaway)
    try:
        yield _Throwaway
    finally:
        unregister_strategy(_Throwaway.name)
    assert _Throwaway.name not in STRATEGIES


def test_a_strategy_registered_at_run_time_shows_its_display_name_in_table_and_cards(throwaway, tmp_path,
                                                                                      tiny_ds_path):
    cfg = load_config(None, {"data": {"dataset": tiny_ds_path, "num_classes": 4},
                             "fedavg": {"rounds": 1, "batch_size": 16},
                             "pft": {"strategies": ["ft", "throwaway_ft"], "epochs": 2, "batch_size": 16},
                             "run": {"output_dir": str(tmp_path / "out"), "distortion": False}})
    result = run(cfg)
    out = result.output_dir
    assert "| Throwaway FT |" in result.markdown
    assert "| Throwaway FT |" in (out / "summary.md").read_text()
    assert set(result.results.strategy) == {"global_model", "ft", "throwaway_ft"}
    for folder in (out / "clients" / "throwaway_ft" / "a", out / "hub" / "model" / "clients" / "throwaway_ft" / "a"):
        card = ModelCard.load(folder / "README.md")
        assert "Throwaway FT" in card.text, folder
    root_card = ModelCard.load(out / "hub" / "model" / "README.md").text
    assert "| Throwaway FT |" in root_card  # the summary table inside the global model's card


def _subclass(**attrs) -> type:
    body = {"name": "bad_one", "display_name": "Bad", "description": "d", "export_kind": "full",
            "phases": lambda self: []}
    body.update(attrs)
    return type("Bad", (Strategy,), {k: v for k, v in body.items() if v is not None})


@pytest.mark.parametrize("attrs, message", [
    ({"display_name": None}, "display_name"),
    ({"display_name": "  "}, "display_name"),
    ({"name": None}, "'name'"),
    ({"description": None}, "description"),
    ({"export_kind": "weights"}, "export_kind='weights' is not allowed; choose one of \\['full', 'adapter'\\]"),
])
def test_registration_rejects_a_strategy_that_does_not_describe_itself(attrs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        register_strategy(_subclass(**attrs))
    assert "bad_one" not in STRATEGIES


def test_a_subclass_must_name_itself_not_show_its_parents_name():
    child = type("Child", (LPFT,), {"name": "lp_ft_child"})  # inherits LP-FT's display name: refused
    with pytest.raises(TypeError, match="display_name"):
        register_strategy(child)
    assert "lp_ft_child" not in STRATEGIES


def test_every_registered_strategy_describes_itself():
    for name, cls in STRATEGIES.items():
        assert cls.name == name and cls.display_name and cls.export_kind in ("full", "adapter")
    assert STRATEGIES["lora"].export_kind == "adapter" and STRATEGIES["lp_lora"].display_name == "LP-LoRA"


def test_hub_format_follows_the_phases():
    """What `hf-lpft strategies` says the Hub folder holds comes from the phases, not from a list of names."""
    hub = {name: cls().hub_format() for name, cls in STRATEGIES.items()}
    assert hub["lp"] == "head" and hub["ft"] == "full" and hub["lp_ft"] == "full" and hub["lora"] == "peft_adapter"
    frozen_probe = type("_HeadOnly", (_Throwaway,), {"phases": lambda self: [Phase("p", "head", 1, 0.1, bn="frozen")]})
    assert frozen_probe().hub_format() == "head" and _Throwaway().hub_format() == "full"


def test_listing_strategies_imports_neither_peft_nor_transformers():
    """`hf-lpft strategies` stays quick: peft (and with it transformers, ~3 s) is imported only where LoRA uses it."""
    import os
    import subprocess
    import sys

    code = ("import sys; from hf_lpft.cli import main; assert main(['strategies']) == 0; "
            "print(sorted(m for m in ('peft', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(),
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Hub folder: head only" in done.stdout and done.stdout.strip().endswith("[]")
