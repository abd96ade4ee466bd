"""Evaluation: held-out sampling, metrics with confidence intervals, results files, grids and curves."""
