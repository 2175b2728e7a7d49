"""The parsed form of ``model.backbone``: which library builds the network and from what name.

``timm:<model name>``, ``hf:<model id, folder or installed alias>`` or ``hf-config:<preset or config path>``.
The string is parsed here and nowhere else: the config parses it once (``ModelConfig.spec``) and hands the
:class:`BackboneSpec` down; a string read back from a saved model's ``config.json`` is parsed at that boundary
with :meth:`BackboneSpec.parse`, which also accepts an already parsed spec. Also the form of a Hub repo id
(:data:`REPO_ID`). Standard library only, so that ``config`` (the bottom layer) can use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BACKBONE_PREFIXES = ("timm", "hf", "hf-config")
# A Hub repo id, ``namespace/name`` (checked by the config's hub.* and model.global_model, and by the loader).
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class BackboneSpec:
    """``kind`` (one of :data:`BACKBONE_PREFIXES`) and ``name`` of a backbone; ``str()`` gives the spec back."""

    kind: str
    name: str

    @classmethod
    def parse(cls, value: str | BackboneSpec) -> BackboneSpec:
        """``"hf:x"`` -> ``BackboneSpec("hf", "x")`` (a spec is returned as is); ValueError naming the allowed
        forms otherwise."""
        if isinstance(value, BackboneSpec):
            return value
        kind, _, name = str(value).partition(":")
        if kind not in BACKBONE_PREFIXES or not name:
            raise ValueError(f"backbone={value!r} must look like 'timm:<model name>', 'hf:<model id or path>' or "
                             "'hf-config:<preset or config path>'")
        return cls(kind, name)

    @classmethod
    def is_spec(cls, value: object) -> bool:
        """Whether ``value`` is a backbone spec (e.g. the ``backbone`` entry of an hf_lpft model's config.json)."""
        try:
            cls.parse(value)  # type: ignore[arg-type]
        except ValueError:
            return False
        return True

    @property
    def is_timm(self) -> bool:
        return self.kind == "timm"

    @property
    def is_transformers(self) -> bool:
        """Built by transformers (``hf:`` or ``hf-config:``)."""
        return self.kind != "timm"

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"
