"""Corpus reading: the documents of a file, a folder or a HF dataset, and the stable
document-level validation split (a hash of each document's id).
"""
from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from steplm.errors import UserError
from steplm.io.files import one_line

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


# ---------------------------------------------------------------------------- reading
def _suffix(p: Path) -> str:
    return ".jsonl.gz" if p.name.endswith(".jsonl.gz") else p.suffix


@dataclass
class Sources:
    """What a local data path stands for: the files read, and those under it that are not read."""
    files: list[Path]
    """The files read, sorted."""
    excluded: dict[str, int] = field(default_factory=dict)
    """Readable files skipped because a directory on their path is named in data.exclude, by that name."""
    other: dict[str, int] = field(default_factory=dict)
    """Files skipped for their suffix (not one of TEXT_SUFFIXES + RECORD_SUFFIXES), by suffix."""


ALWAYS_SKIPPED = ("__pycache__",)
"""Directory names never read (they hold no text: compiled bytecode)."""


def scan_sources(path: str, exclude: list[str] = (), key: str = "data.path") -> Sources:
    """The files a data path stands for (sorted), and what under it is skipped and why; raises
    UserError, naming ``key``, for a missing or empty path."""
    p = Path(path).expanduser()
    if p.is_file():
        return Sources([p])
    if not p.is_dir():
        raise UserError(f"{path} does not exist (give a file, a directory, or a local HF dataset)", key=key)
    skip, out = set(exclude), Sources([])
    for f in sorted(p.rglob("*")):
        parts = f.relative_to(p).parts[:-1]
        if not f.is_file() or set(ALWAYS_SKIPPED).intersection(parts):
            continue
        if _suffix(f) not in TEXT_SUFFIXES + RECORD_SUFFIXES:
            out.other[_suffix(f) or f.name] = out.other.get(_suffix(f) or f.name, 0) + 1
        elif skip.intersection(parts):
            name = next(part for part in parts if part in skip)
            out.excluded[name] = out.excluded.get(name, 0) + 1
        else:
            out.files.append(f)
    if not out.files:
        why = f" ({sum(out.excluded.values())} more under directories data.exclude skips)" if out.excluded else ""
        raise UserError(f"no .txt/.jsonl/.jsonl.gz/.parquet/.py/.md/.rst files under {p}{why}", key=key)
    return out


def list_sources(path: str, exclude: list[str] = (), key: str = "data.path") -> list[Path]:
    """The files a data path stands for, sorted (``scan_sources``)."""
    return scan_sources(path, exclude, key).files


def read_documents(path: str, text_field: str = "text", exclude: list[str] = (), key: str = "data.path",
                   field_key: str = "data.text_field") -> Iterator[tuple[str, str]]:
    """Yield (document id, text) for every document under ``path``. Errors are one-line UserErrors
    naming ``key`` (the path's config key or flag) and ``field_key`` (the record field's)."""
    for f in list_sources(path, exclude, key):
        suffix = _suffix(f)
        try:
            if suffix not in RECORD_SUFFIXES:  # .txt, .py, or a file named on its own: UTF-8 text
                yield str(f), f.read_text(encoding="utf-8")
            elif suffix in (".jsonl", ".jsonl.gz"):
                opener = gzip.open if suffix == ".jsonl.gz" else open
                with opener(f, "rt", encoding="utf-8") as fh:
                    for n, line in enumerate(fh, 1):
                        if not line.strip():
                            continue
                        try:
                            rec = json.loads(line)
                        except json.JSONDecodeError:
                            raise UserError(f"line {n} of {f} is not valid JSON", key=key)
                        if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                            raise UserError(f"line {n} of {f} has no string field '{text_field}' "
                                            f"(set {field_key})", key=key)
                        yield f"{f}:{n}", rec[text_field]
            else:  # parquet
                import pyarrow
                import pyarrow.parquet as pq
                try:
                    table = pq.read_table(f)
                except pyarrow.ArrowException as e:
                    raise UserError(f"{f} is not a readable parquet file ({one_line(e)})", key=key)
                if text_field not in table.column_names:
                    raise UserError(f"{f} has no column '{text_field}' (set {field_key})", key=key)
                for n, text in enumerate(table.column(text_field).to_pylist()):
                    yield f"{f}:{n}", text or ""
        except UnicodeDecodeError:
            raise UserError(f"{f} is not UTF-8 text", key=key)
        except (OSError, EOFError) as e:
            if isinstance(e, UserError):
                raise
            raise UserError(f"cannot read {f} ({one_line(e)})", key=key)


def read_hf_dataset(name: str, text_field: str, key: str = "data.path") -> Iterator[tuple[str, str]]:
    """Documents of a Hugging Face dataset's train split (needs `datasets` and a reachable hub)."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{name} is not a local path, and reading a hub dataset needs `pip install datasets`", key=key)
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # noqa: BLE001 - anything the hub raises becomes one line
        raise UserError(f"{name} is not a local path and could not be loaded from the hub ({type(e).__name__})",
                        key=key)
    for n, rec in enumerate(ds):
        yield f"{name}:{n}", rec[text_field]


def _looks_local(path: str) -> bool:
    p = Path(path).expanduser()
    return p.exists() or path.startswith((".", "/", "~")) or _suffix(p) in TEXT_SUFFIXES + RECORD_SUFFIXES


def documents(path: str, text_field: str = "text", exclude: list[str] = (), key: str = "data.path"
              ) -> Iterator[tuple[str, str]]:
    """Local path if it exists, else a hub dataset name of the form owner/name or name."""
    if _looks_local(path):
        return read_documents(path, text_field, exclude, key)
    return read_hf_dataset(path, text_field, key)


def is_validation(doc_id: str, fraction: float) -> bool:
    """Stable document-level split: hash of the document id."""
    # surrogateescape: a file name that is not UTF-8 reaches Python with lone surrogates (its bytes, kept)
    h = int.from_bytes(hashlib.sha1(doc_id.encode("utf-8", "surrogateescape")).digest()[:8], "big")
    return h / 2**64 < fraction


