"""FedAvg (McMahan et al. 2017): example-weighted averaging and the round driver.

The maths are pure functions on state dicts. Only floating-point tensors are averaged; integer
buffers (e.g. BatchNorm's ``num_batches_tracked``) are taken from the first client, because an average
of counters is meaningless. Client updates are accumulated as weighted sums so memory does not grow with
the number of clients, and so the sums can later be all-reduced across processes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from hf_lpft.data.tensors import ClientData
from hf_lpft.train.loop import OptimSettings, accuracy, derive_seed, train_phase
from hf_lpft.train.phase import Phase

logger = logging.getLogger(__name__)


def accumulate(acc: dict | None, state: dict, weight: float) -> dict:
    """Add ``weight * state`` to the running sums (float tensors); keep the first non-float tensor."""
    if acc is None:
        return {k: v.detach().double() * weight if v.is_floating_point() else v.detach().clone()
                for k, v in state.items()}
    for k, v in state.items():
        if v.is_floating_point():
            acc[k] += v.detach().double() * weight
    return acc


def finish(acc: dict, total_weight: float, like: dict) -> dict:
    """Divide the sums by the total weight and cast back to the dtypes of ``like``."""
    return {k: (v / total_weight).to(like[k].dtype) if like[k].is_floating_point() else v
            for k, v in acc.items()}


def fedavg_weights(states: list[dict], n_examples: list[int]) -> dict:
    """Example-weighted average of client state dicts (FedAvg aggregation).

    Raises:
        ValueError: if the lists differ in length, are empty, or hold no examples.
    """
    if len(states) != len(n_examples) or not states:
        raise ValueError(f"need one example count per state; got {len(states)} states, {len(n_examples)} counts")
    total = float(sum(n_examples))
    if total <= 0:
        raise ValueError(f"n_examples={n_examples!r} sum to {total}; need at least one example")
    acc = None
    for state, n in zip(states, n_examples):
        acc = accumulate(acc, state, float(n))
    return finish(acc, total, states[0])


def sample_clients(n_clients: int, fraction: float, rng: np.random.Generator) -> list[int]:
    """Indices of the clients taking part in a round (at least one)."""
    k = max(1, int(round(fraction * n_clients)))
    return sorted(rng.choice(n_clients, size=k, replace=False).tolist()) if k < n_clients else list(range(n_clients))


def mean_test_accuracy(model: nn.Module, clients: list[ClientData], *, device, batch_size: int = 256) -> float:
    """Unweighted mean over clients of the model's accuracy on each client's test split."""
    return float(np.mean([accuracy(model, c.test_x, c.test_y, batch_size=batch_size, device=device) for c in clients]))


def fedavg_round(model: nn.Module, global_state: dict, clients: list[ClientData], *, rnd: int, phase: Phase,
                 client_fraction: float, settings: OptimSettings, accelerator: Accelerator, seed: int) -> dict:
    """One FedAvg round from ``global_state``; returns the new global state.

    Client sampling and local seeds derive from (seed, round, client), so a round can be re-run (or
    resumed) on its own and gives the same result.
    """
    rng = np.random.default_rng(derive_seed(seed, "fedavg-sampling", rnd))
    acc, total = None, 0.0
    for i in sample_clients(len(clients), client_fraction, rng):
        model.load_state_dict(global_state)  # one model in memory, reset to the global weights
        train_phase(model, phase, clients[i], settings=settings, accelerator=accelerator,
                    seed=derive_seed(seed, "fedavg", rnd, clients[i].client_id))
        acc = accumulate(acc, model.state_dict(), float(clients[i].n_train))
        total += clients[i].n_train
    return finish(acc, total, global_state)


RoundCallback = Callable[[int, dict, list], None]


def run_fedavg(model: nn.Module, clients: list[ClientData], *, rounds: int, local_epochs: int, lr: float,
               client_fraction: float, settings: OptimSettings, accelerator: Accelerator, seed: int,
               eval_every: int = 1, start_round: int = 0, history: list[dict] | None = None,
               on_round_end: RoundCallback | None = None) -> tuple[nn.Module, list[dict]]:
    """Train ``model`` in place with FedAvg; return it and one history row per round.

    Args:
        start_round: Rounds already done (resume); ``model`` must then hold that round's global weights.
        on_round_end: Called as ``(round, global_state, history)`` after every round (e.g. a checkpoint).
    """
    phase = Phase("fedavg_local", "all", local_epochs, lr, bn="train")
    history = list(history or [])
    bar = tqdm(range(start_round, rounds), desc="FedAvg", initial=start_round, total=rounds,
               disable=not accelerator.is_main_process)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    for rnd in bar:
        global_state = fedavg_round(model, global_state, clients, rnd=rnd, phase=phase, client_fraction=client_fraction,
                                    settings=settings, accelerator=accelerator, seed=seed)
        model.load_state_dict(global_state)
        row = {"round": rnd + 1}
        if eval_every and ((rnd + 1) % eval_every == 0 or rnd + 1 == rounds):
            row["global_test_acc"] = mean_test_accuracy(model, clients, device=accelerator.device)
            bar.set_postfix(acc=f"{row['global_test_acc']:.3f}")
        history.append(row)
        if on_round_end is not None:
            on_round_end(rnd + 1, global_state, history)
    model.eval()
    return model, history
