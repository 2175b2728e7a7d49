"""hf_lpft: personalized fine-tuning (LP-FT and its rivals) after FedAvg in heterogeneous federated learning.

Paper: Chen et al., "A Closer Look at Personalized Fine-Tuning in Heterogeneous Federated Learning",
arXiv 2511.12695; LP-FT: Kumar et al., ICLR 2022, arXiv 2202.10054.
"""

__version__ = "0.1.0"

__all__ = ["load_personalized", "predict"]


def __getattr__(name: str):
    """``hf_lpft.load_personalized`` / ``hf_lpft.predict`` without importing torch/peft at ``import hf_lpft``."""
    if name == "load_personalized":
        from hf_lpft.hub.load import load_personalized

        return load_personalized
    if name == "predict":
        from hf_lpft.hub.load import predict

        return predict
    raise AttributeError(f"module 'hf_lpft' has no attribute {name!r}")
