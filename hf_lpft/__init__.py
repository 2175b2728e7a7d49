"""hf_lpft: personalized fine-tuning (LP-FT and its rivals) after FedAvg in heterogeneous federated learning.

Paper: Chen et al., "A Closer Look at Personalized Fine-Tuning in Heterogeneous Federated Learning",
arXiv 2511.12695; LP-FT: Kumar et al., ICLR 2022, arXiv 2202.10054.
"""

__version__ = "0.1.0"
