"""Corpus reading, tokenization into uint16/uint32 memmap shards, and batch sampling.

A corpus is a list of documents. Documents are joined with EOS into one token stream per split;
the validation split holds out whole documents (chosen by a hash of their name, so the split is
stable). Shards are cached by a key over the sources and the tokenizer.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import UserError
from .files import one_line, read_tokenizer

EOS = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


# ---------------------------------------------------------------------------- reading
def _suffix(p: Path) -> str:
    return ".jsonl.gz" if p.name.endswith(".jsonl.gz") else p.suffix


def list_sources(path: str, exclude: list[str] = (), key: str = "data.path") -> list[Path]:
    """The files a data path stands for, sorted; raises UserError, naming ``key``, for a missing or
    empty path."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        skip = set(exclude) | {"__pycache__", "site-packages"}
        files = sorted(f for f in p.rglob("*") if f.is_file()
                       and _suffix(f) in TEXT_SUFFIXES + RECORD_SUFFIXES
                       and not skip.intersection(f.relative_to(p).parts[:-1]))
        if not files:
            raise UserError(f"{key}: no .txt/.jsonl/.jsonl.gz/.parquet/.py files under {p}")
        return files
    raise UserError(f"{key}: {path} does not exist (give a file, a directory, or a local HF dataset)")


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
                            raise UserError(f"{key}: line {n} of {f} is not valid JSON")
                        if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                            raise UserError(f"{key}: line {n} of {f} has no string field '{text_field}' "
                                            f"(set {field_key})")
                        yield f"{f}:{n}", rec[text_field]
            else:  # parquet
                import pyarrow
                import pyarrow.parquet as pq
                try:
                    table = pq.read_table(f)
                except pyarrow.ArrowException as e:
                    raise UserError(f"{key}: {f} is not a readable parquet file ({one_line(e)})")
                if text_field not in table.column_names:
                    raise UserError(f"{key}: {f} has no column '{text_field}' (set {field_key})")
                for n, text in enumerate(table.column(text_field).to_pylist()):
                    yield f"{f}:{n}", text or ""
        except UnicodeDecodeError:
            raise UserError(f"{key}: {f} is not UTF-8 text")
        except (OSError, EOFError) as e:
            if isinstance(e, UserError):
                raise
            raise UserError(f"{key}: cannot read {f} ({one_line(e)})")


def read_hf_dataset(name: str, text_field: str, key: str = "data.path") -> Iterator[tuple[str, str]]:
    """Documents of a Hugging Face dataset's train split (needs `datasets` and a reachable hub)."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{key}: {name} is not a local path, and reading a hub dataset needs `pip install datasets`")
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # noqa: BLE001 - anything the hub raises becomes one line
        raise UserError(f"{key}: {name} is not a local path and could not be loaded from the hub ({type(e).__name__})")
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


# ---------------------------------------------------------------------------- tokenizer
def load_tokenizer(spec: str, train_texts: Iterator[str] | None = None):
    """A ``tokenizers.Tokenizer`` with an EOS token, from 'gpt2', a directory, or 'bpe:N' (trained)."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import ByteLevelBPETokenizer

    if spec.startswith("bpe:"):
        try:
            size = int(spec[4:])
        except ValueError:
            raise UserError(f"data.tokenizer: 'bpe:N' needs an integer N, got {spec!r}")
        if size < 300:
            raise UserError(f"data.tokenizer: bpe vocabulary must be at least 300 (256 bytes + merges), got {size}")
        if train_texts is None:
            raise UserError("data.tokenizer: a 'bpe:N' tokenizer is trained on the corpus; give data.path")
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(train_texts, vocab_size=size, min_frequency=2, special_tokens=[EOS],
                                show_progress=False)
        return bpe._tokenizer
    if spec == "gpt2":
        local = os.environ.get("STEPLM_GPT2_DIR")
        if local:
            return load_tokenizer(local)
        try:
            from huggingface_hub import hf_hub_download
            try:  # the local HF cache first, then the hub if it resolves at all
                return Tokenizer.from_file(hf_hub_download("gpt2", "tokenizer.json", local_files_only=True))
            except Exception:  # noqa: BLE001
                if not _hub_reachable():
                    raise
                return Tokenizer.from_file(hf_hub_download("gpt2", "tokenizer.json"))
        except Exception:  # noqa: BLE001 - offline
            raise UserError("data.tokenizer: 'gpt2' needs the hub; set data.tokenizer to a directory with "
                            "vocab.json and merges.txt (or set STEPLM_GPT2_DIR)")
    d = Path(spec).expanduser()
    if (d / "tokenizer.json").is_file():
        tok = read_tokenizer(d / "tokenizer.json", "data.tokenizer")
    elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        try:
            tok = ByteLevelBPETokenizer(str(d / "vocab.json"), str(d / "merges.txt"))._tokenizer
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - tokenizers' errors, a Rust panic included
            raise UserError(f"data.tokenizer: {d}'s vocab.json and merges.txt are not a readable BPE "
                            f"vocabulary ({one_line(e)})")
    else:
        raise UserError(f"data.tokenizer: {spec} is not 'gpt2', 'bpe:N', or a directory with tokenizer.json "
                        f"or vocab.json + merges.txt")
    if tok.token_to_id(EOS) is None:
        tok.add_special_tokens([EOS])
    return tok


