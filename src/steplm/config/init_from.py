"""model.init_from: the architecture a run takes from the model it starts from (an HF folder, a steplm
run or one of its checkpoints), and the conflicts with keys the user gave. Reads the folder's config
only, no weights (no torch)."""
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


def _differing(cfg: RunConfig, given: set[str], given_tokenizer: bool, ck: ModelConfig,
               source: str = "model.init_from") -> list[tuple[str, str, str]]:
    """(key, our value, the checkpoint's) for every key in ``given`` (model keys, and data.tokenizer
    when ``given_tokenizer``) that model.init_from's checkpoint ``ck`` sets otherwise."""
    from steplm.io.hf import HF_NAMES

    m, out = cfg.model, []
    for f in dataclasses.fields(ModelConfig):
        if f.name in given and f.name not in NOT_FROM_CHECKPOINT and getattr(m, f.name) != getattr(ck, f.name):
            out.append((f"model.{f.name}", repr(getattr(m, f.name)), f"{HF_NAMES.get(f.name, f.name)} {getattr(ck, f.name)!r}"))
    same = {Path(p).expanduser().resolve() for p in (m.init_from, tokenizer_source(cfg, source).tokenizer_dir)}
    if given_tokenizer and Path(cfg.data.tokenizer).expanduser().resolve() not in same:
        out.append(("data.tokenizer", repr(cfg.data.tokenizer), "its tokenizer is used as-is"))
    return out


def init_from_conflicts(cfg: RunConfig, given: set[str], given_tokenizer: bool, ck: ModelConfig,
                        source: str = "model.init_from", in_file: set[str] = frozenset()) -> list[str]:
    """The model keys in ``given`` (and data.tokenizer) whose values differ from model.init_from's
    checkpoint ``ck``, each naming both sides and the fix: drop the key (``in_file``: dotted keys
    that a config file gave, to be removed from it), or point data.tokenizer at the folder."""
    out = []
    for key, mine, theirs in _differing(cfg, given, given_tokenizer, ck, source):
        fix = "remove it from the config file" if key in in_file else "drop it"
        if key == "data.tokenizer":
            out.append(f"data.tokenizer: {mine} conflicts with {source} {cfg.model.init_from} ({theirs}); {fix} or "
                       f"set it to that directory")
        else:
            out.append(f"{key}: {mine} conflicts with {source} {cfg.model.init_from} ({theirs}); {fix} (the "
                       f"checkpoint's config.json fixes the architecture)")
    return out


def resolve_init_from(cfg: RunConfig, given: set[str], given_tokenizer: bool,
                      source: str = "model.init_from", in_file: set[str] = frozenset(),
                      yielding: set[str] = frozenset()) -> list[str]:
    """Fill ``cfg`` in place from model.init_from: every architecture key from its config,
    data.tokenizer = the folder of its tokenizer.json (a checkpoint's: its run's, or its own copy outside its run), model.n_layers = its depth unless given. Returns the conflicts
    with keys the user gave (``given``: model keys; ``given_tokenizer``: data.tokenizer), if any.
    ``yielding`` (dotted keys a config file gave while model.init_from came from the command line,
    which beats the file) are not conflicts: the checkpoint's values replace them, said in one warning."""
    import sys

    ck = checkpoint_config(cfg, source)
    replaced = [c for c in _differing(cfg, given, given_tokenizer, ck, source) if c[0] in yielding]
    keep = {k.split(".", 1)[1] for k in yielding if k.startswith("model.")}
    conflicts = init_from_conflicts(cfg, given - keep, given_tokenizer and "data.tokenizer" not in yielding, ck,
                                    source, in_file)
    if not conflicts:
        n_layers = cfg.model.n_layers if "n_layers" in given else ck.n_layers
        cfg.model = dataclasses.replace(ck, n_layers=n_layers, init_std=cfg.model.init_std,
                                        init_from=cfg.model.init_from)
        cfg.data.tokenizer = str(tokenizer_source(cfg, source).tokenizer_dir)
        if replaced:
            print(f"steplm: warning: {source} {cfg.model.init_from} fixes the architecture and the tokenizer: the "
                  f"config file's {', '.join(f'{k} {mine}' for k, mine, _ in replaced)} give way to its "
                  f"{', '.join(theirs for k, _, theirs in replaced if k != 'data.tokenizer') or 'tokenizer'}",
                  file=sys.stderr)
    return conflicts
