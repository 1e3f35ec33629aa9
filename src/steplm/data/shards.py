"""Tokenization into uint16/uint32 memmap shards, one token stream per split (documents joined
with EOS), cached by a key over the sources and the tokenizer.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steplm.data.corpus import _looks_local, documents, is_validation, list_sources
from steplm.data.tokenizer import eos_id, load_tokenizer
from steplm.errors import UserError
from steplm.io.files import one_line, read_tokenizer


# ---------------------------------------------------------------------------- shards
@dataclass
class TokenShard:
    """One split's token stream on disk as a memmap."""
    tokens: np.memmap
    n_docs: int

    def __len__(self):
        return len(self.tokens)

    @classmethod
    def open(cls, path: Path) -> "TokenShard":
        meta = shard_meta(path)
        tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["n_tokens"],))
        return cls(tokens, meta["n_docs"])


def shard_meta(path: Path) -> dict:
    """The checked ``<path>.json`` of a cached token shard: a dtype, counts, and a ``path`` of exactly
    n_tokens ids. A damaged cache entry (cut short, edited) is a UserError naming the folder to delete."""
    fix = f"data.cache_dir: the token cache entry {path.parent} is damaged"
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        dtype = np.dtype(meta["dtype"])
        n_tokens, n_docs = meta["n_tokens"], meta["n_docs"]
        ok = dtype in (np.uint16, np.uint32) and all(isinstance(n, int) and n >= 0 for n in (n_tokens, n_docs))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{fix} ({path.with_suffix('.json').name}: {one_line(e)}); delete it "
                        "to tokenize again")
    if not ok:
        raise UserError(f"{fix} ({path.with_suffix('.json').name} is not shard metadata); delete it to tokenize again")
    size = path.stat().st_size if path.is_file() else -1
    if size != n_tokens * dtype.itemsize:
        raise UserError(f"{fix} ({path.name} holds {max(size, 0)} bytes, its metadata says "
                        f"{n_tokens * dtype.itemsize}); delete it to tokenize again")
    return meta


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