def _hub_reachable(host: str = "huggingface.co") -> bool:
    """Whether the hub's name resolves; avoids half a minute of retries on an offline machine."""
    import socket
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def eos_id(tok) -> int:
    return tok.token_to_id(EOS)


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

    def add(self, ids: list[int], eos: int):
        arr = np.asarray(ids + [eos], dtype=self.dtype)
        self.fh.write(arr.tobytes())
        self.n_tokens += len(arr)
        self.n_docs += 1

    def close(self):
        self.fh.close()
        meta = {"dtype": self.dtype.name, "n_tokens": self.n_tokens, "n_docs": self.n_docs}
        self.path.with_suffix(".json").write_text(json.dumps(meta))


def _split_tail(train_path: Path, val_path: Path, fraction: float):
    """A one-document corpus: hold out the last ``fraction`` of its tokens instead of a document."""
    meta = shard_meta(train_path)
    tokens = np.fromfile(train_path, dtype=np.dtype(meta["dtype"]))
    cut = int(len(tokens) * (1 - fraction))
    tokens[:cut].tofile(train_path)
    tokens[cut:].tofile(val_path)
    for path, n in ((train_path, cut), (val_path, len(tokens) - cut)):
        path.with_suffix(".json").write_text(json.dumps({"dtype": meta["dtype"], "n_tokens": n, "n_docs": 1,
                                                         "split": "tail"}))


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


