"""The FedAvg stage on Flower (``fedavg.engine: flower``): a ClientApp / ServerApp pair over our SplitModel.

Flower (flwr >= 1.21, the Message API) is the established engine for real federations: the same apps run in
Flower's local simulation (``run_flower_fedavg``; Ray backend, ``pip install "hf-lpft[flower]"``) and on
real nodes (SuperLink + SuperNodes, see the README). Whatever engine trains it, the global model feeds the
same personalization step of the pipeline.

The apps reuse hf_lpft's pieces, so both engines train the same thing:

* ClientApp ``train``: the client with ``partition-id`` i (node config) loads the global arrays, trains one
  ``fedavg_local`` phase (with the algorithm's local term) with the seed ``derive_seed(seed, "fedavg", round,
  client_id)``, and replies its weights with ``num-examples`` = its train size. ``evaluate``: accuracy of the
  global model on its test split.
* ServerApp: :class:`AlgorithmStrategy` (FedAvg by default), Flower's FedAvg with hf_lpft's sampling
  (``sample_clients`` seeded by (seed, round), mapped to nodes through a QUERY for each node's partition id)
  and aggregation (float64 example-weighted sums in client order, integer buffers from the first sampled
  client), and an
  unweighted mean over clients of their test accuracy as the round's ``global_test_acc``.

Hence, given the same config and seed, the Flower global model equals the built-in engine's (same local
seeds, same sampling, same summation order; tested). FedBN (``fedavg.bn: local``) is built-in only.

General-FL algorithms (``fedavg.fl_strategy``, ``hf_lpft.algorithms``): a registered algorithm
(FedAvg, FedProx, SCAFFOLD, ...) runs as :class:`AlgorithmStrategy`: TRAIN messages carry its name and options
(``fl-algorithm``), its server state (``server-state``) and the client's own state (``client-state``), replies
the client's ``upload`` and new ``client-state``; the ClientApp runs the same ``client_update`` as the built-in
engine and the server the same sums and ``aggregate``, so both engines give the same global model. Flower's
own strategies (FedAdam, FedAvgM, Krum, ...) are adapters with their options (``fedavg.fl_strategy_args``,
checked against the class's signature), driven through :class:`SeededNodes` so sampling and node mapping stay
hf_lpft's; their aggregation is Flower's. The paper presents post-hoc PFT as plug-and-play after any general FL
method (arXiv 2511.12695, Sec. 3); the Flower App (``hf_lpft.flower_app``) runs PFT after any of them.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from accelerate import Accelerator
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp import strategy as flwr_strategies
from flwr.serverapp.strategy import FedAvg
from torch import nn

from hf_lpft.algorithms import FLState, GeneralFL, WeightedSums, build_algorithm, from_message
from hf_lpft.algorithms.fedavg import FedAvg as FedAvgAlgorithm
from hf_lpft.algorithms.flower_adapters import FlowerAdapter
from hf_lpft.data.tensors import ClientData
from hf_lpft.federated.fedavg import accumulate, sample_clients
from hf_lpft.federated.local import ClientUpdate, client_update
from hf_lpft.speed import resolve_num_threads
from hf_lpft.train.loop import accuracy, derive_seed
from hf_lpft.train.optim import OptimSettings, round_lr
from hf_lpft.train.phase import Phase

logger = logging.getLogger(__name__)

RoundCallback = Callable[[int, dict, list], None]


def to_arrays(state: dict) -> ArrayRecord:
    """A state dict as a Flower ArrayRecord (CPU copies)."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


@dataclasses.dataclass(frozen=True)
class LocalTraining:
    """What a client's local FedAvg update needs, as explicit values (the built-in ``run_fedavg``'s arguments):
    ``rounds`` (for a cosine schedule over rounds), local epochs, lr, optimizer settings, torch threads."""

    rounds: int
    local_epochs: int
    lr: float
    settings: OptimSettings
    num_threads: int | None = None


