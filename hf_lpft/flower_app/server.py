"""The server side of the Flower App: the whole study over a Flower Grid (simulation or real SuperNodes).

Stages (arXiv 2511.12695, Sec. 3: general FL, then post-hoc PFT on every client, then Local/Global):

1. QUERY: every node loads its own data and says who it is (client index and id, counts, classes).
2. General FL: ``fedavg.fl_strategy`` (hf_lpft's FedAvg by default, a registered algorithm such as
   FedProx or SCAFFOLD, or a Flower strategy) for
   ``fedavg.rounds`` rounds from the seeded initial model; round checkpoints as the built-in engine writes them.
3. TRAIN ``pft``: every node personalizes θ_G with every strategy on its own data (the pipeline's
   ``personalize_unit``) and replies its records and exported model folders.
4. EVALUATE ``cross``: every node scores the other clients' personalized models on its own test split
   (models travel, data does not); the server fills the cross-client matrix.
5. The usual output folder: ``results.parquet``, ``cross_client.parquet``, ``summary.md``, ``global/``,
   ``clients/``, ``run_record.json``, report and the Hub-ready folder (the pipeline's writers).

Progress goes to Flower's logger (``flwr.common.logger``): the ServerApp's stdout and stderr are what
``flwr run --stream`` shows, so the stream gets a line per stage, per general-FL round and per node's reply,
then the results table and the output folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
import time
from logging import INFO
from pathlib import Path
from types import SimpleNamespace

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from hf_lpft.algorithms import build_algorithm
from hf_lpft.config import ConfigError, ExperimentConfig, load_config
from hf_lpft.data.schemes import get_scheme
from hf_lpft.evaluation.clients import NO_DISTORTION, result_row, write_cross_client, write_results
from hf_lpft.evaluation.metrics import local_global
from hf_lpft.evaluation.report import write_report
from hf_lpft.federated.flower import SeededNodes, build_fl_strategy, run_rounds, to_arrays, valid_replies
from hf_lpft.hub.push import publish_run
from hf_lpft.io import atomic_path, write_json, write_text
from hf_lpft.layout import RunLayout, save_model
from hf_lpft.models.backbone import SplitModel
from hf_lpft.run.flower_engine import check_fl_strategy
from hf_lpft.run.preflight import preflight
from hf_lpft.run.pretrain import initial_model, resumed_fl_state
from hf_lpft.run.records import global_model_rows, run_record, speed_info
from hf_lpft.run.settings import prepare_folder, run_layout
from hf_lpft.speed import memory_format_of

PFT = f"{MessageType.TRAIN}.pft"
CROSS = f"{MessageType.EVALUATE}.cross"


def study_config(run_config: dict) -> ExperimentConfig:
    """The study from the app's run config: ``config`` (a YAML path on the server), ``overrides``
    (``--section.key value`` pairs) and ``output-dir``; the general-FL stage is Flower's by definition.
    What a federation cannot honour is refused by ``preflight(cfg, engine="flower-app")`` (``run_study``).

    Raises:
        ConfigError: a bad value (named).
    """
    overrides = shlex.split(str(run_config.get("overrides", "")))
    if run_config.get("output-dir"):
        overrides += ["--run.output_dir", str(run_config["output-dir"])]
    cfg = load_config(str(run_config["config"]) if run_config.get("config") else None,
                      overrides + ["--fedavg.engine", "flower"])
    return cfg


def _send(grid: Grid, messages: list[Message], what: str, timeout: float, on_reply=None) -> list[RecordDict]:
    """One message round; every node must answer (contents in client order). ``on_reply(content, done, total)``
    runs as each valid reply arrives (the stream's line per node)."""
    pending, replies = set(grid.push_messages(messages)), []
    total, deadline = len(pending), time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        new = list(grid.pull_messages(pending))
        pending -= {m.metadata.reply_to_message_id for m in new}
        replies += new
        for m in new:
            if on_reply is not None and not m.has_error():
                on_reply(m.content, len(replies), total)
        if pending:
            time.sleep(0.5)
    if pending:
        raise RuntimeError(f"{what}: {len(pending)} of {total} node(s) did not reply within timeout={timeout:g} s")
    return valid_replies(replies, what)


def _study_record(cfg: ExperimentConfig, seed: int) -> ConfigRecord:
    # bytes: Flower's strategy log prints <bytes>, not the whole YAML once per config record
    return ConfigRecord({"study": cfg.to_yaml().encode(), "seed": seed})


def describe_study(cfg: ExperimentConfig, out: Path) -> str:
    """The study in one line, for the stream (the whole config is ``config.yaml`` in the output folder)."""
    d, f, p = cfg.data, cfg.fedavg, cfg.pft
    return (f"study: {d.dataset} ({d.scheme}), general FL {f.fl_strategy} x {f.rounds} rounds "
            f"(client_fraction {f.client_fraction:g}), PFT {', '.join(p.strategies)} x {p.epochs} epochs, "
            f"seeds {list(cfg.run.seeds)}; config and results in {out}")


def map_clients(grid: Grid, cfg: ExperimentConfig, *, num_nodes: int, timeout: float) -> tuple[SeededNodes, list]:
    """Stage 1: wait for ``num_nodes`` nodes (0 = those connected now), ask each who it is."""
    deadline = time.monotonic() + timeout
    while not (nodes := list(grid.get_node_ids())) and time.monotonic() < deadline:
        time.sleep(0.5)
    n = num_nodes or len(nodes)
    mapper = build_fl_strategy("fedavg", None, n_clients=n, client_fraction=1.0, seed=0)
    contents = mapper.map_nodes(grid, timeout, _study_record(cfg, cfg.run.seeds[0]))
    clients = [SimpleNamespace(client_id=json.loads(str(c["node"]["summary"]))["client_id"],
                               n_train=int(c["metrics"]["n-train"]), n_test=int(c["metrics"]["n-test"]),
                               num_classes=int(c["metrics"]["num-classes"]),
                               class_names=json.loads(str(c["node"].get("class-names", "null"))),
                               summary=json.loads(str(c["node"]["summary"])), version=str(c["node"]["hf-lpft"]))
               for c in contents]
    if len({c.num_classes for c in clients}) != 1 or len({c.client_id for c in clients}) != n:
        raise ConfigError(f"nodes disagree: classes {[c.num_classes for c in clients]}, client ids "
                          f"{[c.client_id for c in clients]} (need one class count and distinct ids)")
    if len({json.dumps(c.class_names) for c in clients}) != 1:
        raise ConfigError(f"nodes disagree on the class names: {[c.class_names for c in clients]} (class i must "
                          "mean the same on every node)")
    log(INFO, "%d node(s) ready: %s", n, ", ".join(f"{c.client_id} ({c.n_train} train / {c.n_test} test)"
                                                  for c in clients))
    return mapper, clients


def general_fl(grid: Grid, cfg: ExperimentConfig, node_of: dict, clients: list, *, seed: int, layout: RunLayout,
               timeout: float) -> tuple[SplitModel, list[dict]]:
    """Stage 2: θ_G from ``fedavg.fl_strategy``, resumable from the round checkpoint like the built-in engine's
    ``run.pretrain.pretrain`` (the same initial model and resumed state)."""
    ckpt = layout.checkpoints
    model = initial_model(cfg, clients[0].num_classes, seed=seed, class_names=clients[0].class_names)
    saved = ckpt.load_round(seed) if cfg.run.resume else None
    if saved is not None:
        model.load_state_dict(saved.state)
    options = check_fl_strategy(cfg.fedavg.fl_strategy, cfg.fedavg.fl_strategy_args)
    stateful = build_algorithm(cfg.fedavg.fl_strategy, options, engine="flower").stateful
    fl_state = resumed_fl_state(ckpt, seed, saved, stateful=stateful)
    strategy = build_fl_strategy(cfg.fedavg.fl_strategy, options, n_clients=len(clients),
                                 client_fraction=cfg.fedavg.client_fraction, seed=seed,
                                 round_offset=saved.rounds if saved else 0, rounds=cfg.fedavg.rounds,
                                 eval_every=cfg.fedavg.eval_every, fl_state=fl_state,
                                 client_ids=[c.client_id for c in clients])
    strategy.node_of = dict(node_of)

    def round_end(rnd: int, s: dict, h: list[dict]) -> None:
        ckpt.save_round(seed, s, h, fl_state=fl_state)
        acc = h[-1].get("global_test_acc")
        log(INFO, "general FL round %d/%d done (seed %d)%s", rnd, cfg.fedavg.rounds, seed,
            "" if acc is None else f": global model's test accuracy {100 * acc:.2f}% (mean over clients)")

    state, history = run_rounds(grid, strategy, model.state_dict(), rounds=cfg.fedavg.rounds,
                                start_round=strategy.round_offset, history=saved.history if saved else None,
                                on_round_end=round_end, timeout=timeout, train_config=_study_record(cfg, seed))
    model.load_state_dict(state)
    save_model(model, layout.global_dir(seed))
    if cfg.fedavg.rounds == 0 or not history:
        ckpt.save_round(seed, model.state_dict(), history)
    return model, history


def _own_accuracy(record: dict) -> str:
    row = record["row"]
    return "failed" if row["error"] else f"{100 * row['acc_by_client'][0]:.2f}%"


def _pft_line(clients: list, seed: int):
    """The stream's line per node whose PFT finished: each strategy's accuracy on the node's own test split."""
    def on_reply(content: RecordDict, done: int, total: int) -> None:
        records = json.loads(str(content["records"]["records"]))
        own = ", ".join(f"{name} {_own_accuracy(r)}" for name, r in records.items())
        log(INFO, "PFT done on %s (%d/%d nodes, seed %d): own test accuracy %s (global model %.2f%%)",
            clients[int(content["metrics"]["client-index"])].client_id, done, total, seed, own,
            100 * float(content["metrics"]["global-acc"]))
    return on_reply


def personalize_nodes(grid: Grid, cfg: ExperimentConfig, node_of: dict, state: dict, clients: list, *, seed: int,
                      timeout: float) -> list[RecordDict]:
    """Stage 3: PFT on every node; replies in client order."""
    log(INFO, "PFT (seed %d): %s x %d epochs on each of %d node(s)", seed, ", ".join(cfg.pft.strategies),
        cfg.pft.epochs, len(node_of))
    arrays = to_arrays(state)
    return _send(grid, [Message(RecordDict({"arrays": arrays, "config": _study_record(cfg, seed)}), dst_node_id=n,
                                message_type=PFT) for _, n in sorted(node_of.items())], "personalization", timeout,
                 _pft_line(clients, seed))


def cross_evaluate(grid: Grid, cfg: ExperimentConfig, node_of: dict, state: dict, pft: list[RecordDict], clients: list,
                   *, seed: int, timeout: float) -> dict:
    """Stage 4: node j scores every other client's exported models; returns {(strategy, i, j): scores}."""
    arrays, messages, asked = to_arrays(state), [], []
    for j, node in sorted(node_of.items()):
        files, wanted = ConfigRecord({}), []
        for i, reply in enumerate(pft):
            if i == j:
                continue
            for key in reply["files"]:
                strategy = key.split("/", 1)[0]
                files[f"{strategy}/{clients[i].client_id}/{key.split('/', 1)[1]}"] = reply["files"][key]
                if [strategy, clients[i].client_id] not in wanted:
                    wanted.append([strategy, clients[i].client_id])
        config = _study_record(cfg, seed)
        config["models"] = json.dumps(wanted)
        messages.append(Message(RecordDict({"arrays": arrays, "config": config, "files": files}), dst_node_id=node,
                                message_type=CROSS))
        asked.append(wanted)
    index = {c.client_id: i for i, c in enumerate(clients)}
    log(INFO, "scoring (seed %d): each node scores the other clients' personalized models on its test split", seed)

    def on_reply(content: RecordDict, done: int, total: int) -> None:
        j = int(content["metrics"]["client-index"])
        log(INFO, "scoring done on %s (%d/%d nodes, seed %d): %d model(s) scored", clients[j].client_id, done, total,
            seed, len(asked[j]))

    replies = _send(grid, messages, "cross-client evaluation", timeout, on_reply)
    return {(s, index[cid], j): score for j, (wanted, reply) in enumerate(zip(asked, replies))
            for (s, cid), score in zip(wanted, json.loads(str(reply["scores"]["scores"])))}


def save_client_models(layout: RunLayout, pft: list[RecordDict], clients: list, *, seed: int) -> None:
    """The exported folders the nodes sent, at the run layout's ``clients/<strategy>/<client>/`` (atomically)."""
    for reply, client in zip(pft, clients):
        by_strategy: dict[str, dict[str, bytes]] = {}
        for key in reply["files"]:
            strategy, rel = key.split("/", 1)
            by_strategy.setdefault(strategy, {})[rel] = reply["files"][key]
        for strategy, files in by_strategy.items():
            with atomic_path(layout.client_dir(strategy, client.client_id, seed),
                             directory=True) as tmp:
                for rel, content in files.items():
                    (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                    (Path(tmp) / rel).write_bytes(content)


def _unit(cfg: ExperimentConfig, name: str, i: int, clients: list, record: dict, scores: dict, *, seed: int) -> dict:
    """Client i's record for strategy ``name``: its own numbers from node i, the others' from the cross round."""
    own, n, nan = record["row"], len(clients), float("nan")
    if own["error"]:
        row = result_row(seed, name, i, clients[i], [nan] * n, None) | NO_DISTORTION | {"error": own["error"]}
    else:
        def column(key: str, own_key: str) -> list[float]:
            return [own[own_key] if j == i else scores.get((name, i, j), {}).get(key, nan) for j in range(n)]
        accs = [own["acc_by_client"][0] if j == i else scores.get((name, i, j), {}).get("acc", nan) for j in range(n)]
        row = result_row(seed, name, i, clients[i], accs, own["final_train_loss"])
        if cfg.run.distortion:  # the pipeline's distortion_by_client, from per-split numbers
            (dl, dg), (cl, cg) = (local_global(column("distortion", "distortion_local"), i),
                                  local_global(column("cka", "cka_local"), i))
            row |= {"distortion_local": dl, "distortion_global": dg, "cka_local": cl, "cka_global": cg}
        else:
            row |= NO_DISTORTION
        row["error"] = None
    return {"row": row, "phases": record["phases"], "curves": [], "seconds": record.get("seconds"),
            "stage_seconds": record.get("stage_seconds")}


def seed_records(cfg: ExperimentConfig, strategies: list[str], clients: list, pft: list[RecordDict], scores: dict,
                 history: list[dict], *, seed: int, memory_format: str) -> list[dict]:
    """The run's records of one seed, in the pipeline's order: global-model rows, then strategy x client."""
    accs = [float(r["metrics"]["global-acc"]) for r in pft]
    rows = global_model_rows(seed, clients, [accs] * len(clients), history=history, source={"source": "fedavg"},
                             distortion=cfg.run.distortion, memory_format=memory_format)
    units = [json.loads(str(r["records"]["records"])) for r in pft]
    return rows + [_unit(cfg, name, i, clients, units[i][name], scores, seed=seed)
                   for name in strategies for i in range(len(clients))]


def write_federation(layout: RunLayout, clients: list) -> str:
    """``federation/manifest.json`` as far as the server knows it: counts, label histograms and a hash of each
    node's row indices (the indices themselves stay on the nodes); returns the federation's hash."""
    digest = hashlib.sha256(json.dumps([c.summary["indices_sha256"] for c in clients]).encode()).hexdigest()
    write_json(layout.manifest, {
        "source": "hf_lpft Flower App: each node's own data (row indices stay on the nodes)",
        "num_classes": clients[0].num_classes, "indices_sha256": digest, "clients": [c.summary for c in clients]}
        | ({"class_names": clients[0].class_names} if clients[0].class_names is not None else {}))
    return digest


def scheme_record(cfg: ExperimentConfig) -> dict:
    """The run record's partition scheme: the nodes partition, so the server records what the config asks of the
    registered scheme (each node's manifest entry holds its own counts)."""
    return {"scheme": cfg.data.scheme, "params": get_scheme(cfg.data.scheme).recorded(dataclasses.asdict(cfg.data)),
            "source": "config (the nodes partition)"}


def write_study(cfg: ExperimentConfig, layout: RunLayout, records: list[dict], strategies: dict, clients: list, *,
                timings: dict, digest: str) -> None:
    """Results, cross-client matrix, run record, report and Hub-ready folder: the pipeline's writers."""
    results, _, markdown = write_results(layout, [r["row"] for r in records],
                                         strategies={n: s.describe() for n, s in strategies.items()})
    write_cross_client(layout, results)
    engine = {"name": "flower-app", "nodes": [{"client_id": c.client_id, "hf_lpft": c.version} for c in clients]}
    write_json(layout.record, run_record(cfg, strategies, records, timings=timings, manifest_sha256=digest,
                                         client_ids=[c.client_id for c in clients], federation=scheme_record(cfg),
                                         num_processes=1,
                                         extras={"speed": speed_info(cfg, records), "engine": engine}))
    write_report(layout)
    publish_run(cfg.hub, layout.root)
    log(INFO, "Results (%d seed(s)), accuracy %%, mean (std over seeds):", len(cfg.run.seeds))
    for line in markdown.splitlines():
        if line.startswith("|"):  # the table; its legend is in summary.md
            log(INFO, "%s", line)
    log(INFO, "Outputs written to %s (results.parquet, summary.md with the legend, run_record.json)",
        layout.root.resolve())


def run_study(grid: Grid, cfg: ExperimentConfig, *, num_nodes: int = 0, timeout: float = 3600.0) -> Path:
    """The whole study on the nodes of ``grid`` (module docstring); returns the output folder."""
    strategies = preflight(cfg, engine="flower-app")  # every check the server can make, before any message
    layout = run_layout(cfg.run)
    out = prepare_folder(cfg, layout)
    write_text(layout.config, cfg.to_yaml())
    log(INFO, "%s", describe_study(cfg, out.resolve()))
    t0, timings, records = time.perf_counter(), {}, []
    mapper, clients = map_clients(grid, cfg, num_nodes=num_nodes, timeout=timeout)
    digest = write_federation(layout, clients)
    timings["federate"] = time.perf_counter() - t0
    for seed in cfg.run.seeds:
        t = time.perf_counter()
        model, history = general_fl(grid, cfg, mapper.node_of, clients, seed=seed, layout=layout, timeout=timeout)
        state = model.state_dict()
        timings[f"fedavg_seed_{seed}"], t = time.perf_counter() - t, time.perf_counter()
        pft = personalize_nodes(grid, cfg, mapper.node_of, state, clients, seed=seed, timeout=timeout)
        save_client_models(layout, pft, clients, seed=seed)
        timings[f"personalize_seed_{seed}"], t = time.perf_counter() - t, time.perf_counter()
        scores = cross_evaluate(grid, cfg, mapper.node_of, state, pft, clients, seed=seed, timeout=timeout)
        timings[f"cross_evaluate_seed_{seed}"] = time.perf_counter() - t
        records += seed_records(cfg, list(strategies), clients, pft, scores, history, seed=seed,
                                memory_format=memory_format_of(model))
    timings["total"] = time.perf_counter() - t0
    write_study(cfg, layout, records, strategies, clients, timings=timings, digest=digest)
    return out
