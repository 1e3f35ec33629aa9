"""Every folder a model comes from or goes to, read and written in one place: a steplm run folder
(model_config.json, model.safetensors, tokenizer.json, summary.json), one of its checkpoints
(RUN/checkpoints/step_N: the weights with their adapters unmerged, and config.yaml), a Hugging Face
Llama folder (config.json and weights, through ``hf.py``'s conversion), and the final model a run writes.

Which files a folder's model is (``resolve_source``), the one rule: a finished run is its final
model; a checkpoint folder is that checkpoint; RUN/checkpoints, and a run without a final model (still
training, or interrupted), are the newest intact checkpoint. Checkpoints are read, never written:
no lock is taken, nothing in the run changes.

Loaders raise one-line UserErrors whose key is MODEL, the argument that names the folder; the
command line shows it under the name the user gave it (RUN_DIR for export, --init-from, ...).
"""
from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch


from steplm.config.schema import ModelConfig
from steplm.devices import check_model_fits
from steplm.errors import UserError
from steplm.io.files import one_line, read_json, read_safetensors, read_tokenizer
from steplm.io.hf import WEIGHT_FILES, _check_weights, check_finite, from_hf_config, read_weights
from steplm.io.special_tokens import SpecialTokens, read_special_tokens
from steplm.model.llama import LLaMA, from_state_dict
from steplm.train.checkpoint import MANIFEST, latest_valid, list_steps, verify


RUN_MODEL_FILES = ("model.safetensors", "model_config.json")  # what a finished run (train or sft) writes last
CHECKPOINTS = "checkpoints"
NOT_A_MODEL = "give a steplm run, a checkpoint or an HF model directory"


@dataclass(frozen=True)
class ModelSource:
    """A model folder resolved (``resolve_source``): what kind it is and which files hold the model."""
    given: Path
    """The folder as the user named it."""
    kind: str
    """"hf" (an HF Llama folder), "run" (a finished steplm run) or "checkpoint"."""
    weights_dir: Path
    """The folder of the weights: the HF folder, the finished run, or the one checkpoint read."""
    run_dir: Path | None = None
    """The steplm run folder (tokenizer.json, summary.json); None for an HF folder and for a
    checkpoint outside its run (copied elsewhere)."""
    step: int | None = None
    """The checkpoint's step (kind "checkpoint")."""

    @property
    def tokenizer_dir(self) -> Path:
        """The folder holding tokenizer.json (and the special-token files): the run's, also for a
        checkpoint inside it (one path for every checkpoint of a run: data.tokenizer of an --init-from
        run, and its token cache, do not change as the run checkpoints); a checkpoint's own copy only
        for a checkpoint outside its run."""
        if self.run_dir is not None and (self.run_dir / "tokenizer.json").is_file():
            return self.run_dir
        return self.weights_dir


def resolve_source(path: str | Path) -> ModelSource:
    """Which files a model folder's model is (the module's rule), or a one-line UserError (key MODEL).
    Reads only file names and checkpoint manifests (a checkpoint counts when its checksums hold)."""
    d = Path(path)
    if not d.exists():
        raise UserError(key="MODEL", message=f"{d} does not exist ({NOT_A_MODEL})")
    if not d.is_dir():
        raise UserError(key="MODEL", message=f"{d} is not a directory ({NOT_A_MODEL})")
    if (d / MANIFEST).is_file() or (d / "trainer.pt").is_file():  # one checkpoint
        problem = _verified(d)
        if problem:
            raise UserError(key="MODEL", message=f"{d} is a damaged checkpoint ({problem}); give another one, or "
                            f"{d.parent} for its newest intact checkpoint")
        run = d.parent.parent
        return ModelSource(d, "checkpoint", d, run if (run / "config.yaml").is_file() else None, _step(d))
    is_run = (d / "config.yaml").is_file()
    if not is_run and (d.name == CHECKPOINTS or list_steps(d)) and not (d / "config.json").is_file():
        return _newest_checkpoint(d, d)
    missing = [f for f in RUN_MODEL_FILES if not (d / f).is_file()]
    if is_run and missing:  # still training, or interrupted: its newest intact checkpoint
        return _newest_checkpoint(d / CHECKPOINTS, d, missing)
    if (d / "model_config.json").is_file():
        return ModelSource(d, "run", d, d)
    return ModelSource(d, "hf", d)


