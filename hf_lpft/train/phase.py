"""Phase: the vocabulary strategies speak (what trains, for how long, at which lr, BatchNorm mode)."""

from __future__ import annotations

from dataclasses import dataclass

SELECTORS = ("head", "all", "adapters_and_head", "patterns", "none")
BN_MODES = ("train", "frozen", "reestimate")
SOLVERS = ("sgd", "logreg")


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
        solver: ``sgd`` (the run's optimizer for ``epochs`` epochs) or ``logreg`` (head-only phases: the head
            fitted to convergence as L2-regularised multinomial logistic regression on the frozen backbone's
            eval-mode features, strength chosen from ``l2_grid`` on held-out training data; ``epochs`` then
            only counts towards the budget). With ``logreg``, ``bn`` is ``frozen`` or ``reestimate``
            (statistics re-estimated on the client's data first, then frozen).
        l2_grid: L2 strengths the ``logreg`` solver chooses from (empty = hf_lpft.train.logreg.DEFAULT_L2_GRID).
    """

    name: str
    trainable: str
    epochs: int
    lr: float
    bn: str = "train"
    patterns: tuple[str, ...] = ()
    solver: str = "sgd"
    l2_grid: tuple[float, ...] = ()

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
        if self.solver not in SOLVERS:
            raise ValueError(f"Phase.solver={self.solver!r} is not allowed; choose one of {list(SOLVERS)}")
        if self.solver == "logreg" and (self.trainable != "head" or self.bn == "train"):
            raise ValueError(f"Phase.solver='logreg' fits the head on fixed features: it needs trainable='head' "
                             f"(got {self.trainable!r}) and bn 'frozen' or 'reestimate' (got {self.bn!r})")
        if any(not (v > 0) for v in self.l2_grid):
            raise ValueError(f"Phase.l2_grid={self.l2_grid!r} must hold L2 strengths > 0")
