"""Preview a federation without training: load, federate and write its ``federation/`` folder.

The top of ``hf_lpft.data``: it uses ``load`` (the source dataset), ``federate`` (partition, manifest) and
``stats`` (the client-sample grid), and nothing below imports it back.
"""

from __future__ import annotations

from pathlib import Path

from hf_lpft.data.federate import federate_from_config, save_manifest
from hf_lpft.data.load import builtin_options, load_from_config
from hf_lpft.data.stats import plot_client_samples


def preview_federation(data, output_dir: str | Path, *, builtin_kwargs: dict | None = None,
                       federated: tuple | None = None):
    """Load ``data.dataset``, federate it as ``data`` (a DataConfig) says and write ``federation/`` files.

    Writes ``manifest.json``, ``stats.json``, ``label_heatmap.png`` and (image data) ``client_samples.png``
    under ``output_dir/federation``; trains nothing. ``federated``: the (shifted dataset, federation) pair
    already built and checked (``hf_lpft.run.preflight.federation_checked``). Returns the Federation.
    """
    if federated is not None:
        shifted, fed = federated
    else:
        kwargs = builtin_kwargs if builtin_kwargs is not None else builtin_options(data)
        ds = load_from_config(data, builtin_kwargs=kwargs)
        shifted, fed = federate_from_config(ds, data)
    folder = Path(output_dir) / "federation"
    if not getattr(data, "text_column", None):  # first: a sample image that cannot be decoded fails before any file
        plot_client_samples(shifted, fed, folder / "client_samples.png", image_column=data.image_column,
                            image_size=data.image_size, label_column=data.label_column)
    save_manifest(fed, folder / "manifest.json")
    return fed