def _newest_checkpoint(root: Path, given: Path, missing: list[str] | None = None) -> ModelSource:
    """The newest intact checkpoint under ``root`` (a damaged one is skipped with a warning), given as
    ``given`` (the checkpoints folder, or a run without ``missing``, its final model files)."""
    ckpt = latest_valid(root, check=_verified) if root.is_dir() else None
    if ckpt is not None:
        return ModelSource(given, "checkpoint", ckpt, root.parent, _step(ckpt))
    if missing:
        raise UserError(key="MODEL", message=f"{given} is a steplm run without {' or '.join(missing)} (its final "
                        f"model) and without an intact checkpoint: it is still training toward its first one, or "
                        f"stopped before it (train.checkpoint_every); give a finished run or a checkpoint")
    raise UserError(key="MODEL", message=f"{given} holds no intact checkpoint ({NOT_A_MODEL})")


def _step(ckpt: Path) -> int | None:
    try:
        return int(ckpt.name.removeprefix("step_"))
    except ValueError:
        return None


@functools.lru_cache(maxsize=64)
def _verified_at(path: str, manifest_mtime_ns: int) -> str | None:
    return verify(Path(path))


def _verified(ckpt: Path) -> str | None:
    """``checkpoint.verify`` (every checksum), once per process for a checkpoint whose manifest is unchanged:
    a command resolves its model folder more than once (config, then weights)."""
    m = ckpt / MANIFEST
    return _verified_at(str(ckpt.resolve()), m.stat().st_mtime_ns) if m.is_file() else verify(ckpt)


def announce(src: ModelSource) -> None:
    """Say on stderr which checkpoint a command reads (nothing for a finished run or an HF folder)."""
    if src.kind != "checkpoint":
        return
    why = "" if src.weights_dir == src.given else (
        f": the newest intact one of {src.given}" + ("" if src.given.name == CHECKPOINTS else
                                                     ", which has no final model"))
    print(f"steplm: reading checkpoint {src.weights_dir} (step {src.step}{why})", file=sys.stderr)


def read_model_config(run_dir: str | Path):
    """The ModelConfig of a steplm run folder's model_config.json, its keys and values checked."""
    p = Path(run_dir) / "model_config.json"
    return _checked_config(read_json(p, "MODEL"), p)


def _checked_config(d: dict, p: Path) -> ModelConfig:
    """``d`` as a ModelConfig, its keys and values checked; errors name ``p``, the file it came from."""
    try:
        cfg = ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise UserError(key="MODEL", message=f"{p} is not a steplm model config ({one_line(e)})")
    problems = cfg.problems()
    if problems:
        raise UserError(key="MODEL", message=f"{p}: {problems[0]}")
    return cfg


class CheckpointConfig(NamedTuple):
    """What a checkpoint's config.yaml says about its model."""
    model: ModelConfig
    """The architecture at the checkpoint's depth."""
    lora_alpha: float
    method: str | None
    sft_model: str | None
    """The model an SFT run tunes (sft.model); None for pre-training."""


