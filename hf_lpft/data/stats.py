"""Statistics of a federation, saved beside its manifest: sizes, label histograms, skew, a heatmap.

Skew is measured against the pooled label distribution of all clients: the total-variation distance
``TV_i = 0.5 * sum_k |p_i(k) - p(k)|`` of each client's label distribution (train + test, after any
label permutation) from the pooled one. Under iid partitions TV is only sampling noise (close to 0);
it grows towards 1 - 1/K as clients hold fewer classes. The mean over clients is the statistic the
tests use to show that a large Dirichlet alpha approaches iid. Classes are shown by name (the dataset's
class names, else their indices).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from hf_lpft.io import atomic_path, write_text

logger = logging.getLogger(__name__)

HEATMAP_MAX = 200  # clients or classes above this: no heatmap (it would be unreadable), said in the log


def label_matrix(fed) -> np.ndarray:
    """Clients x classes counts over each client's train + test split."""
    return np.asarray([np.add(c.label_hist_train, c.label_hist_test) for c in fed.clients], dtype=np.int64)


def label_tv(fed) -> list[float]:
    """Per-client total-variation distance between its label distribution and the pooled one."""
    m = label_matrix(fed).astype(float)
    pooled = m.sum(axis=0) / max(m.sum(), 1.0)
    per = m / np.maximum(m.sum(axis=1, keepdims=True), 1.0)
    return (0.5 * np.abs(per - pooled).sum(axis=1)).tolist()


def federation_stats(fed) -> dict:
    """Sizes, label histograms and skew of every client, plus a summary."""
    sizes = np.asarray([len(c.train_indices) + len(c.test_indices) for c in fed.clients])
    tv = label_tv(fed)
    m = label_matrix(fed)
    clients = [{"client_id": c.client_id, "n_train": len(c.train_indices), "n_test": len(c.test_indices),
                "n_classes_present": int((row > 0).sum()), "label_tv": round(t, 4),
                "label_hist_train": c.label_hist_train, "label_hist_test": c.label_hist_test, "shift": c.shift}
               for c, row, t in zip(fed.clients, m, tv)]
    summary = {"num_clients": len(fed.clients), "num_classes": fed.num_classes, "rows_used": int(sizes.sum()),
               "rows_in_source": fed.num_rows, "size_min": int(sizes.min()), "size_max": int(sizes.max()),
               "size_mean": float(sizes.mean()), "size_cv": float(sizes.std() / sizes.mean()),
               "label_tv_mean": float(np.mean(tv)), "classes_per_client_mean": float((m > 0).sum(axis=1).mean()),
               "class_names": fed.label_names()}
    return {"scheme": fed.scheme, "params": fed.params, "seed": fed.seed, "summary": summary, "clients": clients}


def plot_label_heatmap(fed, path: str | Path) -> Path | None:
    """Clients x classes heatmap of example counts (train + test), written atomically; None if too large."""
    m = label_matrix(fed)
    if max(m.shape) > HEATMAP_MAX:
        logger.info("no label heatmap: %d clients x %d classes exceeds %d", *m.shape, HEATMAP_MAX)
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = label_heatmap_figure(fed)
    FigureCanvasAgg(fig)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def label_heatmap_figure(fed):
    """The heatmap as a matplotlib ``Figure``: one row per client, one column per class (named), counts of
    train + test examples in the cells when they fit."""
    from matplotlib.figure import Figure

    m, names = label_matrix(fed), fed.label_names()
    fig = Figure(figsize=(min(2 + 0.35 * m.shape[1], 24), min(1.8 + 0.3 * m.shape[0], 30)), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(m, aspect="auto", cmap="viridis")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_yticks(range(m.shape[0]), [c.client_id for c in fed.clients], fontsize=7)
    if m.shape[1] <= 40:
        long = max(len(n) for n in names) > 3
        ax.set_xticks(range(m.shape[1]), [n[:14] for n in names], fontsize=7, rotation=45 if long else 0,
                      ha="right" if long else "center")
    if m.size <= 400:
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=6, color="white" if v < m.max() / 2 else "black")
    ax.set_title(f"{fed.scheme}: examples per client and class (train + test)")
    fig.colorbar(im, ax=ax, label="examples (train + test)")
    return fig


