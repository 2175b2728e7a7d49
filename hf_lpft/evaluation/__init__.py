"""Evaluation: accuracy metrics (also as offline ``evaluate`` metrics), feature distortion, run reports,
and the Section 4 theory simulator."""
