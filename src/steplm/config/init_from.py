"""model.init_from: the architecture a run takes from a pretrained checkpoint's config.json, and the
conflicts with keys the user gave. Reads config.json only (no torch)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from steplm.config.schema import ModelConfig, RunConfig
from steplm.errors import UserError


# ModelConfig keys that model.init_from does not fix: the final depth, and how weights are initialised.
NOT_FROM_CHECKPOINT = ("n_layers", "init_std", "init_from")


def checkpoint_config(cfg: RunConfig, source: str) -> ModelConfig:
    """The ModelConfig of model.init_from's config.json, or a UserError naming ``source`` that says
    what to give instead (a steplm run, its checkpoints or a missing folder: what makes an HF folder)."""
    from steplm.io.run_dir import read_config

    d = Path(cfg.model.init_from)
    wrong = not_an_hf_folder(d, source)
    if wrong:
        raise UserError(wrong, key=source)
    try:
        ck = read_config(d)
    except UserError as e:
        raise e.rekeyed(source, "MODEL") from None
    if not (d / "tokenizer.json").is_file():
        raise UserError(f"{source}: {d} has no tokenizer.json (its tokenizer is used as-is)")
    return ck


def not_an_hf_folder(d: Path, source: str) -> str | None:
    """Why ``d`` cannot be model.init_from, if it is a steplm run folder, a checkpoint or the
    checkpoints folder of one, or no HF Llama folder at all: each message says what to give instead
    (``steplm export RUN --to DIR`` makes an HF folder of a finished run). None otherwise."""
    if not d.exists():
        return f"{d} does not exist (give an HF Llama directory; `steplm export RUN --to DIR` makes one of a run)"
    if not d.is_dir() or (d / "config.json").is_file():
        return None  # read_config says what is wrong with it, or reads it
    if (d / "MANIFEST.json").is_file() or (d / "trainer.pt").is_file() or d.name.startswith("step_"):
        run, what = (d.parent.parent if d.parent.name == "checkpoints" else d), "is a checkpoint of"
    elif d.name == "checkpoints" or any(c.name.startswith("step_") for c in d.iterdir() if c.is_dir()):
        run, what = d.parent, "holds the checkpoints of"
    elif (d / "config.yaml").is_file():
        run, what = d, "is"
    else:
        return f"{d} has no config.json: not an HF Llama directory (`steplm export RUN --to DIR` makes one of a run)"
    if (run == d and what != "is") or not (run / "config.yaml").is_file():  # a checkpoint moved out of its run
        return f"{d} is a steplm checkpoint, not an HF model directory; give an HF Llama directory"
    finished = (run / "model_config.json").is_file() and (run / "model.safetensors").is_file()
    kind = "steplm run" if finished else "unfinished steplm run"
    name = f"is {'a' if finished else 'an'} {kind}" if what == "is" else f"{what} the {kind} {run}"
    finish = "" if finished else "finish the run (rerun its steplm train command), then "
    it = ("it" if run == d else "the run") + (" first" if finished else "")
    return (f"{d} {name}, not an HF model directory; {finish}export {it} (steplm export {run} --to DIR) and give "
            f"{source} DIR")


def _differing(cfg: RunConfig, given: set[str], given_tokenizer: bool, ck: ModelConfig) -> list[tuple[str, str, str]]:
    """(key, our value, the checkpoint's) for every key in ``given`` (model keys, and data.tokenizer
    when ``given_tokenizer``) that model.init_from's checkpoint ``ck`` sets otherwise."""
    from steplm.io.hf import HF_NAMES

    m, out = cfg.model, []
    for f in dataclasses.fields(ModelConfig):
        if f.name in given and f.name not in NOT_FROM_CHECKPOINT and getattr(m, f.name) != getattr(ck, f.name):
            out.append((f"model.{f.name}", repr(getattr(m, f.name)), f"{HF_NAMES.get(f.name, f.name)} {getattr(ck, f.name)!r}"))
    if given_tokenizer and Path(cfg.data.tokenizer).expanduser().resolve() != Path(m.init_from).expanduser().resolve():
        out.append(("data.tokenizer", repr(cfg.data.tokenizer), "its tokenizer is used as-is"))
    return out


def init_from_conflicts(cfg: RunConfig, given: set[str], given_tokenizer: bool, ck: ModelConfig,
                        source: str = "model.init_from", in_file: set[str] = frozenset()) -> list[str]:
    """The model keys in ``given`` (and data.tokenizer) whose values differ from model.init_from's
    checkpoint ``ck``, each naming both sides and the fix: drop the key (``in_file``: dotted keys
    that a config file gave, to be removed from it), or point data.tokenizer at the folder."""
    out = []
    for key, mine, theirs in _differing(cfg, given, given_tokenizer, ck):
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
    """Fill ``cfg`` in place from model.init_from: every architecture key from its config.json,
    data.tokenizer = the directory, model.n_layers = its depth unless given. Returns the conflicts
    with keys the user gave (``given``: model keys; ``given_tokenizer``: data.tokenizer), if any.
    ``yielding`` (dotted keys a config file gave while model.init_from came from the command line,
    which beats the file) are not conflicts: the checkpoint's values replace them, said in one warning."""
    import sys

    ck = checkpoint_config(cfg, source)
    replaced = [c for c in _differing(cfg, given, given_tokenizer, ck) if c[0] in yielding]
    keep = {k.split(".", 1)[1] for k in yielding if k.startswith("model.")}
    conflicts = init_from_conflicts(cfg, given - keep, given_tokenizer and "data.tokenizer" not in yielding, ck,
                                    source, in_file)
    if not conflicts:
        n_layers = cfg.model.n_layers if "n_layers" in given else ck.n_layers
        cfg.model = dataclasses.replace(ck, n_layers=n_layers, init_std=cfg.model.init_std,
                                        init_from=cfg.model.init_from)
        cfg.data.tokenizer = cfg.model.init_from
        if replaced:
            print(f"steplm: warning: {source} {cfg.model.init_from} fixes the architecture and the tokenizer: the "
                  f"config file's {', '.join(f'{k} {mine}' for k, mine, _ in replaced)} give way to its "
                  f"{', '.join(theirs for k, _, theirs in replaced if k != 'data.tokenizer') or 'tokenizer'}",
                  file=sys.stderr)
    return conflicts
