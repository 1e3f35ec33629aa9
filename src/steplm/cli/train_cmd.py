"""`steplm train`: pre-train a run from a config."""
from __future__ import annotations

import sys
from pathlib import Path

from steplm.cli.args import SHORT_FLAGS, add_config_flags, config_overrides, fit, flag_dest, out_path
from steplm.config.load import presets
from steplm.errors import UserError, warn
from steplm.io.files import dumps

# every short flag but --init-from, which config.load takes apart (it fills the model keys from the folder)
CONFIG_FLAGS = {f: v for f, v in SHORT_FLAGS.items() if f != "--init-from"}


def load_config(a, extra_flags: dict | None = None):
    """The validated RunConfig of a train or plan command line: CONFIG, --set, the short flags (and
    ``extra_flags``, the same form: flag -> (key, argparse options)) and the --section.key flags
    (``config_overrides``), and --init-from."""
    from steplm import config

    flags = {f: v for f, v in CONFIG_FLAGS.items() if hasattr(a, flag_dest(f))} | (extra_flags or {})
    overrides = config_overrides(a, flags)
    init_from = getattr(a, flag_dest("--init-from"), None)
    also = [item.split("=", 1)[1] for item in overrides if item.split("=", 1)[0].strip() == "model.init_from"]
    if init_from is not None and also:
        if not all(Path(v.strip()).resolve() == Path(init_from).resolve() for v in also):
            raise UserError("--init-from: also given as --set model.init_from; give one of them")
        warn("--init-from: also given as --set model.init_from, with the same folder; give it once")
        overrides = [item for item in overrides if item.split("=", 1)[0].strip() != "model.init_from"]
    cfg = config.load(a.config, overrides, init_from=init_from)
    config.validate(cfg)
    return cfg


def cmd_train(a):
    from steplm.train.loop import Trainer

    cfg = load_config(a)
    out = out_path(a.out, "--out")
    if a.fresh and out.exists() and any(out.iterdir()):
        raise UserError(f"--out: {out} is not empty; drop --fresh to resume from it, or choose another directory")
    summary = fit(lambda: Trainer(cfg, out, progress=not a.quiet), out)
    if summary is None:
        return
    keys = ("method", "final_val_loss", "final_val_ppl", "tokens_seen", "flops", "train_seconds", "weights_sha256")
    print(dumps({k: summary[k] for k in keys}))
    print(f"run written to {out}/ (summary.json, metrics.jsonl, model.safetensors)", file=sys.stderr)


def add_parsers(sub) -> None:
    t = sub.add_parser("train", help="pre-train (vanilla or STEP) from a YAML config")
    t.add_argument("config", nargs="?", help=f"a YAML config file, or a preset's name ({presets()})")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--fresh", action="store_true", help="refuse to start unless --out is empty (no resume)")
    add_config_flags(t)
    t.set_defaults(fn=cmd_train)
