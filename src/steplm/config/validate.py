"""Validation of a whole RunConfig: one generic checker reads every field's type, choices and range
from the schema, then the rules that tie fields together; every problem is collected and reported
at once, each naming the key to change (``validate`` raises one UserError). No torch."""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Literal

import yaml

from steplm.config.schema import ModelConfig, RunConfig, SECTIONS, dotted_fields
from steplm.errors import UserError
from steplm.methods import REGISTRY as _METHODS
from steplm.methods.base import init_depth
from steplm.plan.memory import MASTER_WEIGHTS, OPTIMIZER_STATES, Precision


class Raw(str):
    """A --set value as typed: kept as text for string fields, read as YAML for the others."""


def _show(value: Any, limit: int = 40) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[:limit - 3] + "..."


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
          dict: "a mapping such as {rope_type: linear, factor: 4}"}


def _describe(hint) -> str:
    """What a value of this annotation looks like, for error messages."""
    hint = _plain(hint)
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(args[0]).split(' ', 1)[-1]}s"
    return _KINDS.get(hint, getattr(hint, "__name__", str(hint)))


def _plain(hint):
    """A Literal of strings checks as str (its choices are checked with the ranges, in value_problem)."""
    return str if typing.get_origin(hint) is Literal else hint


def _accepts_str(hint) -> bool:
    hint = _plain(hint)
    return hint is str or (typing.get_origin(hint) in (types.UnionType, typing.Union) and str in typing.get_args(hint))


_NULLS = ("null", "Null", "NULL", "~")  # YAML's spellings of null


def is_plain_int(text: str) -> bool:
    """Whether ``text`` is an integer in ASCII digits with an optional minus ('7', '-1'); Python's int()
    and YAML 1.1 also take '+7', '7_0', '0x7' and other scripts' digits, which a count is not written as."""
    return re.fullmatch(r"-?[0-9]+", text) is not None


def _list_item(hint):
    """The item type of a list field (``list[X]`` or ``list[X] | None``), else None."""
    hint = _plain(hint)
    lists = [h for h in (hint, *typing.get_args(hint)) if typing.get_origin(h) is list]
    return typing.get_args(lists[0])[0] if lists else None


