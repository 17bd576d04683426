"""What a check runs: scenarios, request workloads, dynamic-shape mixes, checkpoints, and the
transformers oracle that gives the independent baseline."""