def local_update(model: nn.Module, state: dict, client: ClientData, *, training: LocalTraining, rnd: int, seed: int,
                 accelerator: Accelerator, algorithm: GeneralFL | None = None, server_state: dict | None = None,
                 client_state: dict | None = None) -> tuple[ClientUpdate, float]:
    """One client's local training from ``state`` under the general-FL ``algorithm`` (default FedAvg), exactly
    as the built-in engine does it (``hf_lpft.federated.local.client_update``).

    Returns:
        The client's update and the mean loss of its last local epoch (NaN if none).
    """
    f = training
    model.load_state_dict(state)
    settings = f.settings
    lr = round_lr(f.lr, settings, rnd=rnd, rounds=f.rounds)  # rnd is 0-based, as in the built-in engine
    update = client_update(algorithm if algorithm is not None else FedAvgAlgorithm(), model, client,
                           phase=Phase("fedavg_local", "all", f.local_epochs, lr, bn="train"),
                           settings=dataclasses.replace(settings, schedule="constant"), accelerator=accelerator,
                           seed=derive_seed(seed, "fedavg", rnd, client.client_id), server_state=server_state or {},
                           client_state=client_state or {})
    losses = update.record.get("epoch_loss") or [float("nan")]
    return update, float(losses[-1])


def message_algorithm(conf: ConfigRecord) -> GeneralFL:
    """The general-FL algorithm a TRAIN message asks for: ``fl-algorithm`` (name and options), else Flower's
    FedProx key ``proximal-mu``, else FedAvg (Flower's other strategies train clients as FedAvg does)."""
    if "fl-algorithm" in conf:
        return from_message(str(conf["fl-algorithm"]))
    if "proximal-mu" in conf:
        return build_algorithm("fedprox", {"proximal_mu": float(conf["proximal-mu"])})
    return FedAvgAlgorithm()


def make_client_app(training: LocalTraining, clients: list[ClientData], skeleton: nn.Module, *, seed: int) -> ClientApp:
    """A ClientApp serving ``clients``: node ``partition-id`` i is ``clients[i]``.

    ``skeleton``: a model of the right architecture (its weights are replaced by the global arrays).
    """
    app = ClientApp()
    skeleton = copy.deepcopy(skeleton).cpu()
    worker: dict = {}  # per process: one model and one Accelerator, built on first use

    def setup(context: Context) -> tuple[int, nn.Module, Accelerator]:
        if not worker:
            torch.set_num_threads(resolve_num_threads(training.num_threads))
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
        return train_reply(msg, model, clients[i], i, training=training, seed=seed, accelerator=accelerator)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        i, model, accelerator = setup(context)
        return evaluate_reply(msg, model, clients[i], i, device=accelerator.device)

    return app


def train_reply(msg: Message, model: nn.Module, client: ClientData, i: int, *, training: LocalTraining, seed: int,
                accelerator: Accelerator) -> Message:
    """A TRAIN message answered: local training from the message's arrays under the message's algorithm, with
    its ``server-state`` and the client's own ``client-state`` when it sends them; the reply carries the
    algorithm's ``upload`` and the client's new ``client-state`` likewise."""
    content = msg.content
    conf = content["config"]
    rnd = int(conf["round-offset"]) + int(conf["server-round"]) - 1  # 0-based, as in the built-in engine
    update, loss = local_update(model, content["arrays"].to_torch_state_dict(), client, training=training, rnd=rnd,
                                seed=seed, accelerator=accelerator, algorithm=message_algorithm(conf),
                                server_state=_arrays_or_empty(content, "server-state"),
                                client_state=_arrays_or_empty(content, "client-state"))
    metrics = MetricRecord({"num-examples": client.n_train, "client-index": i, "train_loss": loss})
    reply = RecordDict({"arrays": to_arrays(update.state), "metrics": metrics})
    if update.upload:
        reply["upload"] = to_arrays(update.upload)
    if update.client_state is not None:
        reply["client-state"] = to_arrays(update.client_state)
    return Message(reply, reply_to=msg)


