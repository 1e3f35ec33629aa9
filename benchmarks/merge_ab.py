"""A/B of the frozen linear's merge W + s·B·A alone, in the whole STEP step at the paper's 368M width:
the previous form (W up to fp32, the sum in fp32, rounded back to bf16) against steplm's (one bf16
addmm when W is stored in bf16, ``passes/lora._merged``). Both run in one process on one trainer,
switched before each block of steps, in interleaved rounds; the final stage of a 2-stage run of
d 1600, FFN 4288, 25 heads, rank 128, micro-batch 2 × 1024 tokens, bf16, activation checkpointing,
with --layers layers in all (the merge's share of a step does not depend on the depth).

    python benchmarks/merge_ab.py [--layers 2] [--rounds 4] [--steps 2] [--json benchmarks/results/merge_ab.json]

Prints each form's median step time and the ratio (new / previous), per round too. Time it with
the cores free: the ratio is the result, not the seconds."""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import interleaved, median, steplm_trainer, trainer_step  # noqa: E402

from steplm.devices import cpu_name  # noqa: E402
from steplm.passes import lora  # noqa: E402

WIDTH_368M = {"model.vocab_size": 8192, "model.d_model": 1600, "model.n_heads": 25, "model.ffn_hidden": 4288,
              "train.seq_len": 1024, "train.micro_batch": 2}


def previous_merged(weight, lora_A, lora_B, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """The merge before the bf16 form: W + s·B·A formed in fp32 and rounded once to ``dtype``."""
    return torch.addmm(weight.float(), lora_B.float(), lora_A.float(), alpha=scaling).to(dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2, help="final depth (stage 2 freezes the first half)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="steps per form per round")
    ap.add_argument("--json", help="write the result here")
    a = ap.parse_args()
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        sys.exit("merge_ab: this CPU has no native bf16 (the run would be fp32, where both forms are the same)")
    torch.manual_seed(0)
    current = lora._merged
    t = steplm_trainer({**WIDTH_368M, "model.n_layers": a.layers}, Path(tempfile.mkdtemp()), "m", method="step",
                       **{"step.n_stages": 2, "lora.rank": 128, "train.compile": False, "train.dtype": "bf16",
                          "train.activation_checkpointing": True, "data.max_train_tokens": 300_000})
    step = trainer_step(t)
    forms = {"previous (fp32 sum)": previous_merged, "bf16 addmm (steplm)": current}

    def use(fn):
        return lambda: setattr(lora, "_merged", fn)

    for fn in forms.values():  # one warm-up step under each form
        use(fn)()
        step()
    times = interleaved({k: step for k in forms}, a.rounds, a.steps, log=True,
                        setup={k: use(fn) for k, fn in forms.items()})
    lora._merged = current
    old, new = times["previous (fp32 sum)"], times["bf16 addmm (steplm)"]
    per = [y / x for x, y in zip(old, new)]
    print(f"{cpu_name()}, {torch.get_num_threads()} threads: STEP-2 final stage at the 368M width, {a.layers} layers")
    for k, v in times.items():
        print(f"{k:<22} {median(v):.3f} s/step")
    print(f"bf16 / previous: {median(new) / median(old):.3f}x (rounds {min(per):.3f}-{max(per):.3f})")
    if a.json:
        res = {"date": datetime.date.today().isoformat(), "cpu": cpu_name(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "layers": a.layers, "rounds": a.rounds, "steps": a.steps,
               "step_seconds_median": {k: median(v) for k, v in times.items()},
               "bf16_over_previous": median(new) / median(old), "per_round": per}
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
