"""The run configs that ship with steplm: ``configs/*.yaml`` at the repository's root, installed as
``steplm/configs/`` by the build step in setup.py. A preset is named without a path or .yaml
(`steplm train paper-368m`, `steplm plan tiny-step`); a file that exists, or a path with a folder
in it, always means that file."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from steplm.errors import UserError


def preset_dir() -> Path | None:
    """The folder of the presets: the installed package's steplm/configs, else (a source tree run
    with PYTHONPATH=src or installed editable) the repository's configs/; None if neither exists."""
    packaged = Path(str(resources.files("steplm") / "configs"))
    if packaged.is_dir():
        return packaged
    tree = Path(__file__).resolve().parents[3] / "configs"
    return tree if tree.is_dir() else None


def preset_names() -> list[str]:
    """The presets' names, sorted (each a ``NAME.yaml`` of ``preset_dir``)."""
    d = preset_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d else []


def resolve_config(spec: str | Path) -> Path:
    """The YAML file a config argument names: an existing file (or folder) or a path with a folder in
    it as it is, else the preset of that name (with or without .yaml). A bare name that is neither is
    a UserError listing the presets."""
    p = Path(spec)
    if p.exists() or len(p.parts) != 1:
        return p
    d = preset_dir()
    name = p.stem if p.suffix in (".yaml", ".yml") else p.name
    if d is not None and (d / f"{name}.yaml").is_file():
        return d / f"{name}.yaml"
    names = ", ".join(preset_names()) or "none are installed"
    raise UserError(f"config file not found: {spec}, and no preset has that name (presets: {names}); give a YAML "
                    f"file's path or a preset's name")
