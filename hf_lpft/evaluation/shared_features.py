"""Evaluate models that share the global backbone from features computed once.

A linear probe (LP) changes only the head: its backbone is θ_G's, bit for bit. Its accuracy on every
client's test split is then ``head(features_G(x))``, and ``features_G`` of all test splits can be computed
once per seed and reused for every such client; evaluating one LP client costs one matrix product per
test split instead of a forward pass through the backbone.

Whether a model shares the backbone is checked on its tensors (every backbone parameter and buffer
equal to θ_G's), not assumed from the strategy's name: a probe with BatchNorm in train mode changes the
running statistics and is evaluated the normal way.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_lpft.data.tensors import ClientData
from hf_lpft.evaluation.distortion import extract_features


class SharedBackbone:
    """θ_G's features on every client's test split (computed on first use) and the models that may use them.

    Args:
        global_model: The SplitModel every personalized model starts from (not modified).
        clients: Whose test splits to evaluate on.
        batch_size: Evaluation batch size (the head is applied in chunks of this size, as ``predict`` does).
    """

    def __init__(self, global_model: nn.Module, clients: list[ClientData], *, batch_size: int,
                 device: torch.device | str = "cpu"):
        self.global_model, self.clients = global_model, clients
        self.batch_size, self.device = batch_size, device
        self._features: list[torch.Tensor] | None = None
        self.reused = 0  # how many models were evaluated from the shared features
        self._parent: tuple[SharedBackbone, list[int]] | None = None

    def subset(self, indices: list[int]) -> SharedBackbone:
        """The same features for the clients at ``indices`` only (a sampled Global), computed once by ``self``."""
        view = SharedBackbone(self.global_model, [self.clients[j] for j in indices], batch_size=self.batch_size,
                              device=self.device)
        view._parent = (self, list(indices))
        return view

    def shares_backbone(self, model: nn.Module) -> bool:
        """True when ``model`` is a SplitModel whose backbone tensors all equal θ_G's."""
        backbone = getattr(model, "backbone", None)
        if type(model) is not type(self.global_model) or not isinstance(backbone, nn.Module):
            return False
        mine, theirs = backbone.state_dict(), self.global_model.backbone.state_dict()
        return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)

    def features(self) -> list[torch.Tensor]:
        """θ_G's head-input features of every client's test split (eval mode), computed once."""
        if self._features is None and self._parent is not None:
            parent, indices = self._parent
            self._features = [parent.features()[j] for j in indices]
        if self._features is None:
            self._features = [extract_features(self.global_model, c.test_x, batch_size=self.batch_size,
                                               device=self.device) for c in self.clients]
        return self._features

    @torch.no_grad()
    def accuracies(self, model: nn.Module) -> list[float] | None:
        """``model``'s accuracy on every client's test split from the shared features, or None when
        ``model`` does not share θ_G's backbone (evaluate it the normal way)."""
        if not self.shares_backbone(model):
            return None
        model.eval()
        head = model.head
        out = []
        for feats, c in zip(self.features(), self.clients):
            if len(c.test_y) == 0:
                out.append(float("nan"))
                continue
            logits = torch.cat([head(f.to(self.device)) for f in feats.split(self.batch_size)])
            out.append((logits.argmax(-1).cpu() == c.test_y).float().mean().item())
        self.reused += 1
        return out
