"""The training loop and what it owns: run state, checkpoints, guards, processes."""
