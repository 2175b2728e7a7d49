"""LSS FT: Local Superior Soups, a soup of interpolated models grown around the global model.

Chen et al., "A Closer Look at Personalized Fine-Tuning in Heterogeneous Federated Learning",
arXiv 2511.12695 (Table 2, "LSS FT"); M. Chen et al., "Local Superior Soups: A Catalyst for Model
Merging in Cross-Silo Federated Learning", NeurIPS 2024, arXiv 2410.23660 (code: ubc-tea/Local-Superior-Soups).

The procedure follows the LSS code (``clientlocalsuperiorsoups.py``, ``superior_soups.py``):

1. **anchor phase**: vertex 0 fine-tunes from θ_G with cross-entropy + ``aff * ||θ - θ_G||²``.
2. **vertex phases** (``n_vertices - 1`` of them): the trained vertices are frozen and a new vertex starts
   at their mean. Every step samples convex weights α ~ Dirichlet(1, ..., 1) (normalised exponentials,
   as in the code), computes the loss of the interpolated model Σ α_j θ_j and adds
   ``aff * ||θ_new - θ_G||² - div * V²``, where V² is the squared volume of the simplex spanned by all
   vertices (the code's Cayley-Menger ``total_volume``; for two vertices it is their squared distance).
   Only the new vertex trains.
3. **finalize**: the uniform average of all vertices.

Defaults are the code's: ``n_verts=2`` added vertices (so ``n_vertices=3`` here, which counts vertex 0),
``aff_coeff=div_coeff=1e-3``; each added vertex trains ``epochs // 8`` epochs (the code's
``local_steps // 8``, at least 1) and vertex 0 takes the rest of the shared budget, so LSS FT costs about
one FT run. Where this implementation chooses differently from the code:

- the epochs of the added vertices come out of the shared budget (the code trains vertex 0 for the
  whole ``local_steps`` and the added vertices on top), so every method is compared at equal epochs;
- one interpolation sample per step (the code adds the losses of ``n_soups_sampling=2`` samples); the
  loop makes one forward pass a step;
- the run's optimizer (SGD by default) steps every batch (the code: Adam, 15-batch gradient accumulation);
- the simplex volume is computed as a Gram determinant (same value as Cayley-Menger, no ``abs``);
- the α sequence is seeded from (client id, phase, a checksum of θ_G), because strategies do not see
  the run seed; it is reproducible and independent of processing order.

BatchNorm: as in the code, the running statistics are *not* per vertex: one set (the trained vertex's)
is shared and updated by every interpolated forward pass in train mode, so it tracks the statistics of
models inside the simplex, whose centre is the final average. The final model keeps that set.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from hf_lpft.config import ConfigError
from hf_lpft.strategies.base import Strategy, StrategyConfig, check_bn, register_strategy
from hf_lpft.train.averaging import average_state_dicts
from hf_lpft.train.loop import derive_seed
from hf_lpft.train.phase import Phase


@dataclass
class LSSConfig(StrategyConfig):
    n_vertices: int = field(default=3, metadata={"help": (
        "Vertices of the soup, vertex 0 included (the LSS code's n_verts=2 adds 2 to vertex 0).")})
    aff: float = field(default=1e-3, metadata={"help": (
        "Affinity weight: squared distance of the trained vertex to the global model θ_G.")})
    div: float = field(default=1e-3, metadata={"help": (
        "Diversity weight: squared simplex volume of the vertices, maximised.")})
    vertex_epochs: int | None = field(default=None, metadata={"help": (
        "Epochs of each added vertex; None = max(1, epochs // 8) as in the LSS code. Vertex 0 gets the rest of the "
        "budget.")})
    bn: str = field(default="train", metadata={"help": (
        "BatchNorm statistics while training: train (one shared set) or frozen.")})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_vertices < 2:
            raise ConfigError(f"lss_ft.n_vertices={self.n_vertices!r} must be >= 2 (a soup needs two vertices)")
        for name in ("aff", "div"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"lss_ft.{name}={getattr(self, name)!r} must be >= 0")
        if self.vertex_epochs is not None and self.vertex_epochs < 1:
            raise ConfigError(f"lss_ft.vertex_epochs={self.vertex_epochs!r} must be >= 1 (or None for epochs // 8)")
        check_bn("lss_ft.bn", self.bn)


def squared_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """||a - b||² over lists of matching tensors."""
    return sum(((x - y) ** 2).sum() for x, y in zip(a, b))


def simplex_volume_sq(d2: torch.Tensor) -> torch.Tensor:
    """Squared volume of the simplex with pairwise squared distances ``d2`` (n x n).

    Gram form: with edges e_i = v_i - v_0, G_ij = e_i·e_j = (d_0i + d_0j - d_ij) / 2 and
    V² = det(G) / ((n-1)!)². Equal to the Cayley-Menger form of the LSS code, and its gradient stays
    finite when the simplex is degenerate (a new vertex starts at the centre).
    """
    n = d2.shape[0]
    gram = (d2[0, 1:, None] + d2[0, None, 1:] - d2[1:, 1:]) / 2
    return torch.linalg.det(gram) / math.factorial(n - 1) ** 2


def pairwise_squared_distances(vertices: list[list[torch.Tensor]]) -> torch.Tensor:
    """n x n matrix of ||v_i - v_j||² (differentiable through any vertex that requires grad)."""
    n = len(vertices)
    rows = [[squared_distance(vertices[i], vertices[j]) if i != j else vertices[0][0].new_zeros(())
             for j in range(n)] for i in range(n)]
    return torch.stack([torch.stack(r) for r in rows])


def dirichlet_weights(n: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform weights on the simplex: normalised exponentials, as the LSS code samples them."""
    exps = -torch.rand(n, generator=generator).clamp_min(1e-12).log()
    return exps / exps.sum()


