"""The built-in engine's round driver, and FedAvg's (McMahan et al. 2017) example-weighted averaging.

A round runs any registered general-FL algorithm (``hf_lpft.algorithms``; FedAvg by default): its
local term in each client's training, its client weights and summed uploads, its aggregation.

The maths are the pure functions on state dicts of ``hf_lpft.train.averaging`` (shared with the soups):
only floating-point tensors are averaged; integer buffers (e.g. BatchNorm's ``num_batches_tracked``) are
taken from the first client, because an average of counters is meaningless. Client updates are accumulated
as weighted sums so memory does not grow with the number of clients, and so the sums can be all-reduced
across processes.

Several processes (``accelerate launch`` / ``torchrun``): the sampled clients of a round are dealt out by
position, the k-th sampled client to process ``k % num_processes``; each process trains its clients and
adds their example-weighted float64 sums; one all-reduce sums the sums and the weights; integer buffers
come from the first sampled client, which process 0 always owns (broadcast). Sampling and every client's
seed derive from (seed, round, client), never from the rank, so 1 and N processes train the same local
models; only the order of the float64 additions differs (~1e-16 relative), which after the cast back to
float32 leaves the global weights bit-identical except, rarely, a 1-ulp (~6e-8 relative) difference.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, gather_object, reduce
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from hf_lpft._faults import fault_point
from hf_lpft.algorithms.base import FLState, GeneralFL, WeightedSums
from hf_lpft.algorithms.fedavg import FedAvg
from hf_lpft.data.tensors import ClientData, to_float
from hf_lpft.federated.local import client_update
from hf_lpft.train.averaging import accumulate, average_state_dicts
from hf_lpft.train.loop import OptimSettings, accuracy, derive_seed
from hf_lpft.train.optim import round_lr
from hf_lpft.train.phase import Phase

logger = logging.getLogger(__name__)


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
    return average_state_dicts(states, [float(n) for n in n_examples])


def sample_clients(n_clients: int, fraction: float, rng: np.random.Generator) -> list[int]:
    """Indices of the clients taking part in a round (at least one)."""
    k = max(1, int(round(fraction * n_clients)))
    return sorted(rng.choice(n_clients, size=k, replace=False).tolist()) if k < n_clients else list(range(n_clients))


def my_share(items: list, accelerator: Accelerator) -> list:
    """The items this process handles: the k-th item goes to process ``k % num_processes``."""
    return items[accelerator.process_index::accelerator.num_processes]


def all_reduce_sums(acc: dict | None, total: float, like: dict, accelerator: Accelerator) -> tuple[dict, float]:
    """Sum every process's float64 sums and weight in one all-reduce; integer tensors from process 0.

    A process that trained no client this round (more processes than sampled clients) adds zeros.
    """
    if accelerator.num_processes == 1:
        return acc, total
    if acc is None:
        acc = {k: torch.zeros(v.shape, dtype=torch.float64, device=v.device) if v.is_floating_point() else v.clone()
               for k, v in like.items()}
    floats = [k for k, v in acc.items() if v.is_floating_point()]
    device = acc[floats[0]].device if floats else accelerator.device
    flat = torch.cat([acc[k].reshape(-1).to(device) for k in floats]
                     + [torch.tensor([total], dtype=torch.float64, device=device)])
    flat = reduce(flat, reduction="sum")
    sums, offset = {}, 0
    for k in floats:
        sums[k] = flat[offset: offset + acc[k].numel()].view(acc[k].shape)
        offset += acc[k].numel()
    ints = {k: v.contiguous() for k, v in acc.items() if not v.is_floating_point()}
    if ints:
        ints = broadcast(ints, from_process=0)  # process 0 owns the first sampled client
    return {k: sums[k] if k in sums else ints[k] for k in acc}, float(flat[-1].item())


def share_client_bn(client_bn: dict, trained: list[str], accelerator: Accelerator) -> None:
    """FedBN with several processes: every process gets the BatchNorm tensors of the clients others trained."""
    if accelerator.num_processes == 1:
        return
    mine = [(cid, {k: v.cpu() for k, v in client_bn[cid].items()}) for cid in trained]
    for cid, state in gather_object(mine):
        client_bn[cid] = {k: v.to(accelerator.device) for k, v in state.items()}


def bn_keys(model: nn.Module) -> list[str]:
    """State-dict keys of every BatchNorm layer: affine weight/bias, running statistics, batch counter."""
    return [f"{name}.{key}" for name, m in model.named_modules() if isinstance(m, _BatchNorm)
            for key in m.state_dict()]


def load_client_bn(model: nn.Module, client_bn: dict | None, client_id: str) -> nn.Module:
    """Load client ``client_id``'s own BatchNorm tensors (FedBN) into ``model`` if it has any; the rest stays."""
    if client_bn and client_id in client_bn:
        device = next(model.parameters()).device
        model.load_state_dict({k: v.to(device) for k, v in client_bn[client_id].items()}, strict=False)
    return model


