"""The FedAvg stage on Flower (``fedavg.engine: flower``): a ClientApp / ServerApp pair over our SplitModel.

Flower (flwr >= 1.21, the Message API) is the established engine for real federations: the same apps run in
Flower's local simulation (``run_flower_fedavg``; Ray backend, ``pip install "hf-lpft[flower]"``) and on
real nodes (SuperLink + SuperNodes, see the README). Whatever engine trains it, the global model feeds the
same personalization step of the pipeline.

The apps reuse hf_lpft's pieces, so both engines train the same thing:

* ClientApp ``train``: the client with ``partition-id`` i (node config) loads the global arrays, trains one
  ``fedavg_local`` phase with the seed ``derive_seed(seed, "fedavg", round, client_id)``, and replies its
  weights with ``num-examples`` = its train size. ``evaluate``: accuracy of the global model on its test split.
* ServerApp: :class:`ExampleWeightedFedAvg`, Flower's FedAvg with hf_lpft's sampling (``sample_clients``
  seeded by (seed, round), mapped to nodes through a QUERY for each node's partition id) and aggregation
  (float64 example-weighted sums in client order, integer buffers from the first sampled client), and an
  unweighted mean over clients of their test accuracy as the round's ``global_test_acc``.

Hence, given the same config and seed, the Flower global model equals the built-in engine's (same local
seeds, same sampling, same summation order; tested). FedBN (``fedavg.bn: local``) is built-in only.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from accelerate import Accelerator
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn

from hf_lpft.config import ExperimentConfig
from hf_lpft.data.tensors import ClientData
from hf_lpft.federated.fedavg import accumulate, finish, sample_clients
from hf_lpft.speed import resolve_num_threads
from hf_lpft.train.loop import OptimSettings, accuracy, derive_seed, train_phase
from hf_lpft.train.phase import Phase

logger = logging.getLogger(__name__)

RoundCallback = Callable[[int, dict, list], None]


def to_arrays(state: dict) -> ArrayRecord:
    """A state dict as a Flower ArrayRecord (CPU copies)."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def local_update(model: nn.Module, state: dict, client: ClientData, *, cfg: ExperimentConfig, rnd: int, seed: int,
                 accelerator: Accelerator) -> dict:
    """One client's FedAvg local training from ``state``, exactly as the built-in engine does it."""
    f = cfg.fedavg
    model.load_state_dict(state)
    train_phase(model, Phase("fedavg_local", "all", f.local_epochs, f.lr, bn="train"), client,
                settings=OptimSettings(f.optimizer, f.momentum, f.weight_decay, f.batch_size),
                accelerator=accelerator, seed=derive_seed(seed, "fedavg", rnd, client.client_id))
    return model.state_dict()


