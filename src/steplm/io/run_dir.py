"""Every folder a model comes from or goes to, read and written in one place: a steplm run folder
(model_config.json, model.safetensors, tokenizer.json, summary.json), a Hugging Face Llama folder
(config.json and weights, through ``hf.py``'s conversion), and the final model a run writes.

Loaders raise one-line UserErrors whose key is MODEL, the argument that names the folder; the
command line shows it under the name the user gave it (RUN_DIR for export, --init-from, ...).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path


from steplm.config.schema import ModelConfig
from steplm.devices import check_model_fits
from steplm.errors import UserError
from steplm.io.files import one_line, read_json, read_safetensors, read_tokenizer
from steplm.io.hf import WEIGHT_FILES, _check_weights, check_finite, from_hf_config, read_weights
from steplm.io.special_tokens import SpecialTokens, read_special_tokens
from steplm.model.llama import LLaMA, from_state_dict


RUN_MODEL_FILES = ("model.safetensors", "model_config.json")  # what a finished run (train or sft) writes last


def unfinished_run(d: Path) -> UserError | None:
    """The error for a steplm run folder (it holds config.yaml) without its final model files: an
    unfinished or damaged run. None for anything else."""
    missing = [f for f in RUN_MODEL_FILES if not (d / f).is_file()]
    if not (d / "config.yaml").is_file() or not missing:
        return None
    return UserError(key="MODEL", message=f"{d} is a steplm run without {' or '.join(missing)}, which a finished run writes "
                     f"(finish it by rerunning its steplm train or sft command, or restore the file)")


def read_model_config(run_dir: str | Path):
    """The ModelConfig of a steplm run folder's model_config.json, its keys and values checked."""
    from steplm.config.schema import ModelConfig
    p = Path(run_dir) / "model_config.json"
    d = read_json(p, "MODEL")
    try:
        cfg = ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise UserError(key="MODEL", message=f"{p} is not a steplm model config ({one_line(e)})")
    problems = cfg.problems()
    if problems:
        raise UserError(key="MODEL", message=f"{p}: {problems[0]}")
    return cfg


@dataclass
class Pretrained:
    """A loaded model directory: the steplm model (fp32, eval mode), its config, tokenizer and special tokens."""
    model: LLaMA
    config: ModelConfig
    tokenizer: object
    """A ``tokenizers.Tokenizer``."""
    special: SpecialTokens


def read_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of an HF Llama directory's config.json (no weights read), or a one-line UserError."""
    d = Path(path)
    if not d.exists():
        raise UserError(key="MODEL", message=f"{d} does not exist (give a steplm run directory or an HF model directory)")
    if not d.is_dir():
        raise UserError(key="MODEL", message=f"{d} is not a directory (give a steplm run directory or an HF model directory)")
    if not (d / "config.json").is_file():
        if unfinished_run(d):
            raise unfinished_run(d)
        if (d / "model_config.json").is_file():  # only model.init_from reads a folder this way
            raise UserError(key="MODEL", message=f"{d} is a steplm run, not an HF model directory; export it first "
                            f"(steplm export {d} --to DIR) and give DIR")
        raise UserError(key="MODEL", message=f"{d} has no config.json (give a steplm run directory or an HF model directory)")
    return from_hf_config(read_json(d / "config.json", "MODEL"))


def load_pretrained(path: str | Path, device="cpu") -> Pretrained:
    """A steplm model, its ModelConfig, tokenizer and special tokens from an HF Llama directory
    (no transformers needed unless the config scales RoPE). Refuses what it cannot load exactly."""
    d = Path(path)
    cfg = read_config(d)
    if not (d / "tokenizer.json").is_file():
        raise UserError(key="MODEL", message=f"{d} has no tokenizer.json")
    tok = read_tokenizer(d / "tokenizer.json", "MODEL")
    special = read_special_tokens(d, tok)
    state = read_weights(d, device)
    cfg = _check_weights(cfg, state)
    check_finite(state, d)
    check_model_fits(cfg, sum(t.numel() for t in state.values()), device, d / "config.json", "max_position_embeddings")
    model = from_state_dict(cfg, {k: v.float() for k, v in state.items()}, device)
    return Pretrained(model, cfg, tok, special)


def load_hf_dir(path: str | Path, device="cpu") -> tuple[LLaMA, object]:
    """(model, tokenizers.Tokenizer) from an HF Llama directory; see ``load_pretrained``."""
    p = load_pretrained(path, device)
    return p.model, p.tokenizer


def load_run(run_dir: str | Path, device="cpu") -> tuple[LLaMA, object]:
    """The final merged model and tokenizer of a run directory, or a one-line UserError (key MODEL)."""
    d = Path(run_dir)
    if unfinished_run(d):
        raise unfinished_run(d)
    if not (d / "model.safetensors").is_file() or not (d / "model_config.json").is_file():
        raise UserError(key="MODEL", message=f"{d} is not a finished steplm run (no model.safetensors / model_config.json)")
    mcfg = read_model_config(d)
    tok = read_tokenizer(d / "tokenizer.json", "MODEL")
    state = read_safetensors(d / "model.safetensors", "MODEL", device)
    check_model_fits(mcfg, sum(t.numel() for t in state.values()), device, d / "model_config.json", "max_seq_len")
    try:
        model = from_state_dict(mcfg, state, device)
    except (KeyError, RuntimeError) as e:  # missing tensors or wrong shapes for model_config.json
        raise UserError(key="MODEL", message=f"{d / 'model.safetensors'} does not match its model_config.json ({one_line(e)})")
    check_finite(model.state_dict(), d)
    return model, tok


