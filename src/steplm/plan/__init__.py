"""The plan of a run: memory (Eq. 1, 2, 4, 5), the Eq. 3 solver, stages and FLOPs. No torch."""
