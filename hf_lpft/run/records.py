"""The run's records, built the same way by both drivers (``hf_lpft.pipeline`` and the Flower App's server):
a seed's ``global_model`` records and ``run_record.json`` (run_info / train_info / meta_info).

A record is ``{"row": <results.parquet row>, "phases", "curves", ...}``; the ``global_model`` records also
carry the seed's general-FL history, where θ_G came from and its memory format, which ``run_record.json``
reads back. Each driver adds the facts only its engine knows (:func:`run_record`'s ``extras``).
"""

from __future__ import annotations

from hf_lpft.config import ExperimentConfig
from hf_lpft.data.preprocess import preprocessing_for
from hf_lpft.evaluation.clients import NO_DISTORTION, SELF_DISTORTION, EvalSettings, result_row
from hf_lpft.io import meta_info
from hf_lpft.run.general_fl import describe_general_fl
from hf_lpft.strategies import Strategy


def global_model_rows(seed: int, clients: list, accs: list[list[float]], *, history: list[dict], source: dict,
                      distortion: bool, memory_format: str, evaluation: EvalSettings | None = None) -> list[dict]:
    """The ``global_model`` records of ``seed``, one per client: record i scores the model client i personalizes
    from (``accs[i]``: its accuracy on every client's test split, or on client i's sample of them when
    ``evaluation`` samples, the same sample as every strategy's row i); Δ = 0 and CKA = 1 by definition when
    ``distortion`` is on (NaN otherwise). The first record carries the seed's ``history`` and ``source``."""
    own, n = SELF_DISTORTION if distortion else NO_DISTORTION, len(clients)
    samples = [evaluation.sample(n, i, seed) if evaluation else None for i in range(n)]
    return [{"row": result_row(seed, "global_model", i, c, accs[i], None, sample=samples[i]) | own | {"error": None},
             "phases": [], "curves": [], "fedavg_history": history if i == 0 else None,
             "global_source": source if i == 0 else None, "memory_format": memory_format}
            for i, c in enumerate(clients)]


def batchnorm_record(cfg: ExperimentConfig, strategies: dict[str, Strategy]) -> dict:
    """The BatchNorm choices of the run, for ``run_record.json``."""
    return {"fedavg": cfg.fedavg.bn,
            "global_model_rows": ("theta_G with client i's own BatchNorm tensors, evaluated on every client"
                                  if cfg.fedavg.bn == "local" else "theta_G (BatchNorm averaged)"),
            "pft_phases": {n: {p.name: p.bn for p in s.phases()} for n, s in strategies.items()}}


def train_info(records: list[dict]) -> dict:
    """The run record's train_info: FedAvg history per seed, and each unit's phases and seconds."""
    return {"fedavg_history": {r["row"]["seed"]: r["fedavg_history"] for r in records if r.get("fedavg_history")},
            "personalization": [{k: r["row"][k] for k in ("seed", "strategy", "client_id", "error")}
                                | {"phases": r["phases"], "seconds": r.get("seconds"),
                                   "stage_seconds": r.get("stage_seconds")}
                                for r in records if r["row"]["strategy"] != "global_model"]}


def speed_info(cfg: ExperimentConfig, records: list[dict]) -> dict:
    """The speed settings both engines honour: general FL's evaluation interval and the models' memory format."""
    return {"fedavg_eval_every": cfg.fedavg.eval_every,
            "memory_format": next((r["memory_format"] for r in records if "memory_format" in r), None)}


def global_eval_record(cfg: ExperimentConfig, records: list[dict]) -> dict | None:
    """How Global was measured, for ``run_record.json`` when it was estimated on a sample (None when exact)."""
    row = next((r["row"] for r in records if "global_sample" in r["row"]), None)
    if row is None:
        return None
    k, others = len(row["global_sample"]), len(row["acc_by_client"]) - 1
    return {"global": "estimate", "clients_scored_per_model": k, "other_clients": others,
            "run.global_eval_clients": cfg.run.global_eval_clients,
            "text": f"Global is an estimate on {k} of the {others} other clients' test splits per model: a seeded "
                    "uniform sample without replacement from (run seed, client index), the same for every strategy "
                    "and the global model's row; results rows carry global_acc_se (finite-population corrected) and "
                    "global_sample; C-Std (matrix) and Worst (matrix) are not reported (NaN)"}


def run_record(cfg: ExperimentConfig, strategies: dict[str, Strategy], records: list[dict], *, timings: dict,
               manifest_sha256: str, client_ids: list[str], federation: dict, num_processes: int,
               extras: dict) -> dict:
    """``run_record.json``: run_info (what ran, timings, provenance; then the engine's ``extras``), train_info
    (histories, phases) and meta_info (package versions, git). ``federation``: the partition scheme and the
    parameters it ran with (``federation/manifest.json`` has every client's rows)."""
    run_info = {"seeds": cfg.run.seeds, "timings_seconds": timings, "manifest_sha256": manifest_sha256,
                "clients": client_ids, "federation": federation, "resumed": cfg.run.resume,
                "num_processes": num_processes,
                "strategies": {n: s.describe() for n, s in strategies.items()},
                "batchnorm": batchnorm_record(cfg, strategies), "general_fl": describe_general_fl(cfg),
                "global_model": {r["row"]["seed"]: r["global_source"] for r in records if r.get("global_source")},
                "preprocessing": preprocessing_for(cfg).to_dict()}
    if (estimate := global_eval_record(cfg, records)) is not None:  # exact runs keep their keys as before
        run_info["global_eval"] = estimate
    return {"run_info": run_info | extras, "train_info": train_info(records), "meta_info": meta_info()}
