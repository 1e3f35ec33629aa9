"""`steplm sft`: instruction-tune a model on the shared training loop."""
from __future__ import annotations

import os
import sys

from steplm.cli.args import (MODEL_HELP, add_config_flags, add_precision, config_overrides, every_arg, fit,
                             non_negative_int, out_path, positive_float, positive_int, precision, seed_arg)
from steplm.errors import UserError, warn
from steplm.io.files import dumps


SFT_FLAG_KEYS = {"train.lr": "--lr", "train.warmup_steps": "--warmup-steps", "train.micro_batch": "--micro-batch",
                 "train.grad_accum": "--batch-size", "train.seed": "--seed", "train.device": "--device",
                 "train.dtype": "--dtype", "train.compile": "--compile", "train.checkpoint_every": "--checkpoint-every",
                 "train.max_steps": "--epochs"}


SFT_UNUSED_KEYS = {"train.seq_len": "each example is cut at MODEL's max_seq_len"}  # would be misread: refused
SFT_NO_EFFECT_KEYS = {"train.eval_tokens": "sft scores its first 64 examples"}  # harmless: warned about, dropped


def _check_sft_sets(sets: list[str]) -> list[str]:
    """sft's config overrides, checked: train.* keys only (the model's shape and tokenizer are MODEL's,
    the examples --data's, and the method plain AdamW, so any other key would be ignored without a
    word); a key sft cannot use is refused, one that changes nothing is dropped with a warning."""
    from steplm.config import override_key
    kept = []
    for item in sets:
        key = override_key(item)
        if key in SFT_FLAG_KEYS:
            raise UserError(f"--set {key}: sft sets it from {SFT_FLAG_KEYS[key]}; use that flag")
        if key in SFT_UNUSED_KEYS:
            raise UserError(f"--set {key}: sft does not use it ({SFT_UNUSED_KEYS[key]})")
        if not key.startswith("train."):
            raise UserError(f"--set {key}: sft takes only train.* keys (the model's shape and tokenizer come from "
                            f"MODEL, the examples from --data, and the optimizer is plain AdamW)")
        if key in SFT_NO_EFFECT_KEYS:
            warn(f"{key} has no effect on sft ({SFT_NO_EFFECT_KEYS[key]})")
            continue
        kept.append(item)
    return kept


def cmd_sft(a):
    from steplm.train.sft import sft_trainer, read_examples, sft_config
    from steplm.io.run_dir import source_config

    overrides = config_overrides(a, short={})
    a.names = {**SFT_FLAG_KEYS, **a.names}  # sft sets these keys from its flags
    overrides = _check_sft_sets(overrides)
    read_examples(a.data)  # bad data: one line, before anything is written
    precision(a)  # --device cuda without a GPU: one line naming the flag
    out = out_path(a.out, "--out")
    cfg = sft_config(a.model, a.data, source_config(a.model), epochs=a.epochs, limit=a.limit, lr=a.lr,
                     warmup_steps=a.warmup_steps, batch_size=a.batch_size, micro_batch=a.micro_batch, seed=a.seed,
                     device=a.device, dtype=a.dtype, compile=a.compile, checkpoint_every=a.checkpoint_every,
                     world=int(os.environ.get("WORLD_SIZE", "1")), overrides=overrides)
    s = fit(lambda: sft_trainer(cfg, out, progress=not a.quiet), out)
    if s is not None:
        print(dumps({k: s[k] for k in ("examples", "epochs", "steps", "first_loss", "final_loss")}))
        print(f"model written to {out}/ (sft_summary.json, metrics.jsonl, model.safetensors)", file=sys.stderr)


def add_parsers(sub) -> None:
    f = sub.add_parser("sft", help="instruction-tune (Alpaca template, loss on responses only)")
    f.add_argument("model", help=MODEL_HELP)
    f.add_argument("--data", required=True, help="Alpaca JSON (instruction/input/output) or seed-task JSONL")
    f.add_argument("--out", required=True, help="run directory of the tuned model")
    f.add_argument("--epochs", type=positive_int, default=2, help="passes over the data (default 2)")
    f.add_argument("--lr", type=positive_float, default=1e-4, help="peak AdamW learning rate (default 1e-4)")
    f.add_argument("--warmup-steps", type=non_negative_int, default=100,
                   help="linear warmup, in optimizer steps, before the cosine decay to 0; at most a tenth of the "
                        "run (default 100)")
    f.add_argument("--batch-size", type=positive_int, default=8, help="examples per optimizer step")
    f.add_argument("--micro-batch", type=positive_int,
                   help="examples per forward (gradient accumulation; default --batch-size)")
    f.add_argument("--limit", type=positive_int, help="use only the first N examples")
    f.add_argument("--seed", type=seed_arg, default=0, help="seed of the epochs' shuffles, in [0, 2**32) (default 0)")
    f.add_argument("--compile", action="store_true", help="torch.compile the model (as train.compile)")
    f.add_argument("--checkpoint-every", type=every_arg, default=None,
                   help="checkpoint every N steps and at the last (default auto: about every tenth of the run; "
                        "0: never); rerun the same command to resume")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    add_precision(f)
    add_config_flags(f, short={}, sections=("train",), exclude=(*SFT_FLAG_KEYS, *SFT_UNUSED_KEYS))
    f.set_defaults(fn=cmd_sft)
