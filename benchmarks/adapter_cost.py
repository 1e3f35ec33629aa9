"""Where a STEP stage's adapters spend their time: the final stage of a 2-stage run at the
replication shape (vocabulary 8192, batch 16 x 256, 4 frozen + 4 new layers), timed four ways in
one process with interleaved rounds (see throughput.py), against vanilla of the same depth:

- ``adapters``: steplm as it trains (frozen bf16 linears with rank-r LoRA, lora.py);
- ``merge only``: the same, but each frozen linear forms W + s·B·A and runs its two big GEMMs
  without the four rank-r products (x·Aᵀ, g·B, and A's and B's gradients, which it leaves empty, so
  that, as in ``no adapters``, the optimizer and clipping skip the adapters). Timing only: the
  adapters do not learn. adapters - merge only = the rank-r products and the adapters' share of the
  optimizer step and clipping;
- ``no adapters``: rank 0, the frozen GEMMs alone (throughput.without_adapters): the floor no
  adapter implementation can beat. merge only - no adapters = forming W + s·B·A and the custom
  function's own casts and calls;
- ``vanilla``: every layer trainable.

    python benchmarks/adapter_cost.py [--rank 8] [--rounds 8] [--json benchmarks/results/adapter_cost.json]
"""
from __future__ import annotations

import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (REPL, WARMUP, interleaved, median, stage_ab_args, steplm_trainer, trainer_step,  # noqa: E402
                        with_lora_function, without_adapters)

from steplm.passes import lora  # noqa: E402
from steplm.devices import cpu_name  # noqa: E402


class MergeOnly(torch.autograd.Function):
    """y = x·(W + s·B·A)ᵀ and dx = g·(W + s·B·A), as lora._LoRALinearFunction computes them, with
    no gradient for A and B instead of the four rank-r products. For timing only."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dtype: torch.dtype):
        ctx.x_shape, ctx.x_dtype, ctx.scaling, ctx.dtype = x.shape, x.dtype, scaling, dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        y = x2 @ lora._merged(weight, lora_A, lora_B, scaling, dtype).t()
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.save_for_backward(weight, lora_A, lora_B)
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        weight, lora_A, lora_B = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(ctx.dtype)
        grad_x = (g @ lora._merged(weight, lora_A, lora_B, ctx.scaling, ctx.dtype)).reshape(ctx.x_shape)
        return grad_x.to(ctx.x_dtype), None, None, None, None, None, None


def main():
    a = stage_ab_args(__doc__)
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    step2 = {"method": "step", "step.n_stages": 2, "lora.rank": a.rank}
    trainers = {
        "adapters": steplm_trainer(REPL, tmp, "a", **step2),
        "merge only": with_lora_function(steplm_trainer(REPL, tmp, "m", **step2), MergeOnly),
        "no adapters": without_adapters(steplm_trainer(REPL, tmp, "f", **step2)),
        "vanilla": steplm_trainer(REPL, tmp, "v"),
    }
    steps = {k: trainer_step(t) for k, t in trainers.items()}
    for fn in steps.values():
        for _ in range(WARMUP):
            fn()
    times = interleaved(steps, a.rounds, a.steps, log=True)
    sec = {k: median(v) for k, v in times.items()}
    van = sec["vanilla"]
    res = {"date": datetime.date.today().isoformat(), "machine": cpu_name(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "rank": a.rank, "rounds": a.rounds, "steps": a.steps,
           "layers_per_stage": trainers["adapters"].layers_per_stage,
           "step_seconds_median": sec,
           "vs_vanilla": {k: v / van for k, v in sec.items()},
           "vs_vanilla_per_round_range": {k: [f(x / y for x, y in zip(times[k], times["vanilla"])) for f in (min, max)]
                                          for k in sec},
           "share_of_vanilla_step": {"rank-r products and their optimizer step": (sec["adapters"] - sec["merge only"]) / van,
                                     "merge and function overhead": (sec["merge only"] - sec["no adapters"]) / van}}
    print(f"STEP-2 final stage, V8192 batch 16x256, LoRA rank {a.rank}, {res['threads']} threads, {res['machine']}")
    for k in sec:
        lo, hi = res["vs_vanilla_per_round_range"][k]
        print(f"{k:<12} {sec[k]:.3f} s  {res['vs_vanilla'][k]:.3f}x vanilla  (rounds {lo:.3f}-{hi:.3f})")
    for k, v in res["share_of_vanilla_step"].items():
        print(f"{k}: {100 * v:.1f} % of a vanilla step")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