def prepare(data_cfg, cache_root: Path, progress: bool = True) -> tuple[Path, "object"]:
    """Tokenize the corpus into cached train/val shards; returns (shard dir, tokenizer)."""
    from tqdm import tqdm

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
    out = cache_root / key
    if (out / "val.json").is_file():
        for split in ("train", "val"):
            shard_meta(out / f"{split}.bin")
        fix = f"data.cache_dir: the token cache entry {out} is damaged; delete it to tokenize again"
        try:
            return out, read_tokenizer(out / "tokenizer.json", "data.cache_dir")
        except UserError as e:
            raise UserError(f"{fix} ({str(e).split(': ', 1)[1]})") from None

    def train_docs():
        for doc_id, text in documents(data_cfg.path, data_cfg.text_field, data_cfg.exclude):
            if data_cfg.val_path or not is_validation(doc_id, data_cfg.val_fraction):
                yield doc_id, text

    if data_cfg.tokenizer.startswith("bpe:"):
        # Train on up to ~20 MB of training text, so a huge corpus does not stall start-up.
        def sample(limit=20_000_000):
            seen = 0
            for _, text in train_docs():
                yield text
                seen += len(text)
                if seen > limit:
                    return
        tok = load_tokenizer(data_cfg.tokenizer, sample())
    else:
        tok = load_tokenizer(data_cfg.tokenizer)
    eos = eos_id(tok)
    tmp = cache_root / f"{key}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        dtype = token_dtype(tok.get_vocab_size())
        writers = {"train": ShardWriter(tmp / "train.bin", dtype), "val": ShardWriter(tmp / "val.bin", dtype)}
        if data_cfg.val_path:
            splits = [("train", documents(data_cfg.path, data_cfg.text_field, data_cfg.exclude)),
                      ("val", documents(data_cfg.val_path, data_cfg.text_field, data_cfg.exclude, "data.val_path"))]
        else:
            splits = [(None, documents(data_cfg.path, data_cfg.text_field, data_cfg.exclude))]
        bar = tqdm(desc="tokenizing", unit="tok", unit_scale=True, disable=not progress, mininterval=1, delay=1)
        for fixed, docs in splits:
            batch: list[tuple[str, str]] = []

            def flush():
                encs = tok.encode_batch([t for _, t in batch], add_special_tokens=False)
                for (doc_id, _), enc in zip(batch, encs):
                    split = fixed or ("val" if is_validation(doc_id, data_cfg.val_fraction) else "train")
                    if split == "train" and data_cfg.max_train_tokens and writers["train"].n_tokens >= data_cfg.max_train_tokens:
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
        n_train, n_val = writers["train"].n_docs, writers["val"].n_docs
        if n_train == 0 and (n_val == 0 or data_cfg.val_path):  # with val_path, data.path alone must hold text
            raise UserError(f"data.path: {data_cfg.path} holds no text (empty corpus)")
        if data_cfg.val_path and n_val == 0:
            raise UserError(f"data.val_path: {data_cfg.val_path} holds no text (empty validation corpus)")
        if not data_cfg.val_path and n_train + n_val == 1:
            # One document (a single .txt): hold out its tail, whichever side its hash fell on.
            if n_val:
                for suffix in (".bin", ".json"):
                    os.replace(tmp / f"val{suffix}", tmp / f"train{suffix}")
            _split_tail(tmp / "train.bin", tmp / "val.bin", data_cfg.val_fraction)
        elif n_train == 0:
            raise UserError(f"data.val_fraction: every document of {data_cfg.path} went to validation; "
                            f"lower it or set data.val_path")
        elif n_val == 0:
            raise UserError(f"data.val_fraction: no document of {data_cfg.path} was held out for validation "
                            f"({writers['train'].n_docs} documents); raise it or set data.val_path")
        tok.save(str(tmp / "tokenizer.json"))
        _fault_wait_for_peers(cache_root, key)
        if not _publish(tmp, out):  # another process finished the same entry first: use its shards
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, tok


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


# ---------------------------------------------------------------------------- batches
class BatchSampler:
    """Random (B, T+1) windows of a token stream, reproducible from its generator state.

    With ``world`` ranks every rank draws the same global batch of world·B windows and keeps its own
    slice, so N ranks see exactly the rows one process with micro-batch N·B would."""

    def __init__(self, shard: TokenShard, seq_len: int, micro_batch: int, seed: int, rank: int = 0, world: int = 1):
        if len(shard) <= seq_len + 1:
            raise UserError(f"train.seq_len: the training split has {len(shard)} tokens, fewer than one "
                            f"sequence of {seq_len + 1}; use more data or a shorter train.seq_len")
        self.shard, self.seq_len, self.micro_batch = shard, seq_len, micro_batch
        self.rank, self.world = rank, world
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self._arange = np.arange(seq_len + 1)

    def next(self):
        """(inputs, targets), both int64 torch tensors of shape (B, T)."""
        import torch
        starts = self.rng.integers(0, len(self.shard) - self.seq_len - 1, size=self.micro_batch * self.world)
        starts = starts[self.rank * self.micro_batch:(self.rank + 1) * self.micro_batch]
        window = torch.from_numpy(self.shard.tokens[starts[:, None] + self._arange].astype(np.int64))  # (B, T+1)
        return window[:, :-1], window[:, 1:]

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict):
        self.rng.bit_generator.state = state["rng"]


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """Non-overlapping (N, seq_len+1) windows from the start of the stream (each shares one token with
    the next): N = the most whole windows of ``seq_len`` scored tokens, at most ``max_tokens`` tokens in
    all. Raises UserError (naming --data, --max-tokens) when no whole window fits."""
    n = (len(tokens) - 1) // seq_len
    if n == 0:
        raise UserError(f"--data: only {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
    if max_tokens:
        if max_tokens < seq_len:
            raise UserError(f"--max-tokens: {max_tokens} is less than one window of {seq_len} tokens; raise it "
                            f"or lower --seq-len")
        n = min(n, max_tokens // seq_len)
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)
    return np.asarray(tokens[idx], dtype=np.int64)
