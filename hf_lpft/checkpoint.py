"""Resume points: FedAvg round checkpoints and one record per (seed, strategy, client) unit.

Every write is atomic (temporary name, then rename), so a kill at any moment leaves either the previous
complete checkpoint or the new one, never a half-written file. A unit's record is written only after its
model export, so "record exists" means "unit complete".

The folder: ``checkpoints/seed_<s>/fedavg/`` (the latest round) and
``checkpoints/seed_<s>/units/<strategy>/<client_id>.json``, always with the seed level; a run reaches it as
``RunLayout.checkpoints`` (``hf_lpft.layout`` builds on this module).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file

from hf_lpft.io import atomic_path, write_json

_SEP = "::"  # client id / state key separator inside client_bn.safetensors


class SavedFLState(NamedTuple):
    """A general-FL algorithm's saved state: the server's tensors and each client's, by client id."""

    server: dict[str, torch.Tensor]
    clients: dict[str, dict[str, torch.Tensor]]


class RoundCheckpoint(NamedTuple):
    """A seed's latest round checkpoint: the global state after ``rounds`` rounds and their history."""

    state: dict[str, torch.Tensor]
    history: list[dict]

    @property
    def rounds(self) -> int:
        """How many rounds the checkpoint holds."""
        return len(self.history)


class Checkpoints:
    """The ``checkpoints/`` folder of the run (or stored FedAvg result) at ``output_dir``."""

    def __init__(self, output_dir: str | Path):
        self.root = Path(output_dir) / "checkpoints"

    def _fedavg_dir(self, seed: int) -> Path:
        return self.root / f"seed_{seed}" / "fedavg"

    def save_round(self, seed: int, state: dict, history: list[dict], *, client_bn: dict | None = None,
                   fl_state=None) -> None:
        """Overwrite the seed's FedAvg checkpoint with the global state after ``len(history)`` rounds, and
        with FedBN the clients' own BatchNorm tensors (``{client_id: state}``), and with a stateful general-FL
        algorithm its server and client state (``FLState``, e.g. SCAFFOLD's control variates) in the same
        atomic folder."""
        with atomic_path(self._fedavg_dir(seed), directory=True) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / "state.safetensors"))
            if client_bn is not None:
                flat = {f"{cid}{_SEP}{k}": v.detach().contiguous().cpu() for cid, s in client_bn.items() for k,
                        v in s.items()}
                save_file(flat, str(tmp / "client_bn.safetensors"))
            if fl_state is not None:
                flat = {f"server{_SEP}{k}": v for k, v in fl_state.server.items()}
                flat |= {f"client{_SEP}{cid}{_SEP}{k}": v for cid, s in fl_state.clients.items() for k, v in s.items()}
                save_file({k: v.detach().contiguous().cpu() for k, v in flat.items()},
                          str(tmp / "fl_state.safetensors"))
            (tmp / "history.json").write_text(json.dumps(history))

    def load_round(self, seed: int) -> RoundCheckpoint | None:
        """The latest FedAvg checkpoint of ``seed`` (state and history), or None."""
        folder = self._fedavg_dir(seed)
        if not (folder / "history.json").is_file():
            return None
        return RoundCheckpoint(load_file(str(folder / "state.safetensors")),
                               json.loads((folder / "history.json").read_text()))

    def rounds_done(self, seed: int) -> int:
        """How many FedAvg rounds the seed's checkpoint holds (0 without one); reads only its history."""
        path = self._fedavg_dir(seed) / "history.json"
        return len(json.loads(path.read_text())) if path.is_file() else 0

    def load_client_bn(self, seed: int) -> dict[str, dict[str, torch.Tensor]] | None:
        """The clients' own BatchNorm tensors saved with the latest round (FedBN), or None."""
        path = self._fedavg_dir(seed) / "client_bn.safetensors"
        if not path.is_file():
            return None
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in load_file(str(path)).items():
            cid, _, key = name.rpartition(_SEP)  # state keys never hold the separator; client ids might
            out.setdefault(cid, {})[key] = tensor
        return out

    def load_fl_state(self, seed: int) -> SavedFLState | None:
        """The general-FL algorithm's state saved with the latest round (server and per-client tensors; the
        caller wraps them in the algorithm's ``FLState``), or None."""
        path = self._fedavg_dir(seed) / "fl_state.safetensors"
        if not path.is_file():
            return None
        out = SavedFLState({}, {})
        for name, tensor in load_file(str(path)).items():
            kind, _, rest = name.partition(_SEP)
            if kind == "server":
                out.server[rest] = tensor
            else:  # client::<id>::<key>: state keys never hold the separator; client ids might
                cid, _, key = rest.rpartition(_SEP)
                out.clients.setdefault(cid, {})[key] = tensor
        return out

    def unit_record(self, seed: int, strategy: str, client_id: str) -> Path:
        """Where the record of the (seed, strategy, client) unit is (it exists once the unit is complete)."""
        return self.root / f"seed_{seed}" / "units" / strategy / f"{client_id}.json"

    def save_unit(self, seed: int, strategy: str, client_id: str, record: dict) -> None:
        write_json(self.unit_record(seed, strategy, client_id), record)

    def load_unit(self, seed: int, strategy: str, client_id: str) -> dict | None:
        path = self.unit_record(seed, strategy, client_id)
        return json.loads(path.read_text()) if path.is_file() else None


def resume_summary(layout, *, rounds: int | None, strategies: list[str], client_ids: list[str]) -> str:
    """One line saying what a resumed run reuses from the checkpoints of ``layout`` (the run's
    ``hf_lpft.layout.RunLayout``): the FedAvg rounds of each seed (``rounds`` None: the global model is given, no
    FedAvg) and the finished (seed, strategy, client) units per strategy. It counts what the pipeline then
    loads: round checkpoints and unit records."""
    ckpt, seeds = layout.checkpoints, layout.seeds
    finished = {s: sum(ckpt.unit_record(seed, s, c).is_file() for seed in seeds for c in client_ids)
                for s in strategies}
    fedavg = {seed: ckpt.rounds_done(seed) for seed in seeds} if rounds is not None else {}
    if not any(finished.values()) and not any(fedavg.values()):
        return f"resuming {layout.root}: nothing finished to reuse, starting from the beginning"
    each = len(seeds) * len(client_ids)
    units = (f"{sum(finished.values())} of {each * len(strategies)} finished personalization units ("
             + ", ".join(f"{s} {n}/{each}" for s, n in finished.items()) + ")")
    if rounds is None:
        return f"resuming {layout.root}: reusing {units}; the given global model is loaded again, the rest runs now"
    rounds_text = ", ".join(f"{n} of {rounds} FedAvg rounds" + (f" (seed {seed})" if len(seeds) > 1 else "")
                            for seed, n in fedavg.items())
    return f"resuming {layout.root}: reusing {rounds_text} and {units}; the rest runs now"