def check_value(value: Any, hint, key: str, problems: list[str]) -> Any:
    """``value`` checked against the field annotation ``hint`` (bool, int, float, str, dict, ``X | None``,
    ``list[X]``): returns it (ints widened to float for float fields, YAML 1.1's "1e-3" strings read
    as numbers), or appends a problem naming ``key`` and returns None. Bools are not integers, and a
    float must be finite."""
    if (isinstance(value, str) and not value.strip() and key != "method" and typing.get_origin(hint) is not Literal
            and (isinstance(value, Raw) or _accepts_str(hint))):
        # `--set KEY=`, `--section.key ""` or `key: ""` in a YAML file: a string key would keep "", which
        # reads as unset (data.val_path, model.init_from, ...), and YAML reads the rest as null; a slip,
        # never taken as "not given" (null, or leaving the key out, is how a file says that)
        kind = "a non-empty string" if _accepts_str(hint) else _describe(hint)
        unset = ("" if isinstance(value, Raw) else " (remove the empty entry)" if key.endswith("]")
                 else " (write null or leave the key out)" if type(None) in typing.get_args(hint)
                 else " (leave the key out for its default)")
        problems.append(f"{key}: expected {kind}, got an empty value{unset}")
        return None
    if isinstance(value, Raw):
        if _accepts_str(hint) and type(None) in typing.get_args(hint) and value.strip() in _NULLS:
            # `--set data.val_path=null`: YAML's null, the way to unset a key a config file gives (an empty
            # value is refused), not a path or hub dataset named "null" (write ./null for a file so named)
            return None
        if _accepts_str(hint):
            return str(value)
        raw = value
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            problems.append(f"{key}: cannot read {str(value)!r} as {_describe(hint)}")
            return None
        if _list_item(hint) is not None and value is not None and not isinstance(value, (list, dict)):
            # the command line's plain list: `--set step.layers_per_stage=4,2` (or `=6`) as YAML's [4, 2]
            # each item stripped, as YAML's [a, b] is: `--set data.exclude="tests, docs"` skips docs, not " docs"
            value = [Raw(x.strip()) for x in str(raw).split(",")]
            if _list_item(hint) is int:  # written as plan --layers-per-stage takes it: YAML 1.1 would also
                # read '+4', '2_0', '0x4' and '4:2' (base 60) as integers
                bad = [f"{key}[{i}]: must be an integer, got {str(x)!r}" for i, x in enumerate(value)
                       if x and not is_plain_int(x)]
                if bad:
                    problems += bad
                    return None
    hint = _plain(hint)
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        if len(options) != 1:
            raise TypeError(f"{key}: unsupported annotation {hint}")  # a programming error, not bad input
        mine: list[str] = []
        out = check_value(value, options[0], key, mine)
        problems += [m.replace(f"must be {_describe(options[0])}", f"must be {_describe(hint)}") for m in mine]
        return out
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            problems.append(f"{key}: must be {_describe(hint)}, got {_show(value)}")
            return None
        (item,) = typing.get_args(hint)
        return [check_value(v, item, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if hint not in _SCALARS:
        raise TypeError(f"{key}: unsupported annotation {hint}")
    try:
        return _SCALARS[hint](value)
    except _Bad as e:
        problems.append(f"{key}: {e.args[0] if e.args else f'must be {_describe(hint)}'}, got {_show(value)}")
        return None


class _Bad(Exception):
    """A value of the wrong type (args: the message before ', got VALUE', if not the plain one)."""


def _exact(kind):
    """The check of a field that takes ``kind`` itself (bools are not integers)."""
    def check(value):
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise _Bad()
        return value
    return check


def _mapping(value):  # a mapping whose contents the owning section checks (model.rope_scaling)
    if not isinstance(value, dict):
        raise _Bad()
    return value


def _finite(value) -> float:
    """A float field: a number (ints widened; YAML 1.1 reads "1e-3", no dot, as a string) that is finite."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _Bad()
    try:
        number = float(value)
    except ValueError:
        raise _Bad()
    except OverflowError:
        raise _Bad("must be a finite number")
    if not math.isfinite(number):
        raise _Bad("must be a finite number")
    return number


_SCALARS = {bool: _exact(bool), str: _exact(str), int: _exact(int), dict: _mapping, float: _finite}


def value_problem(key: str, v) -> str | None:
    """The range or choice problem of one type-checked value of config key ``key``, if any: read from
    the field (a ``Range`` in its metadata, ``Literal`` choices, or ``choices`` in its metadata)."""
    if key == "method":  # a registered method (read at check time: registering one needs no other line)
        return None if v in _METHODS else f"method: must be one of {', '.join(_METHODS)}, got {v!r}"
    cls, f = dotted_fields()[key]
    if v is None:
        return None
    rng = f.metadata.get("range")
    if rng is not None and v not in rng:
        return f"{key}: {rng.text}, got {v!r}"
    hint = typing.get_type_hints(cls)[f.name]
    choices = f.metadata.get("choices") or (typing.get_args(hint) if typing.get_origin(hint) is Literal else None)
    if choices is not None and v not in choices:
        return f"{key}: must be one of {', '.join(choices)}, got {v!r}"
    return None


def _get(cfg: RunConfig, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def type_problems(cfg: RunConfig) -> list[str]:
    """Every value of ``cfg`` that does not match its field's annotation (``from_dict`` and ``load``
    refuse such values already; this covers configs built in code)."""
    out: list[str] = []
    check_value(cfg.method, str, "method", out)
    for name, cls in SECTIONS.items():
        section = getattr(cfg, name)
        if not isinstance(section, cls):
            out.append(f"{name}: must be a {cls.__name__}, got {_show(section)}")
            continue
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            check_value(getattr(section, f.name), hints[f.name], f"{name}.{f.name}", out)
    return out


def problems(cfg: RunConfig) -> list[str]:
    """Every problem in the config, each naming the key to change: wrong types first (nothing else
    is checked then), else ranges, choices and consistency."""
    out = type_problems(cfg)
    if out:
        return out
    out = list(cfg.model.problems())
    for key in dotted_fields():
        found = value_problem(key, _get(cfg, key))
        if found:
            out.append(found)
    out += _shape_problems(cfg) + _tokenizer_problems(cfg) + _stage_problems(cfg)
    prec = Precision(cfg.train.optimizer_states, cfg.train.master_weights)
    if prec.optimizer_states in OPTIMIZER_STATES and prec.master_weights in MASTER_WEIGHTS:
        out += prec.problems()
    if cfg.method in _METHODS:
        out += _METHODS[cfg.method].problems(cfg)
    if cfg.model.init_from:
        out = _init_from_problems(cfg, out) + out
    return out


def _shape_problems(cfg: RunConfig) -> list[str]:
    """Windows that fit the model and the evaluation, ranks that fit the width."""
    t, m, out = cfg.train, cfg.model, []
    if t.seq_len > m.max_seq_len > 0:
        out.append(f"train.seq_len: must be at most model.max_seq_len ({m.max_seq_len}), got {t.seq_len}")
    if cfg.sft.model is None and 0 < t.eval_tokens < t.seq_len:  # validation scores whole windows (SFT has none)
        out.append(f"train.eval_tokens: must be at least one window of train.seq_len ({t.seq_len}) tokens, "
                   f"got {t.eval_tokens}")
    ranks = {"lora.rank": cfg.lora.rank, "galore.rank": cfg.galore.rank, "apollo.rank": cfg.apollo.rank}
    for key in ("lora.rank", f"{cfg.method}.rank"):  # the projected methods' own rank, when they run
        rank = ranks.get(key)
        if rank is not None and rank > m.d_model > 0:  # past the full rank saves nothing (APOLLO's costs more)
            out.append(f"{key}: must be at most model.d_model ({m.d_model}), got {rank}")
    return out


def _tokenizer_problems(cfg: RunConfig) -> list[str]:
    """What data.load_tokenizer would refuse of a 'bpe:N', found before training (plan too)."""
    tok, m = cfg.data.tokenizer, cfg.model
    if not tok.startswith("bpe:"):
        return []
    n = tok[4:]
    if not n.isdigit():
        return [f"data.tokenizer: 'bpe:N' needs an integer N, got {tok!r}"]
    if int(n) < 300:
        return [f"data.tokenizer: bpe vocabulary must be at least 300 (256 bytes + merges), got {int(n)}"]
    if int(n) > m.vocab_size > 0 and not m.init_from:  # else found only after the whole corpus is tokenized
        return [f"model.vocab_size: {m.vocab_size} is below the {int(n)} tokens data.tokenizer {tok} trains; "
                f"raise model.vocab_size or lower N"]
    return []


def _stage_problems(cfg: RunConfig) -> list[str]:
    """step.n_stages and step.layers_per_stage against the final depth."""
    s, L, out = cfg.step, cfg.model.n_layers, []
    if s.n_stages > L > 0:
        out.append(f"step.n_stages: must be at most model.n_layers ({L}), got {s.n_stages}")
    lps = s.layers_per_stage
    if lps is None:
        return out
    if not all(n >= 1 for n in lps):
        return out + [f"step.layers_per_stage: must be a list of positive integers, got {lps!r}"]
    if len(lps) != s.n_stages:
        out.append(f"step.layers_per_stage: needs step.n_stages ({s.n_stages}) entries, got {len(lps)}")
    if L > 0 and sum(lps) != L:
        out.append(f"step.layers_per_stage: must sum to model.n_layers ({L}), got {sum(lps)}")
    grown = [i for i in range(1, len(lps)) if lps[i] > sum(lps[:i])]
    if s.cap_growth is True and grown:  # the split given breaks the cap the config asks for
        i = grown[0]
        out.append(f"step.layers_per_stage: stage {i + 1} adds {lps[i]} layers to {sum(lps[:i])}, more than "
                   f"step.cap_growth allows (n_(i+1) <= N_i); change the split or drop step.cap_growth")
    return out


def _init_from_problems(cfg: RunConfig, others: list[str]) -> list[str]:
    """A config built in code must agree with model.init_from's checkpoint on every architecture key,
    and be at least as deep; then the method's own rules for a start from it (only when ``others``,
    the config's other problems, is empty)."""
    from steplm.config.init_from import checkpoint_config, init_from_conflicts

    m = cfg.model
    mine = init_from_conflicts(cfg, {f.name for f in dataclasses.fields(ModelConfig)}, True,
                               checkpoint_config(cfg, "model.init_from"))
    depth = init_depth(cfg)
    if not mine and isinstance(m.n_layers, int) and m.n_layers < depth:
        mine.append(f"model.n_layers: the final depth must be at least model.init_from {m.init_from}'s "
                    f"({depth}), got {m.n_layers}")
    if not mine and not others and cfg.method in _METHODS:
        mine += _METHODS[cfg.method].init_problems(cfg, depth)
    return mine


def validate(cfg: RunConfig):
    """Raise one UserError listing every problem (joined with '; ')."""
    found = problems(cfg)
    if found:
        raise config_error(found)


# Keys that may differ when a run resumes: they change logging and bookkeeping, not the trajectory.
RESUME_SAFE_KEYS = {"train.eval_every", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                    "train.eval_tokens", "data.cache_dir", "train.host_allocator"}


def unread_keys(cfg: RunConfig) -> set[str]:
    """Keys whose value cannot change this run, among those whose default has changed: the projection
    rank of a method the run does not use (galore.rank, apollo.rank now follow model.d_model), and
    data.exclude when neither data path is a directory (it names directories to skip; it was
    [test, tests, idle_test]). A resume does not compare them, so a run started under the old
    defaults still resumes."""
    from pathlib import Path

    out = {f"{name}.rank" for name in ("galore", "apollo") if cfg.method != name}
    paths = [p for p in (cfg.data.path, cfg.data.val_path) if p]
    if not any(Path(p).expanduser().is_dir() for p in paths):
        out.add("data.exclude")
    return out


def differing_keys(a: RunConfig, b: RunConfig) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    da, db = a.to_dict(), b.to_dict()
    out = []
    for sec in da:
        if isinstance(da[sec], dict):
            out += [f"{sec}.{k}" for k in da[sec] if da[sec][k] != db.get(sec, {}).get(k)]
        elif da[sec] != db.get(sec):
            out.append(sec)
    return out


def config_error(found: list[str]) -> UserError:
    """One UserError of several problems, each "<key>: <message>" as ``problems`` writes them, kept
    as (key, message) pairs so that the command line can name each key as the flag that set it."""
    pairs = []
    for p in found:
        key, sep, message = p.partition(": ")
        is_key = sep and (key == "method" or key.split("[")[0] in dotted_fields())
        pairs.append((key, message) if is_key else (None, p))
    return UserError(problems=pairs)