def with_client_bn(model: nn.Module, global_state: dict, client_bn: dict | None, client_id: str) -> nn.Module:
    """Load ``global_state`` into ``model``, then the client's own BatchNorm tensors if it has any (FedBN)."""
    model.load_state_dict(global_state)
    return load_client_bn(model, client_bn, client_id)


def mean_test_accuracy(model: nn.Module, clients: list[ClientData], *, device, batch_size: int = 256,
                       global_state: dict | None = None, client_bn: dict | None = None,
                       accelerator: Accelerator | None = None) -> float:
    """Unweighted mean over clients of the model's accuracy on each client's test split; with
    ``client_bn`` (FedBN) each client is evaluated with its own BatchNorm, then ``global_state`` is restored.
    With ``accelerator`` and several processes each process evaluates its share of the clients."""
    share = list(enumerate(clients)) if accelerator is None else my_share(list(enumerate(clients)), accelerator)
    accs = {}
    for i, c in share:
        if client_bn:
            with_client_bn(model, global_state, client_bn, c.client_id)
        accs[i] = accuracy(model, c.test_x, c.test_y, batch_size=batch_size, device=device)
    if client_bn:
        model.load_state_dict(global_state)
    if accelerator is not None and accelerator.num_processes > 1:
        accs = dict(gather_object(list(accs.items())))
    return float(np.mean([accs[i] for i in range(len(clients))]))


def fedavg_round(model: nn.Module, global_state: dict, clients: list[ClientData], *, rnd: int, phase: Phase,
                 client_fraction: float, settings: OptimSettings, accelerator: Accelerator, seed: int,
                 client_bn: dict[str, dict] | None = None, algorithm: GeneralFL | None = None,
                 fl_state: FLState | None = None) -> dict:
    """One round of the general-FL ``algorithm`` (default FedAvg) from ``global_state``; returns the new global state.

    Client sampling and local seeds derive from (seed, round, client), so a round can be re-run (or
    resumed) on its own and gives the same result. With ``client_bn`` (FedBN) each sampled client starts
    from the global weights plus its own BatchNorm tensors from its last round, and its BatchNorm tensors
    after training are stored back into ``client_bn`` (in place). The returned state's BatchNorm tensors
    are then the average of the clients' local ones: the fallback for a client that never trained.
    ``fl_state`` (the algorithm's server and client state, e.g. SCAFFOLD's control variates) is updated in place.
    With several processes each trains its share of the sampled clients (module docstring).
    """
    algorithm = algorithm if algorithm is not None else FedAvg()
    fl_state = fl_state if fl_state is not None else FLState()
    keys = bn_keys(model) if client_bn is not None else []
    rng = np.random.default_rng(derive_seed(seed, "fedavg-sampling", rnd))
    acc, total, uploads = None, 0.0, None
    sampled = sample_clients(len(clients), client_fraction, rng)
    mine = my_share(sampled, accelerator)
    for i in mine:
        cid = clients[i].client_id
        with_client_bn(model, global_state, client_bn, cid)  # one model in memory, reset
        update = client_update(algorithm, model, clients[i], phase=phase, settings=settings, accelerator=accelerator,
                               seed=derive_seed(seed, "fedavg", rnd, cid), server_state=fl_state.server,
                               client_state=fl_state.clients.get(cid, {}))
        state = update.state
        if client_bn is not None:
            client_bn[cid] = {k: state[k].detach().clone() for k in keys}
        if update.client_state is not None:
            fl_state.clients[cid] = update.client_state
        weight = algorithm.client_weight(clients[i].n_train)
        acc, total = accumulate(acc, state, weight), total + weight
        if update.upload:
            uploads = accumulate(uploads, update.upload, 1.0)
        fault_point("fedavg_client")  # test hook (hf_lpft._faults); a no-op in real runs
    acc, total = all_reduce_sums(acc, total, global_state, accelerator)
    uploads = reduce_uploads(uploads, algorithm.upload_template(model), accelerator)
    trained = [clients[i].client_id for i in mine]
    if client_bn is not None:
        share_client_bn(client_bn, trained, accelerator)
    if algorithm.stateful:
        share_client_bn(fl_state.clients, trained, accelerator)  # every process holds every client's state
    new_state, fl_state.server = algorithm.aggregate(global_state, WeightedSums(acc, total), uploads, fl_state.server,
                                                     n_sampled=len(sampled), n_clients=len(clients))
    return new_state


