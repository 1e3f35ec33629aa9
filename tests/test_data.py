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


# ---------------------------------------------------------------------------- what a run reads, said in one line
def _gpt2():
    return str(shared("tokenizers/gpt2"))


def _tokens(text: str) -> int:
    """Tokens a document takes in a shard: its GPT-2 ids and the EOS after it."""
    return len(load_tokenizer(_gpt2()).encode(text, add_special_tokens=False).ids) + 1


def _named(d, sides, fraction):
    """.txt files under ``d`` whose names hash to the given side (True: validation), one per entry of
    ``sides``."""
    from steplm.data.corpus import is_validation
    out, i = [], 0
    for side in sides:
        while is_validation(str(d / f"doc{i:04d}.txt"), fraction) != side:
            i += 1
        out.append(d / f"doc{i:04d}.txt")
        i += 1
    return out


def _line(cfg, tmp_path):
    from steplm.data.report import describe_data
    out, _ = prepare(cfg, tmp_path / "cache", progress=False)
    return describe_data(cfg, out), TokenShard.open(out / "train.bin"), TokenShard.open(out / "val.bin")


TEXT = "A line of words for a corpus, with some more words after it. "


@pytest.mark.parametrize("sides", [[False, False], [True, True], [False, False, False]])
def test_when_no_whole_document_is_held_out_the_tail_is(tmp_path, sides):
    """A few files whose name hashes all fall on one side (none held out, or every one) get the tail
    split a single file gets, and the line says why; it was refused ("no document was held out")."""
    d = tmp_path / "docs"
    d.mkdir()
    texts = [TEXT * (30 + 7 * i) for i in range(len(sides))]
    for f, text in zip(_named(d, sides, 0.05), texts):
        f.write_text(text)
    line, train, val = _line(config.DataConfig(path=str(d), tokenizer=_gpt2()), tmp_path)
    total = sum(_tokens(t) for t in texts)
    cut = int(total * 0.95)
    assert (len(train), len(val)) == (cut, total - cut)
    n = len(sides)
    assert line == (f"data: {n} files under {d}: {n} documents, {total:,} tokens; validation: the last 5 % of the "
                    f"tokens, {total - cut:,} (a tail split at data.val_fraction 0.05: the hash of the {n} documents' "
                    f"names held out {'every one' if sides[0] else 'none'} of them); training: the first {cut:,} tokens")


@pytest.mark.parametrize("suffix", [".txt", ".md", ".jsonl"])
def test_one_file_of_one_document_gets_a_tail_split(tmp_path, suffix):
    f = tmp_path / f"book{suffix}"
    text = TEXT * 40
    f.write_text(json.dumps({"text": text}) + "\n" if suffix == ".jsonl" else text)
    line, train, val = _line(config.DataConfig(path=str(f), tokenizer=_gpt2(), val_fraction=0.1), tmp_path)
    total = _tokens(text)
    cut = int(total * 0.9)
    assert (len(train), len(val)) == (cut, total - cut)
    assert line == (f"data: {f}: 1 document, {total:,} tokens; validation: the last 10 % of the tokens, "
                    f"{total - cut:,} (a tail split at data.val_fraction 0.1: one document cannot be held out whole); "
                    f"training: the first {cut:,} tokens")


