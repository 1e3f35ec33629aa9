"""A/B of the LoRA function's layout in the whole STEP step: the previous function, which stacked
the rank-r products x·Aᵀ and g·B into the big GEMMs (x·[W_eff; A]ᵀ, g·[W_eff, B]), against steplm's
current one (separate rank-r products, input cast before the call), and the adapter-free floor; the
final stage of a 2-stage run at the replication shape, one process, interleaved rounds.

    python benchmarks/lora_stacking_ab.py [--rank 8] [--rounds 8] [--json benchmarks/results/lora_stacking_ab_r8.json]
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


class Stacked(torch.autograd.Function):
    """The previous _LoRALinearFunction (before 2026-12-03): same y and gradients, with x·Aᵀ and g·B
    computed as extra columns of the big GEMMs, and the input cast inside."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dtype: torch.dtype):
        ctx.x_shape, ctx.x_dtype, ctx.scaling, ctx.dtype = x.shape, x.dtype, scaling, dtype
        out = weight.shape[0]
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        y_xa = x2 @ torch.cat([lora._merged(weight, lora_A, lora_B, scaling, dtype), lora_A.to(dtype)]).t()
        y, xa = y_xa[:, :out], y_xa[:, out:].contiguous()
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.save_for_backward(x2, xa, weight, lora_A, lora_B)
        return y.reshape(*x.shape[:-1], out)

    @staticmethod
    def backward(ctx, grad_y):
        x2, xa, weight, lora_A, lora_B = ctx.saved_tensors
        s, n_in, dtype = ctx.scaling, weight.shape[1], ctx.dtype
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
        w = lora._merged(weight, lora_A, lora_B, s, dtype)
        gw_gb = g @ torch.cat([w, lora_B.to(dtype)], 1)
        gb = gw_gb[:, n_in:]
        grad_x = gw_gb[:, :n_in].reshape(ctx.x_shape).to(ctx.x_dtype)
        grad_bias = g.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, (gb.t() @ x2).mul_(s), (xa.t() @ g).mul_(s).t(), None, None


def main():
    a = stage_ab_args(__doc__)
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    step2 = {"method": "step", "step.n_stages": 2, "lora.rank": a.rank}
    old = with_lora_function(steplm_trainer(REPL, tmp, "s", **step2), Stacked, cast_input=False)
    steps = {"stacked (previous)": trainer_step(old),
             "separate (steplm)": trainer_step(steplm_trainer(REPL, tmp, "c", **step2)),
             "no adapters": trainer_step(without_adapters(steplm_trainer(REPL, tmp, "f", **step2)))}
    for fn in steps.values():
        for _ in range(WARMUP):
            fn()
    times = interleaved(steps, a.rounds, a.steps, log=True)
    ref = times["stacked (previous)"]
    print(f"STEP-2 final stage, V8192 batch 16x256, LoRA rank {a.rank}: step time vs the stacked function")
    for k, v in times.items():
        per = [x / y for x, y in zip(v, ref)]
        print(f"{k:<20} {median(v):.3f} s  {median(v) / median(ref):.3f}x  (rounds {min(per):.3f}-{max(per):.3f})")
    if a.json:
        res = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "rank": a.rank, "rounds": a.rounds, "steps": a.steps,
               "step_seconds_median": {k: median(v) for k, v in times.items()},
               "vs_stacked": {k: median(v) / median(ref) for k, v in times.items()},
               "vs_stacked_per_round_range": {k: [f(x / y for x, y in zip(v, ref)) for f in (min, max)]
                                              for k, v in times.items()}}
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