def reduce_uploads(uploads: dict | None, template: dict, accelerator: Accelerator) -> dict:
    """The round's clients' uploads summed over every process (a process without clients adds ``template``'s
    zeros); {} when the algorithm uploads nothing."""
    if accelerator.num_processes == 1 or not template:
        return uploads or {}
    here = {k: v.to(accelerator.device) for k, v in (uploads or template).items()}
    return all_reduce_sums(here if uploads else None, 0.0, {k: v.to(accelerator.device) for k, v in template.items()},
                           accelerator)[0]


RoundCallback = Callable[[int, dict, list], None]

# Train images converted to float once for all rounds when the copies stay below this size (else per batch).
FLOAT_COPY_LIMIT_BYTES = 1 << 30


def with_float_inputs(clients: list[ClientData], limit: int = FLOAT_COPY_LIMIT_BYTES) -> list[ClientData]:
    """Clients whose uint8 train images are converted to normalised float32 once, instead of every batch of
    every round (about 1 ms a batch of 64 here, 2 % of a round); the same numbers, so the same training.
    Text inputs, float inputs and copies beyond ``limit`` bytes in total are left as they are."""
    is_image = [isinstance(c.train_x, torch.Tensor) and c.train_x.dtype == torch.uint8 for c in clients]
    if not any(is_image) or sum(c.train_x.numel() for c, i in zip(clients, is_image) if i) * 4 > limit:
        return clients
    return [ClientData(c.client_id, to_float(c.train_x), c.train_y, c.test_x, c.test_y) if i else c
            for c, i in zip(clients, is_image)]


def run_fedavg(model: nn.Module, clients: list[ClientData], *, rounds: int, local_epochs: int, lr: float,
               client_fraction: float, settings: OptimSettings, accelerator: Accelerator, seed: int,
               eval_every: int = 1, start_round: int = 0, history: list[dict] | None = None,
               on_round_end: RoundCallback | None = None,
               client_bn: dict[str, dict] | None = None, algorithm: GeneralFL | None = None,
               fl_state: FLState | None = None) -> tuple[nn.Module, list[dict]]:
    """Train ``model`` in place with the general-FL ``algorithm`` (default FedAvg; ``fedavg.fl_strategy``);
    return it and one history row per round.

    Args:
        eval_every: Evaluate the global model (mean test accuracy over clients, ``global_test_acc``) after
            every k-th round and after the last; 0 = never. Evaluation costs about a tenth of a round
            (``fedavg.eval_every``, default 5 in the config: a curve without paying for it every round).
        start_round: Rounds already done (resume); ``model`` must then hold that round's global weights.
        on_round_end: Called as ``(round, global_state, history)`` after every round (e.g. a checkpoint).
        client_bn: FedBN (``fedavg.bn: local``): client id -> that client's BatchNorm tensors, updated in
            place every round (pass the saved one to resume); None = BatchNorm averaged like the rest.
        fl_state: The algorithm's server and client state, updated in place every round (pass the saved one
            to resume; ``hf_lpft.algorithms.base``).
    """
    local = dataclasses.replace(settings, schedule="constant")  # a schedule anneals over rounds (round_lr), not within
    clients = with_float_inputs(clients)
    history = list(history or [])
    bar = tqdm(range(start_round, rounds), desc="FedAvg", initial=start_round, total=rounds,
               disable=not accelerator.is_main_process)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    for rnd in bar:
        phase = Phase("fedavg_local", "all", local_epochs, round_lr(lr, settings, rnd=rnd, rounds=rounds), bn="train")
        global_state = fedavg_round(model, global_state, clients, rnd=rnd, phase=phase, client_fraction=client_fraction,
                                    settings=local, accelerator=accelerator, seed=seed, client_bn=client_bn,
                                    algorithm=algorithm, fl_state=fl_state)
        model.load_state_dict(global_state)
        row = {"round": rnd + 1}
        if eval_every and ((rnd + 1) % eval_every == 0 or rnd + 1 == rounds):
            row["global_test_acc"] = mean_test_accuracy(model, clients, device=accelerator.device,
                                                        global_state=global_state, client_bn=client_bn,
                                                        accelerator=accelerator)
            bar.set_postfix(acc=f"{row['global_test_acc']:.3f}")
        history.append(row)
        if on_round_end is not None:
            on_round_end(rnd + 1, global_state, history)
        fault_point("fedavg_round")
    model.eval()
    return model, history
