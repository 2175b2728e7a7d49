"""Running a study: ``preflight`` (every check before heavy work)."""
