"""FedAvg on Apple's pfl-research simulator (``pfl``, PyTorch backend) on bench_scale's clients and model.

Run by ``bench_scale.py`` as a subprocess of a separate venv (pfl 0.6 pins attrs<24 and absl-py<2, older than
the main venv's; see benchmarks/README.md, "Scale"):

    /work/benchvenv/bin/python benchmarks/pfl_fedavg.py --n 20 --rounds 2 --cohort 20

The same work as ``run_fedavg``: the clients of ``bench_global_estimate.build_clients`` (Dirichlet over pooled
digits5, at most ``--cap`` examples), their train images converted to float once as the built-in engine does,
the same ``build_model`` (timm ``test_resnet`` + head, seed 0, channels_last), ``--cohort`` clients a round, one
local epoch of SGD (lr, momentum, batch size as hf_lpft's FedAvg defaults) and an example-weighted average
(``WeightByDatapoints``; server SGD with lr 1 applies the mean difference, i.e. plain FedAvg). No evaluation.
Differences: pfl samples users with its own ``random`` sampler, iterates a user's data in order (no shuffle),
and averages only trainable parameters (BatchNorm running statistics are not averaged).
Prints one JSON line: total and per-round seconds of ``FederatedAveraging.run`` and this process's peak RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time

import numpy as np
import torch
import torch.nn.functional as F
from bench_global_estimate import build_clients
from pfl.aggregate.simulate import SimulatedBackend
from pfl.aggregate.weighting import WeightByDatapoints
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.callback.base import TrainingProcessCallback
from pfl.data.dataset import Dataset
from pfl.data.federated_dataset import FederatedDataset
from pfl.data.sampling import get_user_sampler
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
from pfl.metrics import Metrics, Weighted
from pfl.model.pytorch import PyTorchModel
from torch import nn

from hf_lpft.federated.fedavg import with_float_inputs
from hf_lpft.models.backbone import build_model
from hf_lpft.speed import use_memory_format


class PflModule(nn.Module):
    """hf_lpft's SplitModel with the ``loss`` and ``metrics`` methods pfl's PyTorchModel calls."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)

    def loss(self, x, y, eval=False):  # noqa: A002 (pfl's keyword)
        self.eval() if eval else self.train()
        return F.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x, y, eval=False):  # noqa: A002
        self.eval() if eval else self.train()
        logits = self(x)
        return {"loss": Weighted(F.cross_entropy(logits, y, reduction="sum").item(), len(y)),
                "accuracy": Weighted((logits.argmax(1) == y).sum().item(), len(y))}


class NoEvaluation(FederatedAveraging):
    """FedAvg that never evaluates (pfl evaluates at iteration 0 whatever the frequency), as ``eval_every 0``."""

    def get_next_central_contexts(self, *args, **kwargs):
        contexts, model, metrics = super().get_next_central_contexts(*args, **kwargs)
        if contexts is not None:
            contexts = tuple(dataclasses.replace(c, do_evaluation=False) for c in contexts)
        return contexts, model, metrics


class RoundStamps(TrainingProcessCallback):
    """perf_counter at the end of every central iteration."""

    def __init__(self):
        self.stamps: list[float] = []

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        self.stamps.append(time.perf_counter())
        return False, Metrics()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, kind, default in [("n", int, 20), ("rounds", int, 3), ("cohort", int, 20), ("cap", int, 12),
                                ("min_size", int, 4),
                                ("lr", float, 0.05), ("momentum", float, 0.9), ("batch_size", int, 64),
                                ("local_epochs", int, 1), ("threads", int, 1), ("seed", int, 0)]:
        ap.add_argument(f"--{name}", type=kind, default=default)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    clients = with_float_inputs(build_clients(args.n, args))
    data = {i: Dataset((c.train_x.contiguous(memory_format=torch.channels_last), c.train_y), user_id=str(i))
            for i, c in enumerate(clients)}
    federated = FederatedDataset(lambda uid: data[uid], get_user_sampler("random", list(data)))
    net = PflModule(use_memory_format(build_model("timm:test_resnet", num_classes=10, image_size=32, seed=0), "auto"))
    model = PyTorchModel(net, local_optimizer_create=lambda params, lr: torch.optim.SGD(
        params, lr=lr, momentum=args.momentum), central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    backend = SimulatedBackend(training_data=federated, val_data=federated, postprocessors=[WeightByDatapoints()])
    stamps = RoundStamps()
    t0 = time.perf_counter()
    NoEvaluation().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=args.rounds, evaluation_frequency=args.rounds + 1,
                                           train_cohort_size=args.cohort, val_cohort_size=0),
        backend=backend, model=model,
        model_train_params=NNTrainHyperParams(local_num_epochs=args.local_epochs, local_learning_rate=args.lr,
                                              local_batch_size=args.batch_size),
        model_eval_params=NNEvalHyperParams(local_batch_size=256), callbacks=[stamps])
    ends = [s - t0 for s in stamps.stamps]
    print(json.dumps({"seconds": time.perf_counter() - t0, "round_ends": ends,
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
