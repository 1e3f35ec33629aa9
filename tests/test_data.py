"""Corpus reading in every format, document-level split, EOS separation, cached shards, sampling."""
import gzip
import json

import numpy as np
import pytest

from steplm import config
from steplm.data.sampler import BatchSampler, eval_windows
from steplm.data.shards import TokenShard, prepare
from steplm.data.tokenizer import load_tokenizer
from steplm.data.corpus import read_documents
from steplm.errors import UserError

from conftest import shared


def test_formats(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "zipped"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["pq1", "pq2"]}), tmp_path / "d.parquet")
    texts = [t for _, t in read_documents(str(tmp_path))]
    assert texts == ["plain text", "one", "two", "zipped", "pq1", "pq2"]


@pytest.mark.parametrize("content,match", [
    ('{"txt": "x"}\n', "no string field 'text'"),
    ("not json\n", "not valid JSON"),
])
def test_bad_jsonl(tmp_path, content, match):
    (tmp_path / "x.jsonl").write_text(content)
    with pytest.raises(UserError, match=match):
        list(read_documents(str(tmp_path / "x.jsonl")))


def test_non_utf8_and_missing(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(UserError, match="not UTF-8"):
        list(read_documents(str(tmp_path / "bad.txt")))
    with pytest.raises(UserError, match="does not exist"):
        list(read_documents(str(tmp_path / "nope.txt")))


@pytest.mark.parametrize("name", ["corpus", "notes.text", "book.log", "data.bin"])
def test_a_file_named_on_its_own_is_read_as_utf8_text_whatever_its_suffix(tmp_path, name):
    (tmp_path / name).write_text("some plain text")
    assert [t for _, t in read_documents(str(tmp_path / name))] == ["some plain text"]
    (tmp_path / name).write_bytes(bytes(range(128, 256)) * 8)  # binary: one line, not a parquet traceback
    with pytest.raises(UserError, match="not UTF-8"):
        list(read_documents(str(tmp_path / name)))


@pytest.mark.parametrize("content", [b"", b"x\n", b"PAR1", b"PAR1" + bytes(100) + b"PAR1", b'{"text": "json"}\n'])
def test_an_unreadable_parquet_file_is_one_line(tmp_path, content):
    (tmp_path / "d.parquet").write_bytes(content)
    with pytest.raises(UserError, match=r"data.path: .*d\.parquet"):  # not readable, or cannot read
        list(read_documents(str(tmp_path / "d.parquet")))


def test_gpt2_tokenizer_from_shared_files():
    tok = load_tokenizer(str(shared("tokenizers/gpt2")))
    assert tok.encode("Hello world").ids == [15496, 995]  # the reference ids from the data README
    assert tok.token_to_id("<|endoftext|>") == 50256


def _docs_dir(tmp_path, n=40):
    d = tmp_path / "docs"
    d.mkdir()
    for i in range(n):
        (d / f"doc{i:02d}.txt").write_text(f"document number {i} " * 20)
    return d


def test_prepare_splits_by_document_and_separates_with_eos(tmp_path):
    d = _docs_dir(tmp_path)
    cfg = config.DataConfig(path=str(d), tokenizer="bpe:300", val_fraction=0.25)
    out, tok = prepare(cfg, tmp_path / "cache", progress=False)
    train, val = TokenShard.open(out / "train.bin"), TokenShard.open(out / "val.bin")
    assert train.n_docs + val.n_docs == 40 and val.n_docs > 0 and train.n_docs > 0
    eos = tok.token_to_id("<|endoftext|>")
    assert (np.asarray(train.tokens) == eos).sum() == train.n_docs  # one EOS per document
    assert train.tokens.dtype == np.uint16
    # Each validation document is whole and absent from train.
    val_text = tok.decode(np.asarray(val.tokens).tolist())
    train_text = tok.decode(np.asarray(train.tokens).tolist())
    for i in range(40):
        needle = f"document number {i} document"
        assert (needle in val_text) != (needle in train_text)
    # A second prepare hits the cache (same directory, no re-tokenizing).
    again, _ = prepare(cfg, tmp_path / "cache", progress=False)
    assert again == out


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "e.txt").write_text("   \n")
    with pytest.raises(UserError, match="empty corpus"):
        prepare(config.DataConfig(path=str(tmp_path / "e.txt"), tokenizer=str(shared("tokenizers/gpt2"))),
                tmp_path / "cache", progress=False)
    assert not any((tmp_path / "cache").glob("*/train.bin"))  # nothing half-written left


@pytest.mark.parametrize("empty_side", ["val", "train"])
@pytest.mark.parametrize("empty", ["file", "whitespace", "folder of blank files"])
def test_an_empty_side_of_a_train_val_pair_names_its_own_key(tmp_path, empty_side, empty):
    (tmp_path / "text.txt").write_text("Some words for a corpus.\n" * 20)
    blank = tmp_path / "blank"
    if empty == "folder of blank files":
        blank.mkdir()
        for i in range(3):
            (blank / f"{i}.txt").write_text("\n" * i)
    else:
        blank = tmp_path / "blank.txt"
        blank.write_text("" if empty == "file" else " \n\t\n")
    train, val = (tmp_path / "text.txt", blank) if empty_side == "val" else (blank, tmp_path / "text.txt")
    key = "data.val_path" if empty_side == "val" else "data.path"
    with pytest.raises(UserError, match=f"^{key}: {blank} holds no text"):
        prepare(config.DataConfig(path=str(train), val_path=str(val), tokenizer=str(shared("tokenizers/gpt2"))),
                tmp_path / "cache", progress=False)
    assert not any((tmp_path / "cache").glob("*/train.bin"))


