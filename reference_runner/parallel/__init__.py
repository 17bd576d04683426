"""Tensor and data parallelism: the layout (`state`), its collectives, and DP attention."""