def _arrays_or_empty(content: RecordDict, key: str) -> dict:
    return content[key].to_torch_state_dict() if key in content else {}


def evaluate_reply(msg: Message, model: nn.Module, client: ClientData, i: int, *, device) -> Message:
    """An EVALUATE message answered: accuracy of the message's arrays on the client's test split."""
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    acc = accuracy(model, client.test_x, client.test_y, batch_size=256, device=device)  # as mean_test_accuracy
    metrics = MetricRecord({"accuracy": acc, "num-examples": 1, "client-index": i})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def valid_replies(replies, what: str) -> list[RecordDict]:
    """Reply contents sorted by client index; a failed client fails the round (no silent partial average)."""
    return sorted((m.content for m in _valid_messages(replies, what)), key=lambda c: int(c["metrics"]["client-index"]))


class _Nodes:
    """A stand-in Grid for Flower's node sampling: it sees only the nodes hf_lpft picked."""

    def __init__(self, node_ids: list[int]):
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


class SeededNodes:
    """Mixin over a Flower strategy: hf_lpft's seeded client sampling, node mapping, failure handling and
    evaluation (module docstring); training configuration and aggregation stay the strategy's own."""

    def setup_nodes(self, *, n_clients: int, client_fraction: float, seed: int, round_offset: int = 0,
                    rounds: int | None = None, eval_every: int = 1) -> None:
        self.n_clients, self.client_fraction, self.seed = n_clients, client_fraction, seed
        self.round_offset, self.rounds, self.eval_every = round_offset, rounds, eval_every
        self.node_of: dict[int, int] = {}  # client index -> node id
        self.last_accuracy: float | None = None

    def map_nodes(self, grid: Grid, timeout: float, config: ConfigRecord | None = None) -> list[RecordDict]:
        """Ask every node for its partition id (a QUERY round) once all ``n_clients`` nodes are up; return
        the replies' contents in client order (``config`` travels with the query, e.g. the study config)."""
        deadline = time.monotonic() + timeout
        while len(nodes := list(grid.get_node_ids())) < self.n_clients and time.monotonic() < deadline:
            time.sleep(0.2)  # nodes register asynchronously (in the simulation too)
        query = RecordDict({"config": config if config is not None else ConfigRecord({})})
        replies = list(grid.send_and_receive([Message(copy.deepcopy(query), dst_node_id=n,
                                                      message_type=MessageType.QUERY) for n in nodes],
                                             timeout=timeout))
        ok = [m for m in replies if not m.has_error()]
        self.node_of = {int(m.content["metrics"]["client-index"]): m.metadata.src_node_id for m in ok}
        if sorted(self.node_of) != list(range(self.n_clients)) or len(ok) != len(self.node_of):
            errors = sorted({m.error.reason for m in replies if m.has_error()})
            raise RuntimeError(f"{len(nodes)} node(s) report partition ids "
                               f"{sorted(int(m.content['metrics']['client-index']) for m in ok)}; expected each of "
                               f"0..{self.n_clients - 1} once" + (f"; errors: {errors}" if errors else ""))
        return sorted((m.content for m in ok), key=lambda c: int(c["metrics"]["client-index"]))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        rnd = self.round_offset + server_round - 1
        rng = np.random.default_rng(derive_seed(self.seed, "fedavg-sampling", rnd))
        picked = sample_clients(self.n_clients, self.client_fraction, rng)
        config["round-offset"] = self.round_offset
        return super().configure_train(server_round, arrays, config, _Nodes([self.node_of[i] for i in picked]))

    def evaluates(self, server_round: int) -> bool:
        """Whether this round is evaluated: every ``eval_every``-th round and the last, as the built-in engine."""
        rnd = self.round_offset + server_round
        return bool(self.eval_every) and (rnd % self.eval_every == 0 or rnd == self.rounds)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.last_accuracy = None
        if not self.evaluates(server_round):
            return []
        return super().configure_evaluate(server_round, arrays, config, _Nodes(list(self.node_of.values())))

    def aggregate_train(self, server_round: int, replies):
        # every reply valid, in client order: a failed client fails the round (no silent partial average)
        replies = sorted(_valid_messages(replies, f"round {self.round_offset + server_round}"),
                         key=lambda m: int(m.content["metrics"]["client-index"]))
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round: int, replies):
        contents = valid_replies(replies, f"evaluation of round {self.round_offset + server_round}")
        if not contents:  # a round that is not evaluated (eval_every)
            return None
        self.last_accuracy = float(np.mean([float(c["metrics"]["accuracy"]) for c in contents]))
        return MetricRecord({"global_test_acc": self.last_accuracy})