def read_checkpoint_config(ckpt: Path) -> CheckpointConfig:
    """A checkpoint folder's config.yaml (its model section, resolved when the run started, so
    model.init_from is not read again) with the number of layers its model.safetensors holds (from the
    tensor names; no tensor is read)."""
    import yaml
    from safetensors import SafetensorError, safe_open

    p, w = ckpt / "config.yaml", ckpt / "model.safetensors"
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(key="MODEL", message=f"{p} is not a readable run config ({one_line(e)})")
    sections = [d.get(k) or {} for k in ("model", "lora", "sft")] if isinstance(d, dict) else []
    if not sections or not all(isinstance(x, dict) for x in sections) or not sections[0]:
        raise UserError(key="MODEL", message=f"{p} is not a steplm run config (no model section)")
    model, lora, sft = sections
    alpha = lora.get("alpha", 16.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise UserError(key="MODEL", message=f"{p}: lora.alpha must be a positive number, got {alpha!r}")
    try:
        with safe_open(str(w), "pt") as f:
            layers = {k.split(".")[2] for k in f.keys() if k.startswith("model.layers.")}
    except (SafetensorError, OSError) as e:
        raise UserError(key="MODEL", message=f"{w} is not a readable safetensors file ({one_line(e)})")
    cfg = _checked_config({**model, "n_layers": len(layers), "init_from": None}, p)
    method, origin = d.get("method"), sft.get("model")
    return CheckpointConfig(cfg, float(alpha), method if isinstance(method, str) else None,
                            origin if isinstance(origin, str) else None)


def merge_adapters(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """A checkpoint's weights as a plain fp32 model's: each frozen base weight with its adapter merged
    in (W + B·A·alpha/r, as the run's final model is merged) and the ``lora_*`` tensors dropped."""
    from steplm.passes.lora import lora_delta

    out = {}
    for name, t in state.items():
        if "lora_" in name:
            continue
        base = name.removesuffix("weight")
        if name.endswith(".weight") and base + "lora_A" in state:
            a = state[base + "lora_A"]
            t = t.float() + lora_delta(a, state[base + "lora_B"], alpha / a.shape[0])
        out[name] = t.float().contiguous()
    return out


@dataclass
class Pretrained:
    """A loaded model directory: the steplm model (fp32, eval mode), its config, tokenizer and special tokens."""
    model: LLaMA
    config: ModelConfig
    tokenizer: object
    """A ``tokenizers.Tokenizer``."""
    special: SpecialTokens


def read_config(path: str | Path | ModelSource) -> ModelConfig:
    """The ModelConfig of a model folder (``resolve_source``'s rule; no weights read), or a one-line UserError."""
    src = path if isinstance(path, ModelSource) else resolve_source(path)
    if src.kind == "run":
        return read_model_config(src.weights_dir)
    if src.kind == "checkpoint":
        return read_checkpoint_config(src.weights_dir).model
    d = src.weights_dir
    if not (d / "config.json").is_file():
        raise UserError(key="MODEL", message=f"{d} has no config.json ({NOT_A_MODEL})")
    return from_hf_config(read_json(d / "config.json", "MODEL"))


source_config = read_config  # the name sft and the benchmarks know it by


def load_pretrained(path: str | Path, device="cpu") -> Pretrained:
    """A steplm model, its ModelConfig, tokenizer and special tokens from an HF Llama directory
    (no transformers needed unless the config scales RoPE). Refuses what it cannot load exactly."""
    d = Path(path)
    cfg = read_config(ModelSource(d, "hf", d))
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


def _load_final(d: Path, device) -> LLaMA:
    """The final merged model of a finished run folder (model_config.json, model.safetensors)."""
    cfg = read_model_config(d)
    return _built(cfg, read_safetensors(d / "model.safetensors", "MODEL", device), device, d, "model_config.json",
                  "max_seq_len")


def _load_checkpoint(ckpt: Path, device) -> LLaMA:
    """A checkpoint's model with its adapters merged: the model its run would write if it ended there."""
    cfg, alpha = read_checkpoint_config(ckpt)[:2]
    state = merge_adapters(read_safetensors(ckpt / "model.safetensors", "MODEL", device), alpha)
    return _built(cfg, state, device, ckpt, "config.yaml", "model.max_seq_len")


def _built(cfg: ModelConfig, state: dict[str, torch.Tensor], device, d: Path, config_file: str,
           positions_key: str) -> LLaMA:
    """The model of ``cfg`` holding ``state`` (read from ``d``, described by ``config_file``), refused in
    one line if the device cannot hold it, if the tensors do not fit the config, or if any is not finite."""
    check_model_fits(cfg, sum(t.numel() for t in state.values()), device, d / config_file, positions_key)
    try:
        model = from_state_dict(cfg, state, device)
    except (KeyError, RuntimeError) as e:  # missing tensors or wrong shapes for the config
        raise UserError(key="MODEL", message=f"{d / 'model.safetensors'} does not match its {config_file} "
                        f"({one_line(e)})")
    check_finite(model.state_dict(), d)
    return model


SPECIAL_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "config.json")


def _special_tokens(src: ModelSource, tok) -> SpecialTokens:
    """The special tokens of a resolved model folder. An SFT run records its model's only when it
    finishes: a checkpoint of one before that reads them from the model it tunes (sft.model)."""
    d = src.tokenizer_dir
    if src.kind == "checkpoint" and not any((d / n).is_file() for n in SPECIAL_FILES):
        origin = read_checkpoint_config(src.weights_dir).sft_model
        try:
            d = resolve_source(origin).tokenizer_dir if origin else d
        except UserError:
            pass  # moved or gone: steplm's own convention, as for a pre-training run
    return read_special_tokens(d, tok)


def load_model_dir(path: str | Path | ModelSource, device="cpu") -> Pretrained:
    """``Pretrained`` (model, config, tokenizer, special tokens) of a model folder: a finished run, a
    checkpoint, a run's newest checkpoint or an HF Llama folder (``resolve_source``), read-only. Says
    on stderr which checkpoint it reads."""
    src = path if isinstance(path, ModelSource) else resolve_source(path)
    if src.kind == "hf":
        return load_pretrained(src.weights_dir, device)
    announce(src)
    tok = read_tokenizer(src.tokenizer_dir / "tokenizer.json", "MODEL")
    load = _load_checkpoint if src.kind == "checkpoint" else _load_final
    model = load(src.weights_dir, device)
    return Pretrained(model, model.config, tok, _special_tokens(src, tok))


def load_model(path: str | Path, device="cpu"):
    """(model, tokenizers.Tokenizer) of a model folder; see ``load_model_dir``."""
    p = load_model_dir(path, device)
    return p.model, p.tokenizer


load_run = load_model  # a run folder's model: its final one, or its newest checkpoint's


HISTORY_KINDS = {"method": str, "layers_per_stage": list, "stage_steps": list, "tokens_seen": "num",
                 "final_val_loss": "num", "source": str, "examples": "num", "epochs": "num", "steps": "num",
                 "final_loss": "num", "final_train_loss": "num", "checkpoint": dict}
PRETRAINING_KEYS = ("method", "layers_per_stage", "stage_steps", "tokens_seen", "final_val_loss", "source",
                    "checkpoint")
SFT_KEYS = ("examples", "epochs", "steps", "final_loss", "final_train_loss")


def _of_kind(key: str, v) -> bool:
    kind = HISTORY_KINDS[key]
    if kind == "num":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind is list:
        return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
    return isinstance(v, kind)


def _record(path: Path, keys: tuple[str, ...], part: str | None = None) -> dict:
    """``keys`` of a run's JSON record (of its ``part`` object, if given), each of its kind; a missing
    record is empty, a damaged one or a value of the wrong kind is left out and said so."""
    if not path.is_file():
        return {}
    try:
        s = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        s = e
    if part is not None and isinstance(s, dict):
        s = s.get(part, {})
    if not isinstance(s, dict):  # the history is optional: a damaged record is left out, and said so
        print(f"steplm: warning: {path} is not a readable JSON object; the model's history leaves it out",
              file=sys.stderr)
        return {}
    bad = [k for k in keys if k in s and not _of_kind(k, s[k])]
    if bad:
        print(f"steplm: warning: {path} holds a {bad[0]} of the wrong kind ({s[bad[0]]!r}); the model's "
              f"history leaves it out", file=sys.stderr)
    return {k: s[k] for k in keys if k in s and k not in bad}


def run_history(path: str | Path | ModelSource) -> dict:
    """steplm's record of how a model was made, for config.json's "steplm" key and `steplm info`: its
    pre-training (method, layers and steps per stage, tokens seen, final validation loss, source) and,
    after `steplm sft`, its tuning under "sft". For a finished run from its summary.json (an SFT run's
    holds its model's pre-training under "pretraining") and sft_summary.json; for a checkpoint from its
    config.yaml (and "checkpoint": path, step, layers); for an HF folder its config.json's "steplm"."""
    from steplm import __version__

    src = path if isinstance(path, ModelSource) else resolve_source(path)
    if src.kind == "hf":
        d = src.weights_dir / "config.json"
        h = read_json(d, "MODEL").get("steplm") if d.is_file() else None
        return dict(h) if isinstance(h, dict) else {}
    if src.kind == "checkpoint":
        return {"version": __version__, **_checkpoint_history(src)}
    d, out = src.run_dir, {"version": __version__}
    sft = _record(d / "sft_summary.json", SFT_KEYS)
    if sft or (d / "sft_summary.json").is_file():  # the summary's own keys describe the tuning, not the model
        out.update(_record(d / "summary.json", PRETRAINING_KEYS, "pretraining"))
        return {**out, "sft": sft}
    return {**out, **_record(d / "summary.json", PRETRAINING_KEYS)}


def _checkpoint_history(src: ModelSource) -> dict:
    """The history of a checkpoint's model: its run's method (or, for an SFT run, the tuned model's
    history, with the tuning under "sft"), and where the checkpoint is."""
    ck = read_checkpoint_config(src.weights_dir)
    where = {"path": str(src.weights_dir), "step": src.step, "layers": ck.model.n_layers}
    if ck.sft_model:
        try:
            before = run_history(ck.sft_model)
        except UserError:  # moved or gone: the path is what is known
            before = {}
        before.pop("version", None)
        return {**before, "source": ck.sft_model, "sft": {"checkpoint": where}}
    return {"method": ck.method, "checkpoint": where} if ck.method else {"checkpoint": where}


def describe(path: str | Path) -> dict:
    """What a model folder holds, without loading weights: architecture, special tokens, and steplm's
    history (``run_history``); for a checkpoint, which one (``resolve_source``'s rule)."""
    src = resolve_source(path)
    d = src.weights_dir
    if src.kind == "hf" and not (d / "config.json").is_file():
        raise UserError(key="MODEL", message=f"{d} is neither a steplm run directory nor an HF model directory")
    cfg = read_config(src)
    weights = [f for f in WEIGHT_FILES if (d / f).is_file()]
    if not weights:  # a folder no command can load is not described as a model
        raise UserError(key="MODEL", message=f"{d} holds no weights (one of {', '.join(WEIGHT_FILES)})")
    empty = [f for f in weights if (d / f).stat().st_size == 0]
    if empty:
        raise UserError(key="MODEL", message=f"{d / empty[0]} is empty (0 bytes)")
    tok_file = src.tokenizer_dir / "tokenizer.json"
    if src.kind != "hf" and not tok_file.is_file():  # (an HF folder may hold another format)
        raise UserError(key="MODEL", message=f"{src.tokenizer_dir} has no tokenizer.json")
    kind = {"hf": "Hugging Face Llama", "run": "steplm run", "checkpoint": "steplm checkpoint"}[src.kind]
    out = {"path": str(src.given), "kind": kind, "model": cfg.to_dict(), "steplm": run_history(src), "weights": weights}
    if src.kind == "checkpoint":
        out["checkpoint"] = {"path": str(d), "step": src.step}
    if tok_file.is_file():
        tok = read_tokenizer(tok_file, "MODEL")
        s = _special_tokens(src, tok)
        out["special_tokens"] = {"eos": tok.id_to_token(s.eos_id), "eos_id": s.eos_id, "stop_ids": list(s.stop_ids),
                                 "bos_id": s.bos_id}
    return out
