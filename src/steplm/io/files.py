"""Reading the files a user hands steplm (run folders, HF model folders, token caches, questions),
each failure turned into one ``UserError`` line that names the file and what to give instead.

A truncated safetensors file, a tokenizer.json that is not JSON, a model_config.json holding a list:
without these wrappers each one surfaced as a library traceback (json, safetensors, tokenizers'
Rust panic) instead of exit 2 (``errors``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steplm.errors import UserError

if TYPE_CHECKING:
    import torch


def read_json(path: str | Path, key: str, kind: type | None = dict) -> Any:
    """The parsed JSON of ``path``; ``kind`` (dict, list or None for any) is the top-level type it
    must have. ``key``: what the file is to the user (MODEL, --questions, ...), the UserError's key."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(key=key, message=f"{p} does not exist")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(key=key, message=f"{p} is not readable JSON ({one_line(e)})")
    if kind is not None and not isinstance(data, kind):
        want = {dict: "a JSON object", list: "a JSON list"}.get(kind, kind.__name__)
        raise UserError(key=key, message=f"{p} must hold {want}, got {type(data).__name__}")
    return data


def read_jsonl(path: str | Path, key: str) -> list[dict]:
    """The JSON objects of a JSON-lines file (blank lines skipped), each one checked."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(key=key, message=f"{p} does not exist")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(key=key, message=f"{p} is not readable text ({one_line(e)})")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(key=key, message=f"{p} line {i} is not JSON ({one_line(e)})")
        if not isinstance(row, dict):
            raise UserError(key=key, message=f"{p} line {i} must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def read_tokenizer(path: str | Path, key: str):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json. tokenizers raises plain Exceptions for bad
    JSON and a Rust PanicException (a BaseException) for some inconsistent vocabularies: both are
    bad input here."""
    from tokenizers import Tokenizer
    p = Path(path)
    if not p.is_file():
        raise UserError(key=key, message=f"{p} does not exist")
    try:
        return Tokenizer.from_file(str(p))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - includes pyo3's PanicException
        raise UserError(key=key, message=f"{p} is not a readable tokenizer.json ({one_line(e)})")


def read_safetensors(path: str | Path, key: str, device="cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (truncated, garbage or missing files are bad input)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    p = Path(path)
    if not p.is_file():
        raise UserError(key=key, message=f"{p} does not exist")
    try:
        return load_file(str(p), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(key=key, message=f"{p} is not a readable safetensors file ({one_line(e)})")


def one_line(e: BaseException) -> str:
    """An exception's message on one line, at most 160 characters."""
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 160 else msg[:157] + "..."


def finite_or_text(obj):
    """``obj`` with every non-finite float replaced by its text ("nan", "inf", "-inf"), recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: finite_or_text(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_text(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """Strict JSON (no bare NaN/Infinity): non-finite floats are written as strings."""
    return json.dumps(finite_or_text(obj), allow_nan=False, **kwargs)