def load_model_dir(path: str | Path, device="cpu") -> Pretrained:
    """``hf.Pretrained`` (model, config, tokenizer, special tokens) of a run directory or an HF Llama directory."""
    p = Path(path)
    if not p.exists():
        raise UserError(key="MODEL", message=f"{p} does not exist (give a steplm run directory or an HF model directory)")
    if not p.is_dir():
        raise UserError(key="MODEL", message=f"{p} is not a directory (give a steplm run directory or an HF model directory)")
    if (p / "model_config.json").is_file():
        model, tok = load_run(p, device)
        return Pretrained(model, model.config, tok, read_special_tokens(p, tok))
    return load_pretrained(p, device)


def load_model(path: str | Path, device="cpu"):
    """(model, tokenizers.Tokenizer) from a run directory or an HF Llama directory; see ``load_model_dir``."""
    p = load_model_dir(path, device)
    return p.model, p.tokenizer


def source_config(model_dir: str):
    """The ModelConfig of a steplm run directory (model_config.json) or an HF Llama directory
    (config.json), read without loading weights."""
    d = Path(model_dir)
    if not d.is_dir():
        raise UserError(key="MODEL", message=f"{d} is not a directory (give a steplm run directory or an HF model directory)")
    if (d / "model_config.json").is_file():
        return read_model_config(d)
    return read_config(d)


def run_history(run_dir: str | Path) -> dict:
    """steplm's record of how a run directory's model was made, for config.json's "steplm" key:
    method, layers per stage, steps per stage (from summary.json), SFT epochs/steps (from sft_summary.json)."""
    from steplm import __version__

    d = Path(run_dir)
    out: dict = {"version": __version__}
    ints = lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)  # noqa: E731
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    kinds = {"method": lambda v: isinstance(v, str), "layers_per_stage": ints, "stage_steps": ints,
             "tokens_seen": num, "final_val_loss": num, "examples": num, "epochs": num, "steps": num,
             "final_loss": num}
    for name, keys in (("summary.json", ("method", "layers_per_stage", "stage_steps", "tokens_seen",
                                         "final_val_loss")),
                       ("sft_summary.json", ("examples", "epochs", "steps", "final_loss"))):
        if not (d / name).is_file():
            continue
        try:
            s = json.loads((d / name).read_text())
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            s = e
        if not isinstance(s, dict):  # the history is optional: a damaged record is left out, and said so
            print(f"steplm: warning: {d / name} is not a readable JSON object; the model's history leaves it out",
                  file=sys.stderr)
            continue
        bad = [k for k in keys if k in s and not kinds[k](s[k])]
        if bad:
            print(f"steplm: warning: {d / name} holds a {bad[0]} of the wrong kind ({s[bad[0]]!r}); the model's "
                  f"history leaves it out", file=sys.stderr)
        part = {k: s[k] for k in keys if k in s and k not in bad}
        if name == "summary.json":
            out.update(part)
        else:
            out["sft"] = part
    return out


def describe(path: str | Path) -> dict:
    """What a run or HF model directory holds, without loading weights: architecture, special tokens,
    and steplm's stage history ("steplm" in config.json, or the run's summary.json)."""
    d = Path(path)
    if (d / "model_config.json").is_file():
        if unfinished_run(d):
            raise unfinished_run(d)
        cfg, kind = read_model_config(d), "steplm run"
        history = run_history(d)
    elif (d / "config.json").is_file():
        hf_cfg = read_json(d / "config.json", "MODEL")
        cfg, kind = from_hf_config(hf_cfg), "Hugging Face Llama"
        history = hf_cfg.get("steplm")
    elif unfinished_run(d):
        raise unfinished_run(d)
    else:
        raise UserError(key="MODEL", message=f"{d} is neither a steplm run directory nor an HF model directory")
    weights = [f for f in WEIGHT_FILES if (d / f).is_file()]
    if not weights:  # a folder no command can load is not described as a model
        raise UserError(key="MODEL", message=f"{d} holds no weights (one of {', '.join(WEIGHT_FILES)})")
    empty = [f for f in weights if (d / f).stat().st_size == 0]
    if empty:
        raise UserError(key="MODEL", message=f"{d / empty[0]} is empty (0 bytes)")
    if kind == "steplm run" and not (d / "tokenizer.json").is_file():  # (an HF folder may hold another format)
        raise UserError(key="MODEL", message=f"{d} has no tokenizer.json")
    out = {"path": str(d), "kind": kind, "model": cfg.to_dict(), "steplm": history, "weights": weights}
    if (d / "tokenizer.json").is_file():
        tok = read_tokenizer(d / "tokenizer.json", "MODEL")
        s = read_special_tokens(d, tok)
        out["special_tokens"] = {"eos": tok.id_to_token(s.eos_id), "eos_id": s.eos_id, "stop_ids": list(s.stop_ids),
                                 "bos_id": s.bos_id}
    return out
