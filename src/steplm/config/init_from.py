"""model.init_from: the architecture a run takes from the model it starts from (an HF folder, a steplm
run or one of its checkpoints), and the conflicts with keys the user gave. Reads the folder's config
only, no weights."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from steplm.config.schema import ModelConfig, RunConfig
from steplm.errors import UserError


# ModelConfig keys that model.init_from does not fix: the final depth, and how weights are initialised.
NOT_FROM_CHECKPOINT = ("n_layers", "init_std", "init_from")


def checkpoint_config(cfg: RunConfig, source: str) -> ModelConfig:
    """The ModelConfig of model.init_from (an HF folder's config.json, a steplm run's, or a checkpoint's:
    ``io.run_dir.resolve_source``'s rule), its tokenizer.json checked; a UserError naming ``source``."""
    from steplm.io.run_dir import read_config

    try:
        ck = read_config(_resolved(cfg, source))
    except UserError as e:
        raise e.rekeyed(source, "MODEL") from None
    tokenizer_source(cfg, source)
    return ck


def _resolved(cfg: RunConfig, source: str):
    from steplm.io.run_dir import resolve_source

    try:
        return resolve_source(cfg.model.init_from)
    except UserError as e:
        raise e.rekeyed(source, "MODEL") from None


def tokenizer_source(cfg: RunConfig, source: str = "model.init_from"):
    """model.init_from resolved (``io.run_dir.ModelSource``), its tokenizer.json checked; a UserError
    naming ``source``."""
    src = _resolved(cfg, source)
    if not (src.tokenizer_dir / "tokenizer.json").is_file():
        raise UserError(f"{source}: {src.tokenizer_dir} has no tokenizer.json (its tokenizer is used as-is)")
    return src


def init_from_conflicts(cfg: RunConfig, given: set[str], given_tokenizer: bool, ck: ModelConfig,
                        source: str = "model.init_from") -> list[str]:
    """The model keys in ``given`` (and data.tokenizer) whose values differ from model.init_from's
    checkpoint ``ck``, each naming both sides."""
    from steplm.io.hf import HF_NAMES

    m, d, out = cfg.model, cfg.model.init_from, []
    for f in dataclasses.fields(ModelConfig):
        if f.name in given and f.name not in NOT_FROM_CHECKPOINT and getattr(m, f.name) != getattr(ck, f.name):
            out.append(f"model.{f.name}: {getattr(m, f.name)!r} conflicts with {source} {d} "
                       f"({HF_NAMES.get(f.name, f.name)} {getattr(ck, f.name)!r})")
    same = {Path(p).expanduser().resolve() for p in (d, tokenizer_source(cfg, source).tokenizer_dir)}
    if given_tokenizer and Path(cfg.data.tokenizer).expanduser().resolve() not in same:
        out.append(f"data.tokenizer: {cfg.data.tokenizer!r} conflicts with {source} {d} (its tokenizer is used "
                   f"as-is; drop data.tokenizer or set it to that directory)")
    return out


def resolve_init_from(cfg: RunConfig, given: set[str], given_tokenizer: bool,
                      source: str = "model.init_from") -> list[str]:
    """Fill ``cfg`` in place from model.init_from: every architecture key from its config,
    data.tokenizer = the folder of its tokenizer.json (a checkpoint's: its run's), model.n_layers =
    its depth unless given. Returns the conflicts with keys the user gave (``given``: model keys;
    ``given_tokenizer``: data.tokenizer), if any."""
    ck = checkpoint_config(cfg, source)
    conflicts = init_from_conflicts(cfg, given, given_tokenizer, ck, source)
    if not conflicts:
        n_layers = cfg.model.n_layers if "n_layers" in given else ck.n_layers
        cfg.model = dataclasses.replace(ck, n_layers=n_layers, init_std=cfg.model.init_std,
                                        init_from=cfg.model.init_from)
        cfg.data.tokenizer = str(tokenizer_source(cfg, source).tokenizer_dir)
    return conflicts


