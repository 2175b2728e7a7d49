"""Studies: sweeps over the pipeline (each point one run of hf_lpft.pipeline), tabulated and plotted."""
