"""Reading a RunConfig: YAML files (a key given twice is refused), ``key=value`` overrides (``--set``),
model.init_from; every value checked against its field before any object is built, every problem
reported together. ``save`` writes the resolved config back as YAML. No torch."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from steplm.config.init_from import resolve_init_from
from steplm.config.presets import preset_names, resolve_config
from steplm.config.schema import SECTIONS, RunConfig
from steplm.config.validate import Raw, _show, check_value, config_error, value_problem
from steplm.errors import UserError


def _section(cls, value: Any, name: str, problems: list[str], unknown: list[str], ranges: list[str]):
    """One config section built from a mapping, every value checked first; None if anything is wrong.
    Range problems of values that did type-check go to ``ranges``, reported only with type problems
    (otherwise ``validate`` reports them)."""
    if not isinstance(value, dict):
        problems.append(f"{name}: must be a mapping of {name} keys, got {_show(value)}")
        return None
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    given, before = {}, len(problems)
    for k, v in value.items():
        if k not in names:
            unknown.append(f"{name}.{k}")
            continue
        mine: list[str] = []
        given[k] = check_value(v, hints[k], f"{name}.{k}", mine)
        problems += mine
        if not mine and value_problem(f"{name}.{k}", given[k]):
            ranges.append(value_problem(f"{name}.{k}", given[k]))
    if len(problems) > before:
        return None
    # Built only from checked values, so __post_init__ (derived n_kv_heads, ffn_hidden) sees no garbage.
    return cls(**given)


def from_dict(d: dict, init_source: str = "model.init_from", file_keys: set[str] | None = None) -> RunConfig:
    """Build a RunConfig from nested dicts. Every value is checked against its field's annotation
    before any object is built; unknown keys and wrong types are reported together in one error.
    With model.init_from, the model keys not given are taken from that directory (``resolve_init_from``);
    ``init_source`` is how errors name it (``--init-from`` when it came from the flag). ``file_keys``:
    the dotted keys a config file gave and the command line did not (None: all came from one place);
    when model.init_from is not among them, the command line's folder replaces their architecture."""
    if not isinstance(d, dict):
        raise UserError(f"config: top level must be a mapping of sections (method, {', '.join(SECTIONS)}), "
                        f"got {_show(d)}")
    cfg = RunConfig()
    unknown: list[str] = []
    problems: list[str] = []
    ranges: list[str] = []
    for key, value in d.items():
        if key == "method":
            method = check_value(value, str, "method", problems)
            if method is not None:
                cfg.method = method
        elif key in SECTIONS:
            if value is None:
                continue
            section = _section(SECTIONS[key], value, key, problems, unknown, ranges)
            if section is not None:
                setattr(cfg, key, section)
        else:
            unknown.append(str(key))
    found = []
    if unknown:
        found.append(f"unknown config key{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
    if found or problems:
        raise config_error(found + problems + (ranges if problems else []))
    if cfg.model.init_from:
        given_model = set(d["model"]) if isinstance(d.get("model"), dict) else set()
        given_data = set(d["data"]) if isinstance(d.get("data"), dict) else set()
        in_file = set(file_keys or ())
        yielding = set() if "model.init_from" in in_file else in_file  # the command line beats the file
        conflicts = resolve_init_from(cfg, given_model, "tokenizer" in given_data, init_source, in_file, yielding)
        if conflicts:
            raise config_error(conflicts)
    cfg.resolve_shape_defaults()  # after model.init_from, which may set model.d_model
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (safe_load keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue  # merge keys (<<: *base) are resolved by flatten_mapping; complex keys left to YAML
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice (line {key_node.start_mark.line + 1})",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def override_key(item: str) -> str:
    """The key of one ``key=value`` override (``--set`` item), e.g. 'train.lr'."""
    return item.split("=", 1)[0].strip()


def load(path: str | Path | None, overrides: list[str] = (), init_from: str | None = None) -> RunConfig:
    """Read a YAML config (a file, a preset's name (``presets.resolve_config``), or the defaults if
    ``path`` is None) and apply ``key=value`` overrides, then ``init_from`` (the --init-from flag,
    which sets model.init_from)."""
    d: dict = {}
    if path is not None:
        p = resolve_config(path)  # a preset's name (tiny-step) is its packaged file
        if p.is_dir():
            raise UserError(f"config file {p} is a directory; give a YAML file or a preset's name ({presets()})")
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        d = _read_yaml(p)
    in_file = {f"{section}.{k}" for section, part in d.items() if isinstance(part, dict) for k in part}
    if "method" in d:
        in_file.add("method")
    given: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. train.lr=1e-3")
        key, value = item.split("=", 1)
        if override_key(item) in given and given[override_key(item)] != value:  # which was meant? (as YAML refuses)
            raise UserError(f"--set {override_key(item)}: given twice ({given[override_key(item)]!r}, then {value!r}); "
                            f"give it once")
        given[override_key(item)] = value
        parts = key.strip().split(".")
        if len(parts) == 1 and parts[0] == "method":
            d["method"] = Raw(value)
        elif len(parts) == 2:
            section = d.get(parts[0])
            if section is None:
                section = d[parts[0]] = {}
            if isinstance(section, dict):  # otherwise from_dict names the section that is not a mapping
                section[parts[1]] = Raw(value)
        else:
            raise UserError(f"--set {item!r}: key must look like section.name, e.g. train.lr")
    in_file -= set(given)
    if init_from is not None:
        if not isinstance(d.get("model", {}), dict):
            return from_dict(d)  # names the model section that is not a mapping
        d.setdefault("model", {})["init_from"] = init_from
        return from_dict(d, "--init-from", in_file - {"model.init_from"})
    return from_dict(d, file_keys=in_file)


def _read_yaml(p: Path) -> dict:
    """A config file's sections as a dict (duplicate keys refused); UserError if unreadable."""
    try:
        d = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"config file {p} cannot be read ({e})")
    if not isinstance(d, dict):
        raise UserError(f"config file {p}: top level must be a mapping of sections "
                        f"(method, {', '.join(SECTIONS)}), got {_show(d)}")
    return d


def load_saved(path: str | Path) -> RunConfig:
    """A run folder's config.yaml (``save``'s output), read as the run meant it: a run started before
    empty strings were refused saved ``val_path: ''`` (or an empty ``exclude`` entry), which it read as
    the key not given, so such a value is left out here (its default: unset). A resume or a plot of that
    run then reads it instead of refusing a file the user did not write."""
    d = _read_yaml(Path(path))
    blank = lambda v: isinstance(v, str) and not v.strip()  # noqa: E731
    for section in d.values():
        if isinstance(section, dict):
            for k in [k for k, v in section.items() if blank(v)]:
                del section[k]
            for k, v in section.items():
                if isinstance(v, list) and any(blank(x) for x in v):
                    section[k] = [x for x in v if not blank(x)]
    return from_dict(d)


def presets() -> str:
    """The preset names, for a message."""
    return ", ".join(preset_names()) or "none installed"


def save(cfg: RunConfig, path: str | Path):
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