def format_table(fed) -> str:
    """A per-client plain-text table: sizes, classes present, label TV and shift."""
    stats = federation_stats(fed)
    head = f"{'client':<28s} {'train':>6s} {'test':>6s} {'classes':>7s} {'labelTV':>7s}  shift"
    lines = [head, "-" * len(head)]
    for c in stats["clients"]:
        shift = ", ".join(f"{k}={v}" for k, v in c["shift"].items() if k != "label_map")
        if "label_map" in c["shift"]:
            moved = {i: j for i, j in enumerate(c["shift"]["label_map"]) if i != j}
            shift = ", ".join(filter(None, [shift, f"labels {moved}"]))
        lines.append(f"{c['client_id'][:28]:<28s} {c['n_train']:>6d} {c['n_test']:>6d} {c['n_classes_present']:>7d} "
                     f"{c['label_tv']:>7.3f}  {shift or '-'}")
    s = stats["summary"]
    lines.append(f"{s['num_clients']} clients, {s['rows_used']}/{s['rows_in_source']} rows, sizes {s['size_min']}-"
                 f"{s['size_max']} (cv {s['size_cv']:.2f}), mean label TV {s['label_tv_mean']:.3f}")
    return "\n".join(lines)


def save_stats(fed, folder: str | Path) -> dict:
    """Write ``stats.json`` and ``label_heatmap.png`` into ``folder``; return the statistics."""
    folder = Path(folder)
    stats = federation_stats(fed)
    write_text(folder / "stats.json", json.dumps(stats, indent=1) + "\n")
    plot_label_heatmap(fed, folder / "label_heatmap.png")
    return stats


def spread_samples(indices, labels, per_client: int) -> list[int]:
    """Up to ``per_client`` of a client's training ``indices`` spread over its classes: the first image of
    each class it holds (most frequent classes first), then the second of each, and so on. ``labels``: the
    class of each index, in the same order."""
    by_class: dict = {}
    for index, label in zip(indices, labels):
        by_class.setdefault(label, []).append(int(index))
    queues = sorted(by_class.values(), key=len, reverse=True)
    picked = []
    for depth in range(max((len(q) for q in queues), default=0)):
        picked += [q[depth] for q in queues if depth < len(q)]
        if len(picked) >= per_client:
            break
    return picked[:per_client]


def plot_client_samples(ds, fed, path: str | Path, *, image_column: str, image_size: int, per_client: int = 8,
                        max_clients: int = 20, label_column: str = "label") -> Path:
    """A grid of training images of each client (as the clients see them, shifts applied): one row per
    client, labelled with its id, spread over the classes it holds (:func:`spread_samples`), each image
    titled with its class name (the federation's, else the index)."""
    from datasets import Image
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hf_lpft.data.images import decode_image

    feature = ds.features[image_column]
    clients = fed.clients[:max_clients]
    names = fed.label_names()
    all_labels = list(ds[label_column]) if label_column in ds.column_names else None
    fig = Figure(figsize=(1.1 * per_client + 1.2, 1.25 * len(clients) + 0.3), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(clients), per_client, squeeze=False))
    for row, c in zip(axes, clients):
        train = list(c.train_indices)
        chosen = (spread_samples(train, [all_labels[i] for i in train], per_client) if all_labels is not None
                  else train[:per_client])
        rows = ds.select(chosen).select_columns([image_column]).cast_column(image_column, Image(decode=False))
        labels = [all_labels[i] for i in chosen] if all_labels is not None else [None] * len(rows)
        for k, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if k < len(rows):
                image = decode_image(feature, rows[k][image_column], row=chosen[k], column=image_column)
                ax.imshow(np.asarray(image.convert("RGB").resize((image_size, image_size))))
                label = labels[k]
                name = names[label] if isinstance(label, int) and 0 <= label < len(names) else label
                ax.set_title(str(name)[:12], fontsize=7, pad=2)
            else:
                ax.axis("off")
        row[0].set_ylabel(str(c.client_id)[:16], fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle("training images per client (row), one per class it holds, then again", fontsize=9)
    FigureCanvasAgg(fig)
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)
