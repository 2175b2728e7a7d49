"""``python -m hf_lpft.flower_app``: print the Flower App folder (for ``flwr run <folder> ...``)."""

from hf_lpft.flower_app import APP_DIR

print(APP_DIR)
