"""`steplm export` (a run as a Hugging Face Llama folder) and `steplm info` (what a folder holds)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from steplm.cli.args import out_path, first_missing, remove_created
from steplm.errors import UserError
from steplm.io.files import dumps


def _size(s):
    """Bytes from '5GB', '500MB', '64KB' or a plain integer (argparse type for --max-shard-size)."""
    import re
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]B)?\s*", s, re.IGNORECASE)
    unit = {"": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12}[(m.group(2) or "").upper()] if m else 0
    if not m or float(m.group(1)) * unit < 1:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB, 500MB or 1000000, got {s!r}")
    return int(float(m.group(1)) * unit)


def cmd_export(a):
    from steplm.io.hf import export
    from steplm.io.run_dir import run_history
    from steplm.io.special_tokens import read_special_tokens
    from steplm.io.run_dir import load_run

    src = Path(a.run_dir)
    if src.exists() and not src.is_dir():
        raise UserError(f"RUN_DIR: {src} is a file, not a run directory")
    if not src.is_dir():
        raise UserError(f"RUN_DIR: {src} does not exist")
    out = out_path(a.to, "--to")
    if out.exists() and not out.is_dir():
        raise UserError(f"--to: {out} is a file; give a new or empty directory")
    if out.is_dir() and any(out.iterdir()):  # never mix an export into a run or another model's files
        raise UserError(f"--to: {out} is not empty; give a new or empty directory")
    a.names = {"MODEL": "RUN_DIR"}  # the loaders' key for the folder a model comes from
    model, tok = load_run(src)
    special = read_special_tokens(src, tok)
    created = first_missing(out)
    try:
        export(model, tok, out, special, dtype=a.dtype, max_shard_size=a.max_shard_size, history=run_history(src))
    except BaseException:
        if created:
            remove_created(out, created)
        raise
    print(f"exported to {out}/ (load with AutoModelForCausalLM.from_pretrained)", file=sys.stderr)


def cmd_info(a):
    from steplm.io.run_dir import describe

    if not Path(a.model).is_dir():
        raise UserError(key="MODEL", message=f"{a.model} is not a directory")
    d = describe(a.model)
    if a.json:
        print(dumps(d))
        return
    m = d["model"]
    rope = m["rope_scaling"] or {"rope_type": "default"}
    print(f"{d['kind']}: {m['n_layers']} layers, d {m['d_model']}, {m['n_heads']} heads ({m['n_kv_heads']} kv) "
          f"of {m['head_dim']}, ffn {m['ffn_hidden']}, vocab {m['vocab_size']}, max_seq_len {m['max_seq_len']}, "
          f"rope {rope['rope_type']} theta {m['rope_theta']:g}, tied {m['tie_embeddings']}")
    if d.get("special_tokens"):
        s = d["special_tokens"]
        print(f"eos {s['eos']!r} ({s['eos_id']}), stop ids {s['stop_ids']}, bos id {s['bos_id']}")
    h = d.get("steplm") or {}
    if "layers_per_stage" in h:
        print(f"steplm: method {h.get('method')}, layers per stage {h['layers_per_stage']}, "
              f"steps per stage {h.get('stage_steps')}" + (f", then SFT {h['sft']}" if "sft" in h else ""))
    elif "sft" in h:
        print(f"steplm: SFT {h['sft']}")


# The train.* keys an sft flag sets: a --set of one would silently override (or be overridden by) the flag.


def add_parsers(sub) -> None:
    x = sub.add_parser("export", help="write a Hugging Face Llama directory")
    x.add_argument("run_dir", help="run directory (its merged final model)")
    x.add_argument("--to", required=True, help="output directory")
    x.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weight dtype in the files")
    x.add_argument("--max-shard-size", type=_size, default="5GB",
                   help="split the weights into model-0000i-of-0000n.safetensors shards of at most this size "
                        "(5GB, 500MB, or bytes), with model.safetensors.index.json")
    x.set_defaults(fn=cmd_export)

    inf = sub.add_parser("info", help="what a run or HF directory holds: shape, special tokens, STEP stages")
    inf.add_argument("model", help="run directory or HF Llama directory")
    inf.add_argument("--json", action="store_true", help="print one JSON line")
    inf.set_defaults(fn=cmd_info)
