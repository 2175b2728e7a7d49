"""Stages of a run around the personalization units: ``preflight`` (every check before heavy work) and
``pretrain`` (the global model: FedAvg, the FedAvg cache, or a given model)."""
