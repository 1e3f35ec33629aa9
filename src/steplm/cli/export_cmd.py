"""`steplm export` (a run as a Hugging Face Llama folder) and `steplm info` (what a folder holds)."""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from steplm.cli.args import MODEL_HELP, out_path, first_missing, remove_created
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
    """A steplm run's final model, or a checkpoint's (adapters merged), as an HF Llama folder whose
    config.json carries the model's history under "steplm"."""
    from steplm.io.hf import export
    from steplm.io.run_dir import load_model_dir, resolve_source, run_history

    a.names = {"MODEL": "RUN_DIR"}  # the loaders' key for the folder a model comes from
    src = Path(a.run_dir)
    if src.exists() and not src.is_dir():
        raise UserError(f"RUN_DIR: {src} is a file, not a run directory")
    out = out_path(a.to, "--to")
    if out.exists() and not out.is_dir():
        raise UserError(f"--to: {out} is a file; give a new or empty directory")
    if out.is_dir() and any(out.iterdir()):  # never mix an export into a run or another model's files
        raise UserError(f"--to: {out} is not empty; give a new or empty directory")
    source = resolve_source(src)
    if source.kind == "hf":
        raise UserError(f"RUN_DIR: {src} is not a steplm run or checkpoint" + (
            " (it is already a Hugging Face model folder)" if (src / "config.json").is_file() else ""))
    m = load_model_dir(source)
    created = first_missing(out)
    try:
        export(m.model, m.tokenizer, out, m.special, dtype=a.dtype, max_shard_size=a.max_shard_size,
               history=run_history(source))
    except BaseException:
        if created:
            remove_created(out, created)
        raise
    print(f"exported to {out}/ (load with AutoModelForCausalLM.from_pretrained)", file=sys.stderr)


def cmd_info(a):
    """What a model folder holds, as aligned "key: value" lines (--json: the raw dict)."""
    from steplm.io.run_dir import describe

    d = describe(a.model)
    if a.json:
        print(dumps(d))
        return
    width = max(len(k) for k, _ in info_lines(d))
    for key, value in info_lines(d):
        print(f"{key + ':':<{width + 1}} {value}")


def info_lines(d: dict) -> list[tuple[str, str]]:
    """``describe``'s dict as (key, value) lines a reader takes in at a glance: stages as "3 -> 6 layers",
    token counts with separators."""
    m = d["model"]
    rope = m["rope_scaling"] or {"rope_type": "default"}
    lines = [("path", d["path"]), ("kind", d["kind"])]
    lines += [("layers", f"{m['n_layers']}"), ("width", f"d_model {m['d_model']}, ffn {m['ffn_hidden']}"),
              ("heads", f"{m['n_heads']} ({m['n_kv_heads']} kv) of {m['head_dim']}"),
              ("vocab", f"{m['vocab_size']:,}"), ("context", f"{m['max_seq_len']:,} tokens"),
              ("rope", f"{rope['rope_type']}, theta {m['rope_theta']:g}"),
              ("tied embeddings", "yes" if m["tie_embeddings"] else "no"), ("weights", ", ".join(d["weights"]))]
    if d.get("special_tokens"):
        s = d["special_tokens"]
        lines.append(("special tokens", f"eos {s['eos']!r} ({s['eos_id']}), stop ids {s['stop_ids']}, "
                                        f"bos id {s['bos_id']}"))
    return lines + history_lines(d.get("steplm") or {})


def history_lines(h: dict) -> list[tuple[str, str]]:
    """How the model was made (``run_dir.run_history``) as info lines."""
    lines = []
    if "method" in h:
        lines.append(("method", str(h["method"])))
    if "layers_per_stage" in h:
        depths = list(itertools.accumulate(h["layers_per_stage"]))
        lines.append(("stages", " -> ".join(map(str, depths)) + " layers"))
    if "stage_steps" in h:
        lines.append(("steps per stage", ", ".join(f"{n:,}" for n in h["stage_steps"])))
    if "tokens_seen" in h:
        lines.append(("tokens seen", f"{h['tokens_seen']:,}"))
    if "final_val_loss" in h:
        lines.append(("final val loss", f"{h['final_val_loss']:.4f}"))
    if "checkpoint" in h:
        c = h["checkpoint"]
        lines.append(("checkpoint", f"step {c.get('step')}, {c.get('layers')} layers ({c.get('path')})"))
    if "source" in h:
        lines.append(("source", str(h["source"])))
    sft = h.get("sft")
    if isinstance(sft, dict) and "checkpoint" in sft:
        c = sft["checkpoint"]
        lines.append(("sft", f"checkpoint at step {c.get('step')} ({c.get('path')})"))
    elif isinstance(sft, dict):
        epochs = sft.get("epochs")
        said = [f"{epochs} epoch{'s' * (epochs != 1)}" if epochs is not None else "", f"{sft['examples']:,} examples"
                if "examples" in sft else "", f"{sft['steps']:,} steps" if "steps" in sft else ""]
        loss = sft.get("final_train_loss", sft.get("final_loss"))
        lines.append(("sft", ", ".join(x for x in said if x) + (f", final train loss {loss:.4f}" if loss is not None
                                                                 else "")))
    return lines


def add_parsers(sub) -> None:
    x = sub.add_parser("export", help="write a Hugging Face Llama directory")
    x.add_argument("run_dir", help="a steplm run folder (its merged final model; a run still training or interrupted: "
                   "its newest intact checkpoint), a checkpoint folder (RUN/checkpoints/step_N) or RUN/checkpoints")
    x.add_argument("--to", required=True, help="output directory")
    x.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weight dtype in the files")
    x.add_argument("--max-shard-size", type=_size, default="5GB",
                   help="split the weights into model-0000i-of-0000n.safetensors shards of at most this size "
                        "(5GB, 500MB, or bytes), with model.safetensors.index.json")
    x.set_defaults(fn=cmd_export)

    inf = sub.add_parser("info", help="what a run or HF directory holds: shape, special tokens, STEP stages")
    inf.add_argument("model", help=MODEL_HELP)
    inf.add_argument("--json", action="store_true", help="print one JSON line")
    inf.set_defaults(fn=cmd_info)
