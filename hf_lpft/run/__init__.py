"""Stages of a run that sit between the data and the personalization units (global model, checks)."""
