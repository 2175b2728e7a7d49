"""Federated feature distortion and linear CKA between the global model θ_G and a personalized model θ_c.

Chen et al., "A Closer Look at Personalized Fine-Tuning in Heterogeneous Federated Learning",
arXiv 2511.12695 (Figure 3a): Δ_c = mean over samples x of ‖f(θ_G; x) − f(θ_c; x)‖₂,
with f the features at the head's input (``SplitModel.features``, timm's pre-logits). The paper
measures Δ on client c's own samples; we evaluate it on the client's own *test* split
(``distortion_local``) and, to see how far the change reaches, averaged over the other clients' test
splits (``distortion_global``, the same own-split exclusion as the Global accuracy).

Linear CKA (Kornblith et al., ICML 2019, arXiv 1905.00414) compares the two feature spaces up to an
orthogonal transform and isotropic scaling: 1 = the same geometry. Δ is in the units of the features
(not normalised), so compare Δ across strategies of one run, not across backbones.

The pure maths (``mean_feature_distance``, ``linear_cka``, ``distortion_by_client``) take tensors; the
model helpers run the models in eval mode (BatchNorm running statistics, no dropout).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hf_lpft.data.tensors import iterate_batches
from hf_lpft.evaluation.metrics import local_global


def mean_feature_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the Euclidean distance between ``a[k]`` and ``b[k]`` (Δ of arXiv 2511.12695, Figure 3a).

    Inputs of shape (n, ...) are flattened to (n, d). NaN for n = 0.
    """
    if a.shape != b.shape:
        raise ValueError(f"feature shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.shape[0] == 0:
        return float("nan")
    diff = a.reshape(len(a), -1).double() - b.reshape(len(b), -1).double()
    return float(diff.norm(dim=1).mean())


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two representations of the same n samples, shapes (n, d1) and (n, d2).

    CKA = ‖Yᵀ X‖²_F / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F) on column-centred X, Y; computed through the n x n Gram
    matrices when n < d (same value, less memory). NaN when n < 2 or a representation is constant.
    """
    if len(x) != len(y):
        raise ValueError(f"need the same samples: {len(x)} vs {len(y)} rows")
    x, y = x.reshape(len(x), -1).double(), y.reshape(len(y), -1).double()
    if len(x) < 2:
        return float("nan")
    x, y = x - x.mean(0), y - y.mean(0)
    if len(x) < max(x.shape[1], y.shape[1]):
        k, l_ = x @ x.T, y @ y.T
        num, den = (k * l_).sum(), k.norm() * l_.norm()
    else:
        num, den = (y.T @ x).norm() ** 2, (x.T @ x).norm() * (y.T @ y).norm()
    return float(num / den) if den > 0 else float("nan")


@torch.no_grad()
def features_and_predictions(model: nn.Module, x: torch.Tensor, *, batch_size: int = 256,
                             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Head-input features (float32, CPU) and predicted classes of ``model`` on ``x``, in one eval pass.

    The prediction is ``head(features)``, i.e. exactly ``SplitModel.forward``; works for peft-wrapped
    SplitModels too (attribute look-ups fall through to the base model).
    """
    model.eval()
    feats, preds = [], []
    for xb, _ in iterate_batches(x, torch.zeros(len(x)), batch_size=batch_size, shuffle=False, device=device):
        f = model.features(xb)
        feats.append(f.float().cpu())
        preds.append(model.head(f).argmax(-1).cpu())
    if not feats:
        return torch.empty(0, model.head.in_features), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(preds)


def extract_features(model: nn.Module, x: torch.Tensor, *, batch_size: int = 256,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Head-input features of ``model`` on ``x`` (eval mode)."""
    return features_and_predictions(model, x, batch_size=batch_size, device=device)[0]


def feature_distortion(reference: nn.Module, model: nn.Module, x: torch.Tensor, *, batch_size: int = 256,
                       device: torch.device | str = "cpu") -> float:
    """Δ between ``reference`` (θ_G) and ``model`` (θ_c) on inputs ``x``."""
    kw = {"batch_size": batch_size, "device": device}
    return mean_feature_distance(extract_features(reference, x, **kw), extract_features(model, x, **kw))


def distortion_by_client(reference_feats: Sequence[torch.Tensor], feats: Sequence[torch.Tensor], own: int) -> dict:
    """Δ and CKA on the own client's test split (``*_local``) and averaged over the others (``*_global``).

    Args:
        reference_feats: θ_G's features on every client's test split, in client order.
        feats: The personalized model's features on the same inputs.
        own: Index of the client whose model this is.
    """
    if len(reference_feats) != len(feats):
        raise ValueError(f"need features on every client: {len(reference_feats)} vs {len(feats)}")
    dist = [mean_feature_distance(r, f) for r, f in zip(reference_feats, feats)]
    cka = [linear_cka(r, f) for r, f in zip(reference_feats, feats)]
    d_local, d_global = local_global(dist, own)  # own split, then the mean over the others
    c_local, c_global = local_global(cka, own)
    return {"distortion_local": d_local, "distortion_global": d_global, "cka_local": c_local, "cka_global": c_global}


def default_blocks(model: nn.Module) -> list[str]:
    """Module names of the backbone's blocks: timm's ``feature_info`` when present, else its children with weights."""
    backbone = getattr(model, "backbone", model)
    info = getattr(backbone, "feature_info", None)
    names = [f["module"] for f in info] if info else \
        [n for n, m in backbone.named_children() if any(True for _ in m.parameters())]
    return [f"backbone.{n}" if backbone is not model else n for n in names]


@torch.no_grad()
def block_features(model: nn.Module, x: torch.Tensor, blocks: Sequence[str], *, batch_size: int = 256,
                   device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Outputs of the named modules (flattened per sample), captured with forward hooks in eval mode."""
    modules = dict(model.named_modules())
    unknown = [b for b in blocks if b not in modules]
    if unknown:
        raise KeyError(f"modules {unknown} not found; examples of names: {list(modules)[1:7]}")
    store: dict[str, list[torch.Tensor]] = {b: [] for b in blocks}

    def hook_for(name):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            store[name].append(out.detach().float().reshape(len(out), -1).cpu())
        return hook

    handles = [modules[b].register_forward_hook(hook_for(b)) for b in blocks]
    try:
        model.eval()
        for xb, _ in iterate_batches(x, torch.zeros(len(x)), batch_size=batch_size, shuffle=False, device=device):
            model(xb)
    finally:
        for h in handles:
            h.remove()
    return {b: torch.cat(v) for b, v in store.items()}


def block_distortion(reference: nn.Module, model: nn.Module, x: torch.Tensor, *, blocks: Sequence[str] | None = None,
                     batch_size: int = 256, device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """Per-block Δ and linear CKA between ``reference`` and ``model`` on ``x``.

    Args:
        blocks: Module names shared by both models; default :func:`default_blocks` of ``reference``.
            A peft-wrapped model names its modules differently: pass its unwrapped base model.

    Returns:
        ``{block: {"distortion": Δ, "cka": CKA}}`` in block order.
    """
    blocks = list(blocks) if blocks is not None else default_blocks(reference)
    kw = {"batch_size": batch_size, "device": device}
    ref, own = block_features(reference, x, blocks, **kw), block_features(model, x, blocks, **kw)
    return {b: {"distortion": mean_feature_distance(ref[b], own[b]), "cka": linear_cka(ref[b], own[b])} for b in blocks}

