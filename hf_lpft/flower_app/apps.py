"""``server_app`` and ``client_app``: the components the Flower App's ``pyproject.toml`` names.

Message types (one handler each): ``query`` (who is this node), ``train`` / ``evaluate`` (a general-FL
round: local training, accuracy of the global model), ``train.pft`` (personalize every strategy on the
node's data), ``evaluate.cross`` (score other clients' personalized models on the node's test split).
Every message carries the study config and the seed, so a node needs only its node config.

A SuperNode runs every message in a fresh process that imports this module: the server, the pipeline and
peft are therefore imported inside the handlers that need them, not here (seconds per general-FL message).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from hf_lpft.federated.flower import evaluate_reply, train_reply
from hf_lpft.flower_app.node import Node, describe_reply, load_node, skeleton, study_of
from hf_lpft.run.flower_engine import local_training

server_app = ServerApp()
client_app = ClientApp()

# Per process: a node's data and model, loaded on its first message (the simulation keeps its workers
# between messages; a SuperNode starts one process per message, so this is then per message).
_NODES: dict[tuple, tuple[Node, Accelerator, torch.nn.Module]] = {}


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    import datasets

    from hf_lpft.flower_app.server import run_study, study_config

    datasets.disable_progress_bars()  # the ServerApp's output is the run's log stream: no progress bars in it
    rc = context.run_config
    run_study(grid, study_config(rc), num_nodes=int(rc.get("num-nodes", 0)), timeout=float(rc.get("timeout", 3600)))


def _node(msg: Message, context: Context) -> tuple[Node, int, Accelerator, torch.nn.Module]:
    cfg, seed = study_of(msg.content["config"])
    key = (cfg.to_yaml(), tuple(sorted(context.node_config.items())))
    if key not in _NODES:
        if cfg.run.num_threads:
            torch.set_num_threads(cfg.run.num_threads)
        node = load_node(cfg, dict(context.node_config))
        accelerator = Accelerator()
        _NODES[key] = (node, accelerator, skeleton(cfg, node.num_classes).to(accelerator.device))
    node, accelerator, model = _NODES[key]
    return node, seed, accelerator, model


@client_app.query()
def describe(msg: Message, context: Context) -> Message:
    node, _, _, _ = _node(msg, context)
    return describe_reply(msg, node)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    node, seed, accelerator, model = _node(msg, context)
    return train_reply(msg, model, node.client, node.index, training=local_training(node.cfg), seed=seed,
                       accelerator=accelerator)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    node, _, accelerator, model = _node(msg, context)
    return evaluate_reply(msg, model, node.client, node.index, device=accelerator.device)


@client_app.train("pft")
def personalize(msg: Message, context: Context) -> Message:
    from hf_lpft.flower_app.node_pft import personalize_reply

    node, seed, accelerator, _ = _node(msg, context)
    return personalize_reply(msg, node, seed, accelerator)


@client_app.evaluate("cross")
def cross(msg: Message, context: Context) -> Message:
    from hf_lpft.flower_app.node_pft import cross_reply

    node, seed, accelerator, _ = _node(msg, context)
    return cross_reply(msg, node, seed, accelerator)
