"""One client's local round under a general-FL algorithm: the same code on both engines (builtin and Flower)."""

from __future__ import annotations

from dataclasses import dataclass

from accelerate import Accelerator
from torch import nn

from hf_lpft.algorithms.base import GeneralFL, local_steps
from hf_lpft.data.tensors import ClientData
from hf_lpft.train.loop import train_phase
from hf_lpft.train.optim import OptimSettings
from hf_lpft.train.phase import Phase


@dataclass
class ClientUpdate:
    """What a client's local round yields: its trained weights, its upload (summed by the server), its new own
    state (None: none kept) and the training record."""

    state: dict
    upload: dict
    client_state: dict | None
    record: dict


def client_update(algorithm: GeneralFL, model: nn.Module, client: ClientData, *, phase: Phase,
                  settings: OptimSettings, accelerator: Accelerator, seed: int, server_state: dict,
                  client_state: dict) -> ClientUpdate:
    """Train ``model`` (holding the weights the client starts from) for one ``phase`` with the algorithm's
    local term, then let the algorithm say what the client sends and keeps."""
    needs_start = type(algorithm).client_result is not GeneralFL.client_result
    start = {n: p.detach().clone() for n, p in model.named_parameters()} if needs_start else {}
    extra = algorithm.local_objective(model, server_state=server_state, client_state=client_state)
    record = train_phase(model, phase, client, settings=settings, accelerator=accelerator, seed=seed,
                         extra_loss=extra)
    trained = model.state_dict()
    upload, kept = algorithm.client_result(start=start, trained=trained, server_state=server_state,
                                           client_state=client_state,
                                           steps=local_steps(client.n_train, settings.batch_size, phase.epochs),
                                           lr=phase.lr)
    return ClientUpdate(trained, upload, kept, record)