def test_sampler_is_reproducible_and_shifted(tmp_path):
    d = _docs_dir(tmp_path)
    out, _ = prepare(config.DataConfig(path=str(d), tokenizer="bpe:300", val_fraction=0.25), tmp_path / "c", progress=False)
    shard = TokenShard.open(out / "train.bin")
    a, b = BatchSampler(shard, 16, 4, seed=1), BatchSampler(shard, 16, 4, seed=1)
    x1, y1 = a.next()
    state = a.state_dict()
    x2, _ = a.next()
    b.next()
    b.load_state_dict(state)
    assert x1.shape == (4, 16) and np.array_equal(x1[:, 1:], y1[:, :-1])
    assert np.array_equal(b.next()[0], x2)


@pytest.mark.parametrize("seq_len", [1, 8, 32])
def test_sampler_trains_on_a_split_of_exactly_one_window(seq_len):
    """seq_len + 1 tokens are one window (seq_len inputs and the target after the last): sampled,
    and it is the whole split; one token fewer is refused, with a message that holds."""
    one = BatchSampler(TokenShard(np.arange(seq_len + 1), 1), seq_len, micro_batch=3, seed=0)
    x, y = one.next()
    assert np.array_equal(x, np.tile(np.arange(seq_len), (3, 1)))
    assert np.array_equal(y, np.tile(np.arange(1, seq_len + 1), (3, 1)))
    with pytest.raises(UserError, match=f"^train.seq_len: the training split has {seq_len} tokens, fewer than one "
                                        f"window of train.seq_len \\+ 1 = {seq_len + 1};"):
        BatchSampler(TokenShard(np.arange(seq_len), 1), seq_len, micro_batch=3, seed=0)


@pytest.mark.parametrize("seq_len,extra", [(1, 1), (8, 2), (8, 5), (32, 3)])
def test_sampler_draws_every_window_start(seq_len, extra):
    """A split of seq_len + 1 + extra tokens has extra + 1 window starts, 0 .. extra, the last one's
    window ending on the split's last token: every one is drawn, and none past it."""
    sampler = BatchSampler(TokenShard(np.arange(seq_len + 1 + extra), 1), seq_len, micro_batch=64, seed=0)
    starts = set()
    for _ in range(8):  # 512 draws of extra + 1 <= 6 equally likely starts: each misses with p < 1e-40
        x, y = sampler.next()
        starts |= set(x[:, 0].tolist())
        assert int(y.max()) <= seq_len + extra  # no window runs past the split
    assert starts == set(range(extra + 1))


def test_eval_windows():
    w = eval_windows(np.arange(100), 10, max_tokens=30)
    assert w.shape == (3, 11) and w[1, 0] == 10 and w[0, -1] == 10


def test_single_document_gets_tail_split_wherever_it_hashes(tmp_path):
    from steplm.data.corpus import is_validation
    names = {is_validation(str(tmp_path / f"book{i}.txt"), 0.5): f"book{i}.txt" for i in range(40)}
    assert set(names) == {True, False}  # one file name of each kind
    for in_val, name in names.items():
        f = tmp_path / name
        f.write_text("word " * 2000)
        cfg = config.DataConfig(path=str(f), tokenizer="bpe:300", val_fraction=0.25)
        out, _ = prepare(cfg, tmp_path / f"cache{in_val}", progress=False)
        train, val = TokenShard.open(out / "train.bin"), TokenShard.open(out / "val.bin")
        total = len(train) + len(val)
        assert len(val) == total - int(total * 0.75) and len(train) > len(val) > 0


RACE = """
import json, os, sys, types
from pathlib import Path
from steplm.data.shards import prepare
cfg = types.SimpleNamespace(path=sys.argv[1], val_path=None, val_fraction=0.5, tokenizer="bpe:512", text_field="text",
                            exclude=[], max_train_tokens=None)
out, tok = prepare(cfg, Path(sys.argv[2]), progress=False)
print(json.dumps({"dir": str(out), "inode": os.stat(out / "train.bin").st_ino, "vocab": tok.get_vocab_size()}))
"""


def test_concurrent_tokenization_into_one_cache(tmp_path):
    """Two processes tokenize the same corpus into the same cache at the same time (the cache_race
    hook holds each one before publishing until both have tokenized). Both succeed, both read the one
    entry that won (it is never replaced under a reader), and its shards are byte-identical to a
    tokenization done alone."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    corpus = str(shared("shakespeare/input.txt"))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), STEPLM_FAULT="cache_race:2")
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", RACE, corpus, str(cache)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    entry = cache / results[0]["dir"].rsplit("/", 1)[1]
    assert results[0]["dir"] == results[1]["dir"] == str(entry)
    assert results[0]["inode"] == results[1]["inode"] == os.stat(entry / "train.bin").st_ino
    assert sorted(p.name for p in cache.iterdir()) == [entry.name]  # no temporary leftovers
    env.pop("STEPLM_FAULT")
    alone = subprocess.run([sys.executable, "-c", RACE, corpus, str(tmp_path / "alone")], env=env,
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr
    solo = tmp_path / "alone" / entry.name
    for name in ("train.bin", "val.bin", "train.json", "val.json", "tokenizer.json"):
        assert (solo / name).read_bytes() == (entry / name).read_bytes(), name
