"""Evaluation: accuracy metrics and the Section 4 theory simulator."""