def make_client_app(cfg: ExperimentConfig, clients: list[ClientData], skeleton: nn.Module, *, seed: int) -> ClientApp:
    """A ClientApp serving ``clients``: node ``partition-id`` i is ``clients[i]``.

    ``skeleton``: a model of the right architecture (its weights are replaced by the global arrays).
    """
    app = ClientApp()
    skeleton = copy.deepcopy(skeleton).cpu()
    worker: dict = {}  # per process: one model and one Accelerator, built on first use

    def setup(context: Context) -> tuple[int, nn.Module, Accelerator]:
        if not worker:
            torch.set_num_threads(resolve_num_threads(cfg.run.num_threads))
            worker["accelerator"] = Accelerator()
            worker["model"] = copy.deepcopy(skeleton).to(worker["accelerator"].device)
        i = int(context.node_config["partition-id"])
        if not 0 <= i < len(clients):
            raise ValueError(f"partition-id={i} but the federation has {len(clients)} clients")
        return i, worker["model"], worker["accelerator"]

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        i = int(context.node_config["partition-id"])
        return Message(RecordDict({"metrics": MetricRecord({"client-index": i})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        i, model, accelerator = setup(context)
        conf = msg.content["config"]
        rnd = int(conf["round-offset"]) + int(conf["server-round"]) - 1  # 0-based, as in the built-in engine
        state = local_update(model, msg.content["arrays"].to_torch_state_dict(), clients[i], cfg=cfg, rnd=rnd,
                             seed=seed, accelerator=accelerator)
        metrics = MetricRecord({"num-examples": clients[i].n_train, "client-index": i})
        return Message(RecordDict({"arrays": to_arrays(state), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        i, model, accelerator = setup(context)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        acc = accuracy(model, clients[i].test_x, clients[i].test_y, batch_size=256,  # as mean_test_accuracy
                       device=accelerator.device)
        metrics = MetricRecord({"accuracy": acc, "num-examples": 1, "client-index": i})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def _valid(replies, what: str) -> list[RecordDict]:
    """Reply contents sorted by client index; a failed client fails the round (no silent partial average)."""
    replies = list(replies)
    errors = [m for m in replies if m.has_error()]
    if errors:
        raise RuntimeError(f"{what}: {len(errors)} client(s) failed, e.g. node {errors[0].metadata.src_node_id}: "
                           f"{errors[0].error.reason}")
    return sorted((m.content for m in replies), key=lambda c: int(c["metrics"]["client-index"]))


class ExampleWeightedFedAvg(FedAvg):
    """Flower's FedAvg with hf_lpft's client sampling, aggregation and evaluation (module docstring)."""

    def __init__(self, *, n_clients: int, client_fraction: float, seed: int, round_offset: int = 0,
                 rounds: int | None = None, eval_every: int = 1):
        super().__init__(fraction_train=client_fraction, min_available_nodes=n_clients)
        self.n_clients, self.client_fraction, self.seed = n_clients, client_fraction, seed
        self.round_offset, self.rounds, self.eval_every = round_offset, rounds, eval_every
        self.node_of: dict[int, int] = {}  # client index -> node id
        self.last_accuracy: float | None = None

    def map_nodes(self, grid: Grid, timeout: float) -> None:
        """Ask every node for its partition id (a QUERY round) once all ``n_clients`` nodes are up."""
        deadline = time.monotonic() + timeout
        while len(nodes := list(grid.get_node_ids())) < self.n_clients and time.monotonic() < deadline:
            time.sleep(0.2)  # nodes register asynchronously (in the simulation too)
        replies = grid.send_and_receive([Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n,
                                                 message_type=MessageType.QUERY) for n in nodes], timeout=timeout)
        replies = list(replies)
        self.node_of = {int(m.content["metrics"]["client-index"]): m.metadata.src_node_id
                        for m in replies if not m.has_error()}
        if sorted(self.node_of) != list(range(self.n_clients)):
            errors = sorted({m.error.reason for m in replies if m.has_error()})
            raise RuntimeError(f"{len(nodes)} node(s) report partition ids {sorted(self.node_of)}; expected "
                               f"0..{self.n_clients - 1}" + (f"; errors: {errors}" if errors else ""))

    def _messages(self, node_ids: list[int], arrays: ArrayRecord, config: ConfigRecord, kind: str) -> list[Message]:
        return [Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=n, message_type=kind)
                for n in node_ids]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        rnd = self.round_offset + server_round - 1
        rng = np.random.default_rng(derive_seed(self.seed, "fedavg-sampling", rnd))
        picked = sample_clients(self.n_clients, self.client_fraction, rng)
        config["server-round"], config["round-offset"] = server_round, self.round_offset
        return self._messages([self.node_of[i] for i in picked], arrays, config, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies):
        contents = _valid(replies, f"round {self.round_offset + server_round}")
        acc, total = None, 0.0
        for c in contents:  # client order, float64 sums: the built-in engine's arithmetic
            n = float(c["metrics"]["num-examples"])
            acc, total = accumulate(acc, c["arrays"].to_torch_state_dict(), n), total + n
        state = finish(acc, total, contents[0]["arrays"].to_torch_state_dict())
        return to_arrays(state), MetricRecord({"num-examples": int(total)})

    def evaluates(self, server_round: int) -> bool:
        """Whether this round is evaluated: every ``eval_every``-th round and the last, as the built-in engine."""
        rnd = self.round_offset + server_round
        return bool(self.eval_every) and (rnd % self.eval_every == 0 or rnd == self.rounds)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.last_accuracy = None
        if not self.evaluates(server_round):
            return []
        config["server-round"] = server_round
        return self._messages([self.node_of[i] for i in range(self.n_clients)], arrays, config, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies):
        contents = _valid(replies, f"evaluation of round {self.round_offset + server_round}")
        if not contents:  # a round that is not evaluated (eval_every)
            return None
        self.last_accuracy = float(np.mean([float(c["metrics"]["accuracy"]) for c in contents]))
        return MetricRecord({"global_test_acc": self.last_accuracy})


def make_server_app(initial_state: dict, *, n_clients: int, rounds: int, client_fraction: float, seed: int,
                    start_round: int = 0, history: list[dict] | None = None,
                    on_round_end: RoundCallback | None = None, result: dict | None = None,
                    timeout: float = 3600.0, eval_every: int = 1) -> ServerApp:
    """A ServerApp running ``rounds - start_round`` FedAvg rounds from ``initial_state``.

    ``on_round_end(round, state, history)`` runs after every round (e.g. the run's checkpoint, so an
    interrupted Flower stage resumes from its last round); ``result`` receives ``state`` and ``history``.
    """
    app = ServerApp()
    history = list(history or [])
    result = {} if result is None else result

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = ExampleWeightedFedAvg(n_clients=n_clients, client_fraction=client_fraction, seed=seed,
                                         round_offset=start_round, rounds=rounds, eval_every=eval_every)
        strategy.map_nodes(grid, timeout)

        def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:  # Flower also calls this before the first round
                return None
            row = {"round": start_round + server_round}
            if strategy.last_accuracy is not None:  # evaluated this round (eval_every)
                row["global_test_acc"] = strategy.last_accuracy
            history.append(row)
            if on_round_end is not None:
                on_round_end(start_round + server_round, arrays.to_torch_state_dict(), history)
            return None

        out = strategy.start(grid=grid, initial_arrays=to_arrays(initial_state), num_rounds=rounds - start_round,
                             timeout=timeout, evaluate_fn=after_round)
        result["state"] = out.arrays.to_torch_state_dict() if rounds > start_round else dict(initial_state)
        result["history"] = history

    return app


def run_flower_fedavg(model: nn.Module, clients: list[ClientData], cfg: ExperimentConfig, *, seed: int,
                      start_round: int = 0, history: list[dict] | None = None,
                      on_round_end: RoundCallback | None = None,
                      backend_config: dict | None = None) -> tuple[nn.Module, list[dict]]:
    """FedAvg on Flower's local simulation (one virtual node per client); ``model`` ends with the global weights.

    Args:
        model: The initial global model (the start round's weights when resuming); trained in place.
        backend_config: Flower's simulation backend settings; default one CPU per client, no GPU
            (e.g. ``{"client_resources": {"num_cpus": 1, "num_gpus": 0.25}}`` shares a GPU by four).

    Raises:
        RuntimeError: the simulation ended without a global model (a client or the server failed; Flower
            logs the cause).
    """
    from flwr.simulation import run_simulation

    if cfg.fedavg.rounds <= start_round:
        return model.eval(), list(history or [])
    result: dict = {}
    server = make_server_app({k: v.detach().cpu() for k, v in model.state_dict().items()}, n_clients=len(clients),
                             rounds=cfg.fedavg.rounds, client_fraction=cfg.fedavg.client_fraction, seed=seed,
                             start_round=start_round, history=history, on_round_end=on_round_end, result=result,
                             eval_every=cfg.fedavg.eval_every)
    client = make_client_app(cfg, clients, model, seed=seed)
    run_simulation(server_app=server, client_app=client, num_supernodes=len(clients),
                   backend_config=backend_config or {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    if "state" not in result:
        raise RuntimeError("the Flower simulation ended without a global model; its log above names the failure")
    model.load_state_dict(result["state"])
    return model.eval(), result["history"]
