"""FedAvg (McMahan et al. 2017, arXiv 1602.05629): plain local training, example-weighted average of the weights.

The defaults of :class:`~hf_lpft.algorithms.base.GeneralFL` are FedAvg's: no local term, no state,
float64 example-weighted sums in client order cast back once (integer buffers from the first sampled client).
"""

from __future__ import annotations

from hf_lpft.algorithms.base import GeneralFL, register_algorithm


@register_algorithm
class FedAvg(GeneralFL):
    name = "fedavg"
    display_name = "FedAvg"
    description = "Example-weighted average of the clients' locally trained weights (McMahan et al. 2017)."
