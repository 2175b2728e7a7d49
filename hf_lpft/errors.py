"""The package's errors for a bad setting and a dataset that cannot be federated, in the bottom layer so that
every layer can raise them.

``hf_lpft.config`` re-exports it (``from hf_lpft.config import ConfigError`` is the same class); layers that
must not import the config (``layout``, ``evaluation``, ``hub``, ``data``) import it from here.
"""


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


class FederationError(ValueError):
    """The dataset cannot be federated as asked."""
