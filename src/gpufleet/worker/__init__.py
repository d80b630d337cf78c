"""GPU discovery, the per-GPU worker processes and the task runtime."""
