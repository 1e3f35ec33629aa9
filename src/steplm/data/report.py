"""The one line a run starts with about its data: the files read (and those under the path that are
not, and why), the documents and tokens, and how the validation split was made, with its tokens."""
from __future__ import annotations

from pathlib import Path

from steplm.data.corpus import _looks_local, scan_sources
from steplm.data.shards import shard_meta


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}{'' if n == 1 else 's'}"


def _counts(by_name: dict[str, int], most: int = 4) -> str:
    """'tests (3), idle_test (1)': the most frequent names first, at most ``most`` of them."""
    top = sorted(by_name.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{name} ({n:,})" for name, n in top[:most])
    return text + (f" and {len(top) - most} more" if len(top) > most else "")


def describe_sources(path: str, exclude: list[str] = (), key: str = "data.path") -> str:
    """What a data path stands for, in words: 'corpus.txt', or '12 files under corpus/ (3 more under
    directories data.exclude skips: tests; 2 of other types not read)', or 'hub dataset NAME'.
    Raises UserError (naming ``key``) for a missing or empty path."""
    if not _looks_local(path):
        return f"hub dataset {path}"
    src = scan_sources(path, exclude, key)
    if Path(path).expanduser().is_file():
        return str(path)
    skipped = []
    if src.excluded:
        skipped.append(f"{sum(src.excluded.values()):,} more under directories data.exclude skips: "
                       + _counts(src.excluded))
    if src.other:
        skipped.append(f"{_count(sum(src.other.values()), 'file')} of other types not read: " + _counts(src.other))
    return f"{_count(len(src.files), 'file')} under {path}" + (f" ({'; '.join(skipped)})" if skipped else "")


def split_kind(data_cfg, train_meta: dict) -> str:
    """How the cached split was made: 'val_path', 'hash' or 'tail' (entries cached before the kind was
    recorded: a tail split says so in its metadata; the rest are hash splits)."""
    if data_cfg.val_path:
        return "val_path"
    return train_meta.get("split", "hash")


def describe_data(data_cfg, shard_dir: Path) -> str:
    """'data: ...': the sources (``describe_sources``), documents and tokens read, and the validation
    split with its tokens, from a token cache entry ``shard_dir`` that ``prepare`` wrote."""
    train, val = shard_meta(shard_dir / "train.bin"), shard_meta(shard_dir / "val.bin")
    source = describe_sources(data_cfg.path, data_cfg.exclude)
    left = train.get("n_left_out", 0)
    cut = (f"; {_count(left, 'more document')} not read past data.max_train_tokens "
           f"({data_cfg.max_train_tokens:,})" if left else "")
    kind = split_kind(data_cfg, train)
    if kind == "val_path":
        return (f"data: {source}: {_count(train['n_docs'], 'document')}, {_count(train['n_tokens'], 'token')} for "
                f"training{cut}; validation: data.val_path {describe_sources(data_cfg.val_path, data_cfg.exclude, 'data.val_path')}: "
                f"{_count(val['n_docs'], 'document')}, {_count(val['n_tokens'], 'token')}")
    total = train["n_tokens"] + val["n_tokens"]
    if kind == "tail":
        why = train.get("why", "one document cannot be held out whole")
        return (f"data: {source}: {_count(train['n_docs'], 'document')}, {_count(total, 'token')}{cut}; validation: "
                f"the last {100 * data_cfg.val_fraction:g} % of the tokens, {val['n_tokens']:,} (a tail split at "
                f"data.val_fraction {data_cfg.val_fraction:g}: {why}); training: the first "
                f"{_count(train['n_tokens'], 'token')}")
    return (f"data: {source}: {_count(train['n_docs'] + val['n_docs'], 'document')}, {_count(total, 'token')}{cut}; "
            f"validation: {_count(val['n_docs'], 'whole document')} held out by a hash of their names "
            f"(data.val_fraction {data_cfg.val_fraction:g}), {_count(val['n_tokens'], 'token')}; training: "
            f"{_count(train['n_docs'], 'document')}, {_count(train['n_tokens'], 'token')}")


def describe_planned(data_cfg, cache_root: Path) -> str:
    """What `steplm plan` can say of a run's data without tokenizing it: the whole line when the token
    cache already holds this corpus (``describe_data``), else the sources and that the counts come
    when `train` first tokenizes it. Raises UserError for a missing or empty data path, as train would."""
    from steplm.data.shards import cache_entry

    entry = cache_entry(data_cfg, cache_root)
    if (entry / "val.json").is_file():
        return describe_data(data_cfg, entry)
    val = (f"; validation: data.val_path {describe_sources(data_cfg.val_path, data_cfg.exclude, 'data.val_path')}"
           if data_cfg.val_path else "")
    return (f"data: {describe_sources(data_cfg.path, data_cfg.exclude)}{val} (not tokenized yet: documents, tokens "
            f"and the validation split are counted when train first reads it)")