class _Snapshot(nn.Module):
    """Frozen copies of a model's parameters, kept as buffers (they move with ``.to`` but never train)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        for i, p in enumerate(model.parameters()):
            self.register_buffer(f"p{i}", p.detach().clone())

    def tensors(self) -> list[torch.Tensor]:
        return list(self.buffers())


class VertexSoup(nn.Module):
    """The model LSS trains: one trainable vertex (a SplitModel), frozen vertices, and θ_G.

    Only ``active`` holds parameters, so the ``all`` selector trains exactly the current vertex, and
    ``freeze.head_module`` finds ``active.head`` (the only SplitModel inside). Frozen vertices are
    pre-allocated slots, filled one per vertex phase, so parameter and buffer names never change.
    """

    def __init__(self, model: nn.Module, n_vertices: int):
        super().__init__()
        self.active = model  # registered first; its BatchNorm buffers are the soup's shared statistics
        self.anchor = _Snapshot(model)  # θ_G, the affinity term's start point
        self.fixed = nn.ModuleList(_Snapshot(model) for _ in range(n_vertices - 1))
        self.n_fixed = 0
        self.generator = torch.Generator()

    def vertices(self) -> list[list[torch.Tensor]]:
        """Parameter lists of every vertex so far, the trainable one last."""
        return [f.tensors() for f in self.fixed[:self.n_fixed]] + [list(self.active.parameters())]

    @torch.no_grad()
    def add_vertex(self) -> None:
        """Freeze the trained vertex; start a new one at the mean of the frozen ones (as the LSS code does)."""
        if self.n_fixed >= len(self.fixed):
            raise RuntimeError(f"all {len(self.fixed) + 1} vertices are already in use")
        for slot, p in zip(self.fixed[self.n_fixed].tensors(), self.active.parameters()):
            slot.copy_(p)
        self.n_fixed += 1
        frozen = [f.tensors() for f in self.fixed[:self.n_fixed]]
        for i, p in enumerate(self.active.parameters()):
            p.copy_(torch.stack([v[i] for v in frozen]).mean(0))

    def interpolate(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameters of the model Σ_j weights_j θ_j (gradients reach the trainable vertex only)."""
        names = [n for n, _ in self.active.named_parameters()]
        verts = self.vertices()
        return {name: sum(w * v[i] for w, v in zip(weights, verts)) for i, name in enumerate(names)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_fixed == 0:
            return self.active(x)
        n = self.n_fixed + 1
        # Training samples a point of the simplex; evaluation uses its centre, the model finalize returns.
        weights = dirichlet_weights(n, self.generator) if self.training else torch.full((n,), 1.0 / n)
        device = next(self.active.parameters()).device  # x may be a dict of tensors (tokenized text)
        return functional_call(self.active, self.interpolate(weights.to(device)), (x,))

    @torch.no_grad()
    def average(self) -> nn.Module:
        """The trainable vertex's module holding the uniform average of all vertices (shared BN buffers kept)."""
        names = [n for n, _ in self.active.named_parameters()]
        avg = average_state_dicts([dict(zip(names, v)) for v in self.vertices()])
        for name, p in self.active.named_parameters():
            p.copy_(avg[name])
        return self.active

    def checksum(self) -> str:
        """A fingerprint of θ_G, to seed the α sequence per global model without the run seed."""
        return f"{sum(float(t.double().sum()) for t in self.anchor.tensors()):.12e}"


@register_strategy
class LSSFT(Strategy):
    """Local Superior Soups: grow a simplex of vertices around θ_G, train on sampled interpolations, average."""

    name = "lss_ft"
    display_name = "LSS FT"
    export_kind = "full"
    description = ("LSS FT: vertices trained through random interpolations, with affinity to θ_G and diversity; "
                   "averaged.")
    config_cls = LSSConfig

    def vertex_epochs(self) -> int:
        ve = self.config.vertex_epochs
        return ve if ve is not None else max(1, self.budget.epochs // 8)

    def phases(self) -> list[Phase]:
        ve, added = self.vertex_epochs(), self.config.n_vertices - 1
        anchor = self.budget.epochs - added * ve
        if anchor < 1:
            raise ConfigError(f"lss_ft: n_vertices={self.config.n_vertices} with vertex_epochs={ve} leaves "
                              f"{anchor} epochs of the budget pft.epochs={self.budget.epochs} for vertex 0; "
                              "need >= 1")
        lr, bn = self.budget.lr, self.config.bn
        return [Phase("anchor", "all", anchor, lr, bn=bn)] + [
            Phase(f"vertex_{k}", "all", ve, lr, bn=bn) for k in range(1, added + 1)]

    def prepare(self, model: nn.Module) -> nn.Module:
        return VertexSoup(model, self.config.n_vertices)

    def on_phase_start(self, model: VertexSoup, phase: Phase, data) -> None:
        if phase.name.startswith("vertex_"):
            model.add_vertex()
        model.generator.manual_seed(derive_seed("lss", data.client_id, phase.name, model.checksum()))

    def extra_loss(self, model: VertexSoup, phase: Phase):
        active = list(model.active.parameters())
        loss = self.config.aff * squared_distance(active, model.anchor.tensors())
        if model.n_fixed == 0 or self.config.div == 0:
            return loss
        return loss - self.config.div * simplex_volume_sq(pairwise_squared_distances(model.vertices()))

    @torch.no_grad()
    def eval_view(self, model: VertexSoup) -> nn.Module:
        """Epoch curves follow the soup so far: a copy holding the average of the vertices up to now."""
        view = copy.deepcopy(model.active)
        names = [n for n, _ in view.named_parameters()]
        avg = average_state_dicts([dict(zip(names, v)) for v in model.vertices()])
        for name, p in view.named_parameters():
            p.copy_(avg[name])
        return view

    def finalize(self, models: list[nn.Module]) -> nn.Module:
        return models[0].average()


__all__ = ["LSSConfig", "LSSFT", "VertexSoup", "simplex_volume_sq"]
