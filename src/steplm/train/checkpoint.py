"""Atomic, checksummed checkpoints: one directory per step under ``RUN_DIR/checkpoints``.

A checkpoint is written into ``step_XXXXXXXX.tmp-PID``, every file is fsynced, a MANIFEST.json with
each file's SHA-256 is written last, then the directory is renamed into place and the parent is
fsynced. A checkpoint counts only if its manifest exists and every checksum matches, so a crash or
a full disk at any moment leaves the previous good checkpoint usable.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from steplm.errors import UserError
from steplm.train import faults

MANIFEST = "MANIFEST.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# what resuming reads, and the tokenizer a checkpoint read as a model uses (written since checkpoints
# carry it; an older checkpoint without it reads its run's)
REQUIRED = ("model.safetensors", "trainer.pt", "config.yaml", "tokenizer.json")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def save(root: Path, step: int, writers: dict, keep: int) -> Path:
    """Write a checkpoint atomically. ``writers`` maps file name -> callable(path) that writes it.
    Keeps the newest ``keep`` checkpoints. Raises UserError (and leaves nothing half-written) when
    the disk is full or not writable."""
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        sums = {}
        for name, write in writers.items():
            path = tmp / name
            write(path)
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            sums[name] = _sha256(path)
            faults.crash("kill_in_checkpoint", step)
            faults.crash("enospc_in_checkpoint", step)
        with open(tmp / MANIFEST, "w") as f:
            json.dump({"step": step, "sha256": sums}, f, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise UserError(f"--out: cannot write checkpoint for step {step} under {root} ({e.strerror}); "
                            f"the previous checkpoint is kept, free space and rerun to resume")
        raise
    for old in list_steps(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(step_dir(root, old), ignore_errors=True)
    return final


def list_steps(root: Path) -> list[int]:
    """Steps of the completed (renamed) checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    steps = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and ".tmp" not in p.name:
            try:
                steps.append(int(p.name[5:]))
            except ValueError:
                continue
    return sorted(steps)


def verify(path: Path) -> str | None:
    """None if the checkpoint is intact, else what is wrong with it."""
    m = path / MANIFEST
    if not m.is_file():
        return "no manifest"
    try:
        sums = json.loads(m.read_text())["sha256"]
    except (ValueError, KeyError, TypeError, OSError):
        return "unreadable manifest"
    if not isinstance(sums, dict) or not sums or not all(isinstance(v, str) for v in sums.values()):
        return "unreadable manifest"
    unlisted = sorted(n for n in REQUIRED if (path / n).exists() and n not in sums)
    if unlisted:  # a file the loader reads must be checksummed (other files, e.g. .DS_Store, are ignored)
        return f"{unlisted[0]} is not in the manifest"
    for name, digest in sums.items():
        if Path(name).name != name:
            return "unreadable manifest"
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} fails its checksum"
    return None


def latest_valid(root: Path, log=lambda msg: print(msg, file=sys.stderr), check=verify) -> Path | None:
    """The newest intact checkpoint (``check``: what is wrong with one, None when intact); says so when
    it has to skip a corrupt one."""
    for step in reversed(list_steps(root)):
        path = step_dir(root, step)
        problem = check(path)
        if problem is None:
            return path
        log(f"steplm: checkpoint {path.name} is corrupt ({problem}); falling back to the previous one")
    return None