class ShardWriter:
    """Appends token ids to ``<path>`` and writes ``<path>.json`` (dtype, counts) on close."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype = path, np.dtype(dtype)
        self.fh = open(path, "wb")
        self.n_tokens = self.n_docs = 0
        self.n_left_out = 0  # documents not written: past data.max_train_tokens

    def add(self, ids: list[int], eos: int):
        arr = np.asarray(ids + [eos], dtype=self.dtype)
        self.fh.write(arr.tobytes())
        self.n_tokens += len(arr)
        self.n_docs += 1

    def close(self):
        self.fh.close()
        meta = {"dtype": self.dtype.name, "n_tokens": self.n_tokens, "n_docs": self.n_docs}
        if self.n_left_out:
            meta["n_left_out"] = self.n_left_out
        self.path.with_suffix(".json").write_text(json.dumps(meta))


def _split_tail(train_path: Path, val_path: Path, fraction: float, n_docs: int, why: str):
    """Hold out the last ``fraction`` of the training stream's tokens (every document's, in order)
    instead of whole documents; ``why`` (the reason, for the run's data line) goes in the metadata."""
    meta = shard_meta(train_path)
    tokens = np.fromfile(train_path, dtype=np.dtype(meta["dtype"]))
    cut = int(len(tokens) * (1 - fraction))
    tokens[:cut].tofile(train_path)
    tokens[cut:].tofile(val_path)
    for path, n in ((train_path, cut), (val_path, len(tokens) - cut)):
        path.with_suffix(".json").write_text(json.dumps({**meta, "n_tokens": n, "n_docs": n_docs, "split": "tail",
                                                         "why": why}))


def _cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _source_fingerprint(path: str, exclude) -> list:
    p = Path(path).expanduser()
    if not p.exists():
        return [path]
    return [(str(f), f.stat().st_size, int(f.stat().st_mtime)) for f in list_sources(path, exclude)]


def default_cache_dir() -> Path:
    """Where token shards are cached when data.cache_dir is not set: $STEPLM_CACHE_DIR, else
    $XDG_CACHE_HOME/steplm/tokens (~/.cache/steplm/tokens), outside any run folder, so that a failed run
    leaves nothing beside its --out and runs anywhere share one cache."""
    if os.environ.get("STEPLM_CACHE_DIR"):
        return Path(os.environ["STEPLM_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "steplm" / "tokens"


def cache_entry(data_cfg, cache_root: Path) -> Path:
    """The folder the token shards of ``data_cfg`` are (or will be) cached in under ``cache_root``: a
    key over the source files (names, sizes, times), the split and the tokenizer. Raises UserError
    for a missing or empty data path, naming its key."""
    if not data_cfg.path:
        raise UserError("data.path: no training data given (use --data PATH or set data.path)")
    for key, path in (("data.path", data_cfg.path), ("data.val_path", data_cfg.val_path)):
        if path and _looks_local(path):
            list_sources(path, data_cfg.exclude, key)
    key = _cache_key({"src": _source_fingerprint(data_cfg.path, data_cfg.exclude),
                      "val": _source_fingerprint(data_cfg.val_path, data_cfg.exclude) if data_cfg.val_path else None,
                      "frac": data_cfg.val_fraction, "tok": data_cfg.tokenizer, "field": data_cfg.text_field,
                      "max": data_cfg.max_train_tokens, "v": 1})
    if cache_root.exists() and not cache_root.is_dir():
        raise UserError(f"data.cache_dir: {cache_root} is not a directory")
    return cache_root / key


def prepare(data_cfg, cache_root: Path, progress: bool = True) -> tuple[Path, "object"]:
    """Tokenize the corpus into cached train/val shards (``cache_entry``); returns (shard dir, tokenizer).
    The validation split: data.val_path's documents when set; else whole documents of data.path by a
    hash of their names (``is_validation``), or, when that holds out none or every one (one file, a
    few), the last data.val_fraction of the token stream (``_split_tail``). Raises UserError for an
    empty corpus, naming the key."""
    out = cache_entry(data_cfg, cache_root)
    if (out / "val.json").is_file():
        for split in ("train", "val"):
            shard_meta(out / f"{split}.bin")
        fix = f"data.cache_dir: the token cache entry {out} is damaged; delete it to tokenize again"
        try:
            return out, read_tokenizer(out / "tokenizer.json", "data.cache_dir")
        except UserError as e:
            raise UserError(f"{fix} ({str(e).split(': ', 1)[1]})") from None
    tok = _tokenizer(data_cfg)
    tmp = cache_root / f"{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writers = _tokenize(data_cfg, tok, tmp, progress)
        _settle_split(data_cfg, writers, tmp)
        tok.save(str(tmp / "tokenizer.json"))
        _fault_wait_for_peers(cache_root, out.name)
        if not _publish(tmp, out):  # another process finished the same entry first: use its shards
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, tok


def _tokenizer(data_cfg):
    """data.tokenizer loaded, or for 'bpe:N' trained on up to ~20 MB of the training text (so a huge
    corpus does not stall start-up): the hash split's validation documents are left out, unless they
    are all of them (a tail split follows)."""
    if not data_cfg.tokenizer.startswith("bpe:"):
        return load_tokenizer(data_cfg.tokenizer)

    def sample(limit=20_000_000):
        seen = 0
        for held_out_too in (False, True):
            for doc_id, text in documents(data_cfg.path, data_cfg.text_field, data_cfg.exclude):
                if held_out_too or data_cfg.val_path or not is_validation(doc_id, data_cfg.val_fraction):
                    yield text
                    seen += len(text)
                    if seen > limit:
                        return
            if seen:
                return
    return load_tokenizer(data_cfg.tokenizer, sample())


def _tokenize(data_cfg, tok, tmp: Path, progress: bool) -> dict:
    """Every document tokenized into ``tmp``/train.bin and val.bin, each followed by EOS (blank ones
    skipped; training documents past data.max_train_tokens left out and counted); the closed writers."""
    from tqdm import tqdm

    eos, dtype = eos_id(tok), token_dtype(tok.get_vocab_size())
    writers = {"train": ShardWriter(tmp / "train.bin", dtype), "val": ShardWriter(tmp / "val.bin", dtype)}
    if data_cfg.val_path:
        splits = [("train", documents(data_cfg.path, data_cfg.text_field, data_cfg.exclude)),
                  ("val", documents(data_cfg.val_path, data_cfg.text_field, data_cfg.exclude, "data.val_path"))]
    else:
        splits = [(None, documents(data_cfg.path, data_cfg.text_field, data_cfg.exclude))]
    bar = tqdm(desc="tokenizing", unit="tok", unit_scale=True, mininterval=1, delay=1,
               disable=not progress or not sys.stderr.isatty())  # a bar in a log file is noise
    for fixed, docs in splits:
        batch: list[tuple[str, str]] = []

        def flush():
            encs = tok.encode_batch([t for _, t in batch], add_special_tokens=False)
            for (doc_id, _), enc in zip(batch, encs):
                split = fixed or ("val" if is_validation(doc_id, data_cfg.val_fraction) else "train")
                if split == "train" and data_cfg.max_train_tokens and writers["train"].n_tokens >= data_cfg.max_train_tokens:
                    writers["train"].n_left_out += 1
                    continue
                writers[split].add(enc.ids, eos)
                bar.update(len(enc.ids) + 1)
            batch.clear()

        for doc in docs:
            if doc[1].strip():
                batch.append(doc)
            if sum(len(t) for _, t in batch) > 4_000_000:
                flush()
        if batch:
            flush()
    bar.close()
    for w in writers.values():
        w.close()
    return writers


def _settle_split(data_cfg, writers: dict, tmp: Path) -> None:
    """Check both sides of the split hold text, and fall back to a tail split when the hash split
    left one side without a whole document. Raises UserError for an empty corpus."""
    n_train, n_val = writers["train"].n_docs, writers["val"].n_docs
    if n_train == 0 and (n_val == 0 or data_cfg.val_path):  # with val_path, data.path alone must hold text
        raise UserError(f"data.path: {data_cfg.path} holds no text (empty corpus)")
    if data_cfg.val_path and n_val == 0:
        raise UserError(f"data.val_path: {data_cfg.val_path} holds no text (empty validation corpus)")
    if data_cfg.val_path or (n_train and n_val):
        return
    n = n_train + n_val
    if n == 1:
        why = "one document cannot be held out whole"
    else:
        why = f"the hash of the {n} documents' names held out {'none' if n_val == 0 else 'every one'} of them"
    if n_val:  # every document hashed to validation: the stream is val.bin's, in the same order
        for suffix in (".bin", ".json"):
            os.replace(tmp / f"val{suffix}", tmp / f"train{suffix}")
    _split_tail(tmp / "train.bin", tmp / "val.bin", data_cfg.val_fraction, n, why)


def _publish(tmp: Path, out: Path) -> bool:
    """Move a finished cache entry into place with one atomic rename. Returns False when a complete
    entry is already there (a concurrent tokenization of the same corpus won; it is never replaced,
    since its owner may be reading it). An incomplete leftover (no val.json) is moved aside first."""
    if not (out / "val.json").is_file() and out.exists():
        aside = out.with_name(f"{out.name}.stale{os.getpid()}")
        try:
            os.rename(out, aside)
            shutil.rmtree(aside, ignore_errors=True)
        except FileNotFoundError:
            pass
    try:
        os.rename(tmp, out)  # fails if out exists and is not empty
        return True
    except OSError:
        if (out / "val.json").is_file():
            return False
        raise


def _fault_wait_for_peers(cache_root: Path, key: str):
    """Test hook STEPLM_FAULT=cache_race:N: before publishing, wait (up to a minute) until N
    processes are tokenizing this entry, or one of them has published it, so that they race for
    the same cache entry."""
    import time
    fault = os.environ.get("STEPLM_FAULT", "")
    if not fault.startswith("cache_race:"):
        return
    deadline = time.time() + 60
    while (time.time() < deadline and not (cache_root / key / "val.json").is_file()
           and len(list(cache_root.glob(f"{key}.tmp*"))) < int(fault.split(":")[1])):
        time.sleep(0.05)


