"""Batches: random training windows (reproducible from the sampler's state) and the
non-overlapping evaluation windows.
"""
from __future__ import annotations

import numpy as np

from steplm.data.shards import TokenShard
from steplm.errors import UserError


# ---------------------------------------------------------------------------- batches
class BatchSampler:
    """Random (B, T+1) windows of a token stream, reproducible from its generator state.

    With ``world`` ranks every rank draws the same global batch of world·B windows and keeps its own
    slice, so N ranks see exactly the rows one process with micro-batch N·B would."""

    def __init__(self, shard: TokenShard, seq_len: int, micro_batch: int, seed: int, rank: int = 0, world: int = 1):
        if len(shard) < seq_len + 1:  # a window is seq_len inputs and the target after the last
            raise UserError(f"train.seq_len: the training split has {len(shard)} tokens, fewer than one window "
                            f"of train.seq_len + 1 = {seq_len + 1}; use more data or a shorter train.seq_len")
        self.shard, self.seq_len, self.micro_batch = shard, seq_len, micro_batch
        self.rank, self.world = rank, world
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self._arange = np.arange(seq_len + 1)

    def next(self):
        """(inputs, targets), both int64 torch tensors of shape (B, T). Every window start from 0 to
        len - (T+1), the last whose window fits, is drawn with the same probability."""
        import torch
        n_starts = len(self.shard) - self.seq_len  # starts 0 .. n_starts - 1; integers' high is exclusive
        starts = self.rng.integers(0, n_starts, size=self.micro_batch * self.world)
        starts = starts[self.rank * self.micro_batch:(self.rank + 1) * self.micro_batch]
        window = torch.from_numpy(self.shard.tokens[starts[:, None] + self._arange].astype(np.int64))  # (B, T+1)
        return window[:, :-1], window[:, 1:]

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict):
        self.rng.bit_generator.state = state["rng"]


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """Non-overlapping (N, seq_len+1) windows from the start of the stream (each shares one token with
    the next): N = the most whole windows of ``seq_len`` scored tokens, at most ``max_tokens`` tokens in
    all. Raises UserError (naming --data, --max-tokens) when no whole window fits."""
    n = (len(tokens) - 1) // seq_len
    if n == 0:
        raise UserError(f"--data: only {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
    if max_tokens:
        if max_tokens < seq_len:
            raise UserError(f"--max-tokens: {max_tokens} is less than one window of {seq_len} tokens; raise it "
                            f"or lower --seq-len")
        n = min(n, max_tokens // seq_len)
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)
    return np.asarray(tokens[idx], dtype=np.int64)