@pytest.mark.parametrize("layout", ["two files, one held out", "40 files", "a jsonl of 30 documents"])
def test_whole_documents_are_held_out_by_hash(tmp_path, layout):
    from steplm.data.corpus import is_validation
    d = tmp_path / "docs"
    d.mkdir()
    fraction = 0.05 if layout.startswith("two") else 0.25
    if layout.startswith("two"):
        docs = dict(zip(map(str, _named(d, [True, False], fraction)), [TEXT * 11, TEXT * 23]))
    elif layout == "40 files":
        docs = {str(d / f"doc{i:02d}.txt"): TEXT * (5 + i) for i in range(40)}
    else:
        texts = [TEXT * (3 + i) for i in range(30)]
        (d / "all.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        docs = {f"{d / 'all.jsonl'}:{n}": t for n, t in enumerate(texts, 1)}  # a record's id: file:line
    for name, text in docs.items():
        if ":" not in name.rsplit("/", 1)[-1]:
            (d / name).write_text(text)
    line, train, val = _line(config.DataConfig(path=str(d), tokenizer=_gpt2(), val_fraction=fraction), tmp_path)
    held = {k for k in docs if is_validation(k, fraction)}
    assert 0 < len(held) < len(docs)
    n_val, n_train = sum(_tokens(docs[k]) for k in held), sum(_tokens(docs[k]) for k in docs if k not in held)
    assert (len(val), len(train), val.n_docs, train.n_docs) == (n_val, n_train, len(held), len(docs) - len(held))
    files = "1 file" if layout.startswith("a jsonl") else f"{len(docs)} files"
    assert line == (f"data: {files} under {d}: {len(docs)} documents, {n_val + n_train:,} tokens; validation: "
                    f"{len(held)} whole document{'s' * (len(held) > 1)} held out by a hash of their names "
                    f"(data.val_fraction {fraction:g}), {n_val:,} tokens; training: {len(docs) - len(held)} "
                    f"document{'s' * (len(docs) - len(held) > 1)}, {n_train:,} tokens")


@pytest.mark.parametrize("n_train_files", [1, 3])
def test_a_val_file_holds_out_nothing_of_the_training_text(tmp_path, n_train_files):
    d = tmp_path / "train"
    d.mkdir()
    texts = [TEXT * (9 + i) for i in range(n_train_files)]
    for i, t in enumerate(texts):
        (d / f"part{i}.txt").write_text(t)
    (tmp_path / "val.txt").write_text(TEXT * 13)
    path = str(d / "part0.txt") if n_train_files == 1 else str(d)
    cfg = config.DataConfig(path=path, val_path=str(tmp_path / "val.txt"), tokenizer=_gpt2())
    line, train, val = _line(cfg, tmp_path)
    n_train, n_val = sum(_tokens(t) for t in texts), _tokens(TEXT * 13)
    assert (len(train), len(val)) == (n_train, n_val)
    source = path if n_train_files == 1 else f"{n_train_files} files under {d}"
    assert line == (f"data: {source}: {n_train_files} document{'s' * (n_train_files > 1)}, {n_train:,} tokens for "
                    f"training; validation: data.val_path {tmp_path / 'val.txt'}: 1 document, {n_val:,} tokens")


@pytest.mark.parametrize("exclude", [[], ["tests"]])
def test_no_directory_is_skipped_unless_data_exclude_names_it(tmp_path, exclude):
    """A user's tests/more.txt is read by default (the library once skipped test, tests and idle_test,
    a setting for its stdlib demo); data.exclude skips it, and the line counts what was skipped."""
    d = tmp_path / "corpus"
    (d / "tests").mkdir(parents=True)
    (d / "main.txt").write_text(TEXT * 20)
    (d / "tests" / "more.txt").write_text("Zebras quietly graze beside the river. " * 20)
    (d / "notes.csv").write_text("a,b\n")
    (d / "data.json").write_text("{}")
    cfg = config.DataConfig(path=str(d), tokenizer=_gpt2(), val_fraction=0.05, exclude=exclude)
    line, train, val = _line(cfg, tmp_path)
    text = load_tokenizer(_gpt2()).decode(np.concatenate([train.tokens, val.tokens]).tolist())
    assert ("Zebras quietly graze" in text) == (not exclude)
    read = "1 file" if exclude else "2 files"
    skipped = "1 more under directories data.exclude skips: tests (1); " if exclude else ""
    assert line.startswith(f"data: {read} under {d} ({skipped}2 files of other types not read: .csv (1), .json (1)): ")


def test_the_library_default_excludes_nothing_and_the_demo_its_own():
    assert config.DataConfig().exclude == []
    from conftest import ROOT
    demo = (ROOT / "scripts" / "demo.py").read_text()
    assert 'STDLIB_EXCLUDE = "[test, tests, idle_test, site-packages]"' in demo and "data.exclude={STDLIB_EXCLUDE}" in demo


def test_data_past_max_train_tokens_is_counted(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    for f in _named(d, [False] * 6, 0.5):
        f.write_text(TEXT * 10)
    cfg = config.DataConfig(path=str(d), tokenizer=_gpt2(), val_fraction=0.5, max_train_tokens=2 * _tokens(TEXT * 10))
    line, train, _ = _line(cfg, tmp_path)
    assert train.n_docs == 2  # a document is written whole while fewer than max_train_tokens are
    assert f"2 documents, {2 * _tokens(TEXT * 10):,} tokens; 4 more documents not read past data.max_train_tokens " \
           f"({cfg.max_train_tokens:,}); validation: the last 50 % " in line


def test_train_starts_with_the_data_line_and_plan_says_what_it_can(tmp_path, capsys):
    """`plan` before the corpus is tokenized names its files; `train` prints the whole line once it has
    read the data (unless --quiet); `plan` then prints that same line from the token cache."""
    from conftest import tiny_overrides
    from steplm.cli.main import main
    from steplm.data.report import describe_data
    from steplm.data.shards import cache_entry
    sets = [x for kv in tiny_overrides(tmp_path) for x in ("--set", kv)]
    f = shared("shakespeare/input.txt")
    assert main(["plan", *sets]) == 0
    assert (f"data: {f} (not tokenized yet: documents, tokens and the validation split are counted when train first "
            "reads it)") in capsys.readouterr().out.splitlines()
    assert main(["train", "--out", str(tmp_path / "run"), *sets]) == 0  # --quiet would leave the line out
    cfg = config.load(None, tiny_overrides(tmp_path))
    line = describe_data(cfg.data, cache_entry(cfg.data, tmp_path / "cache"))
    assert line.startswith(f"data: {f}: 1 document, ") and "a tail split at data.val_fraction 0.5" in line
    assert f"steplm: {line}" in capsys.readouterr().err.splitlines()
    assert main(["train", "--out", str(tmp_path / "quiet"), "--quiet", *sets]) == 0
    assert "steplm: data:" not in capsys.readouterr().err
    assert main(["plan", *sets]) == 0
    assert line in capsys.readouterr().out.splitlines()