def _valid_messages(replies, what: str) -> list[Message]:
    """The replies of a round; any failed client raises, naming its node and reason."""
    replies = list(replies)
    errors = [m for m in replies if m.has_error()]
    if errors:
        raise RuntimeError(f"{what}: {len(errors)} client(s) failed, e.g. node {errors[0].metadata.src_node_id}: "
                           f"{errors[0].error.reason}")
    return replies


class AlgorithmStrategy(SeededNodes, FedAvg):
    """A registered general-FL algorithm (``hf_lpft.algorithms``) as a Flower strategy: hf_lpft's
    client sampling and evaluation (module docstring); TRAIN messages name the algorithm and carry its server
    state and each client's own state; aggregation is the built-in engine's arithmetic (weighted float64 sums
    and summed uploads in client order, then the algorithm's ``aggregate``), so both engines agree."""

    def __init__(self, *, n_clients: int, client_fraction: float, seed: int, round_offset: int = 0,
                 rounds: int | None = None, eval_every: int = 1, algorithm: GeneralFL | None = None,
                 fl_state: FLState | None = None, client_ids: list[str] | None = None):
        super().__init__(fraction_train=1.0, min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
        self.setup_nodes(n_clients=n_clients, client_fraction=client_fraction, seed=seed, round_offset=round_offset,
                         rounds=rounds, eval_every=eval_every)
        self.algorithm = algorithm if algorithm is not None else FedAvgAlgorithm()
        self.fl_state = fl_state if fl_state is not None else FLState()
        self.client_ids = list(client_ids) if client_ids is not None else [str(i) for i in range(n_clients)]
        self.global_state: dict = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.global_state = arrays.to_torch_state_dict()
        config["fl-algorithm"] = self.algorithm.to_message()
        index_of = {node: i for i, node in self.node_of.items()}
        messages = []
        for m in super().configure_train(server_round, arrays, config, grid):
            content = RecordDict({"arrays": arrays, "config": config})
            if self.fl_state.server:
                content["server-state"] = to_arrays(self.fl_state.server)
            own = self.fl_state.clients.get(self.client_ids[index_of[m.metadata.dst_node_id]])
            if own:
                content["client-state"] = to_arrays(own)
            messages.append(Message(content, dst_node_id=m.metadata.dst_node_id, message_type=MessageType.TRAIN))
        return messages

    def aggregate_train(self, server_round: int, replies):
        contents = valid_replies(replies, f"round {self.round_offset + server_round}")
        acc, total, uploads, examples = None, 0.0, None, 0
        for c in contents:  # client order, float64 sums: the built-in engine's arithmetic
            n = int(c["metrics"]["num-examples"])
            weight = self.algorithm.client_weight(n)
            acc, total, examples = accumulate(acc, c["arrays"].to_torch_state_dict(), weight), total + weight, \
                examples + n
            if "upload" in c:
                uploads = accumulate(uploads, c["upload"].to_torch_state_dict(), 1.0)
            if "client-state" in c:
                cid = self.client_ids[int(c["metrics"]["client-index"])]
                self.fl_state.clients[cid] = c["client-state"].to_torch_state_dict()
        global_state = self.global_state or contents[0]["arrays"].to_torch_state_dict()
        state, self.fl_state.server = self.algorithm.aggregate(
            global_state, WeightedSums(acc, total), uploads or {}, self.fl_state.server, n_sampled=len(contents),
            n_clients=self.n_clients)
        return to_arrays(state), MetricRecord({"num-examples": examples})


class ExampleWeightedFedAvg(AlgorithmStrategy):
    """hf_lpft's FedAvg on Flower: :class:`AlgorithmStrategy` with FedAvg (equal to the built-in engine)."""


def build_fl_strategy(name: str, options: dict | None, *, n_clients: int, client_fraction: float, seed: int,
                      round_offset: int = 0, rounds: int | None = None, eval_every: int = 1,
                      fl_state: FLState | None = None, client_ids: list[str] | None = None) -> SeededNodes:
    """The general-FL algorithm ``name`` (``fedavg.fl_strategy``) with its ``options`` (validated here by the
    registry, ``hf_lpft.algorithms``) as a Flower strategy: a registered algorithm as
    :class:`AlgorithmStrategy` (its state in ``fl_state``, clients named by ``client_ids``), a Flower
    adapter as Flower's class driven through :class:`SeededNodes`."""
    algorithm = build_algorithm(name, options, engine="flower")
    nodes = {"n_clients": n_clients, "client_fraction": client_fraction, "seed": seed, "round_offset": round_offset,
             "rounds": rounds, "eval_every": eval_every}
    if not isinstance(algorithm, FlowerAdapter):
        return AlgorithmStrategy(**nodes, algorithm=algorithm, fl_state=fl_state, client_ids=client_ids)
    base = getattr(flwr_strategies, algorithm.flower_class)
    cls = type(f"Seeded{base.__name__}", (SeededNodes, base), {})
    strategy = cls(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1,
                   min_available_nodes=1, **algorithm.config)
    strategy.setup_nodes(**nodes)
    return strategy


def like(state: dict, reference: dict) -> dict:
    """``state`` with the dtypes of ``reference`` (Flower's strategies return float arrays for integer buffers)."""
    return {k: v.to(reference[k].dtype) if k in reference else v for k, v in state.items()}


def run_rounds(grid: Grid, strategy: SeededNodes, initial_state: dict, *, rounds: int, start_round: int = 0,
               history: list[dict] | None = None, on_round_end: RoundCallback | None = None,
               timeout: float = 3600.0, train_config: ConfigRecord | None = None) -> tuple[dict, list[dict]]:
    """Rounds ``start_round + 1 .. rounds`` of ``strategy`` (nodes already mapped) from ``initial_state``.

    ``on_round_end(round, state, history)`` runs after every round (e.g. the run's checkpoint);
    ``train_config`` travels with every TRAIN and EVALUATE message.
    """
    history = list(history or [])
    if rounds <= start_round:
        return dict(initial_state), history

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:  # Flower also calls this before the first round
            return None
        row = {"round": start_round + server_round}
        if strategy.last_accuracy is not None:  # evaluated this round (eval_every)
            row["global_test_acc"] = strategy.last_accuracy
        history.append(row)
        if on_round_end is not None:
            on_round_end(start_round + server_round, like(arrays.to_torch_state_dict(), initial_state), history)
        return None

    extra = {} if train_config is None else dict(train_config)
    out = strategy.start(grid=grid, initial_arrays=to_arrays(initial_state), num_rounds=rounds - start_round,
                         timeout=timeout, train_config=ConfigRecord(dict(extra)),
                         evaluate_config=ConfigRecord(dict(extra)), evaluate_fn=after_round)
    return like(out.arrays.to_torch_state_dict(), initial_state), history


def make_server_app(initial_state: dict, *, n_clients: int, rounds: int, client_fraction: float, seed: int,
                    start_round: int = 0, history: list[dict] | None = None,
                    on_round_end: RoundCallback | None = None, result: dict | None = None,
                    timeout: float = 3600.0, fl_strategy: str = "fedavg",
                    fl_strategy_options: dict | None = None, eval_every: int = 1, fl_state: FLState | None = None,
                    client_ids: list[str] | None = None) -> ServerApp:
    """A ServerApp running ``rounds - start_round`` rounds of ``fl_strategy`` (default FedAvg) from ``initial_state``.

    ``on_round_end(round, state, history)`` runs after every round (e.g. the run's checkpoint, so an
    interrupted Flower stage resumes from its last round); ``result`` receives ``state`` and ``history``.
    """
    app = ServerApp()
    result = {} if result is None else result

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = build_fl_strategy(fl_strategy, fl_strategy_options, n_clients=n_clients,
                                     client_fraction=client_fraction, seed=seed, round_offset=start_round,
                                     rounds=rounds, eval_every=eval_every, fl_state=fl_state, client_ids=client_ids)
        strategy.map_nodes(grid, timeout)
        result["state"], result["history"] = run_rounds(grid, strategy, initial_state, rounds=rounds,
                                                        start_round=start_round, history=history,
                                                        on_round_end=on_round_end, timeout=timeout)

    return app


def run_flower_fedavg(model: nn.Module, clients: list[ClientData], *, rounds: int, local_epochs: int, lr: float,
                      client_fraction: float, settings: OptimSettings, seed: int, eval_every: int = 1,
                      fl_strategy: str = "fedavg", fl_strategy_options: dict | None = None,
                      num_threads: int | None = None, start_round: int = 0, history: list[dict] | None = None,
                      on_round_end: RoundCallback | None = None, backend_config: dict | None = None,
                      fl_state: FLState | None = None) -> tuple[nn.Module, list[dict]]:
    """General FL (default FedAvg) on Flower's local simulation (one virtual node per client); ``model`` ends
    with the global weights.

    Args:
        model: The initial global model (the start round's weights when resuming); trained in place.
        rounds, local_epochs, lr, client_fraction, settings, eval_every: as the built-in ``run_fedavg``.
        fl_strategy, fl_strategy_options: the general-FL algorithm and its options (``fedavg.fl_strategy_args``).
        fl_state: a stateful algorithm's server and client state (e.g. SCAFFOLD's control variates), updated
            in place every round (pass the saved one to resume).
        num_threads: torch threads of each virtual client (``run.num_threads``; None = the measured default).
        backend_config: Flower's simulation backend settings; default one CPU per client, no GPU
            (e.g. ``{"client_resources": {"num_cpus": 1, "num_gpus": 0.25}}`` shares a GPU by four).

    Raises:
        RuntimeError: the simulation ended without a global model (a client or the server failed; Flower
            logs the cause).
    """
    from flwr.simulation import run_simulation

    if rounds <= start_round:
        return model.eval(), list(history or [])
    result: dict = {}
    server = make_server_app({k: v.detach().cpu() for k, v in model.state_dict().items()}, n_clients=len(clients),
                             rounds=rounds, client_fraction=client_fraction, seed=seed,
                             start_round=start_round, history=history, on_round_end=on_round_end, result=result,
                             fl_strategy=fl_strategy, fl_strategy_options=fl_strategy_options, eval_every=eval_every,
                             fl_state=fl_state, client_ids=[c.client_id for c in clients])
    training = LocalTraining(rounds, local_epochs, lr, settings, num_threads)
    client = make_client_app(training, clients, model, seed=seed)
    run_simulation(server_app=server, client_app=client, num_supernodes=len(clients),
                   backend_config=backend_config or {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    if "state" not in result:
        raise RuntimeError("the Flower simulation ended without a global model; its log above names the failure")
    model.load_state_dict(result["state"])
    return model.eval(), result["history"]
