"""Phase: the vocabulary strategies speak (what trains, for how long, at which lr, BatchNorm mode)."""

from __future__ import annotations

from dataclasses import dataclass

SELECTORS = ("head", "all", "adapters_and_head", "patterns", "none")
BN_MODES = ("train", "frozen", "reestimate")


@dataclass(frozen=True)
class Phase:
    """One stretch of training with a fixed set of trainable parameters.

    Args:
        name: Label for logs and records ("probe", "finetune", ...).
        trainable: ``head`` (our linear head), ``all``, ``adapters_and_head`` (peft adapters + head) or
            ``patterns`` (parameters whose name matches one of ``patterns``, plus the head), or ``none``
            (no parameter trains and no optimizer is made: the phase only runs forward passes, which
            update the BatchNorm statistics unless ``bn="frozen"``).
        epochs: Epochs of this phase (0 allowed: the phase is skipped).
        lr: Learning rate (unused when ``trainable="none"``).
        bn: ``train`` updates BatchNorm running statistics in train mode (exponential average with the
            layer's momentum, starting from the current statistics); ``frozen`` keeps them (eval mode);
            ``reestimate`` resets them when the phase starts and accumulates a cumulative average over
            every batch of the phase (``momentum=None``), then restores each layer's momentum.
        patterns: Regular expressions over parameter names, for ``trainable="patterns"``.
    """

    name: str
    trainable: str
    epochs: int
    lr: float
    bn: str = "train"
    patterns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.trainable not in SELECTORS:
            raise ValueError(f"Phase.trainable={self.trainable!r} is not allowed; choose one of {list(SELECTORS)}")
        if self.bn not in BN_MODES:
            raise ValueError(f"Phase.bn={self.bn!r} is not allowed; choose one of {list(BN_MODES)}")
        if self.epochs < 0:
            raise ValueError(f"Phase.epochs={self.epochs!r} must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"Phase.lr={self.lr!r} must be > 0")
        if self.trainable == "patterns" and not self.patterns:
            raise ValueError("Phase.trainable='patterns' needs at least one pattern")
