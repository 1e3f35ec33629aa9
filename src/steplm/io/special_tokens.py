"""A model directory's special tokens: the EOS that ends documents, the ids that stop generation, BOS.

They are read from the directory's own files, tokenizer files first as ``AutoTokenizer`` does:
``tokenizer_config.json`` / ``special_tokens_map.json`` (``eos_token``, ``bos_token``), then
``generation_config.json`` and ``config.json`` (``eos_token_id``, which may be a list, and
``bos_token_id``). steplm's own runs use GPT-2's ``<|endoftext|>``; that is only the fallback when
no file names a token.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from steplm.data.tokenizer import EOS as GPT2_EOS
from steplm.errors import UserError


def check_ids(ids, vocab_size: int, what: str):
    """Raise a one-line UserError if a token id of ``ids`` (a list or array of ints) is ``vocab_size``
    or more: a tokenizer larger than the model's embedding table (an HF config.json whose vocab_size is
    below its tokenizer's) gives ids that would index past it. ``what`` names the encoded input."""
    import numpy as np

    top = int(np.max(ids)) if len(ids) else -1
    if top >= vocab_size:
        raise UserError(key="MODEL", message=f"the tokenizer encodes {what} to token id {top}, but the model has {vocab_size} "
                        f"embeddings (vocab_size in its config); give the model a tokenizer of at most "
                        f"{vocab_size} tokens, or raise vocab_size to cover its tokenizer")


@dataclass(frozen=True)
class SpecialTokens:
    eos_id: int
    """The tokenizer's EOS: joins documents in eval, ends every SFT response."""
    stop_ids: tuple[int, ...]
    """Generation stops at any of these: generation_config.json's eos_token_id (one or several) and eos_id."""
    bos_id: int | None = None
    """BOS, or None if the model has none."""

    @property
    def prefix_id(self) -> int:
        """The token scored before an empty zero-shot context (lm-eval's prefix_token_id: BOS, else EOS)."""
        return self.eos_id if self.bos_id is None else self.bos_id


def gpt2_special_tokens(tokenizer) -> SpecialTokens:
    """steplm's convention for its own runs: ``<|endoftext|>`` is EOS, BOS and the only stop id."""
    eos = tokenizer.token_to_id(GPT2_EOS)
    if eos is None:
        raise UserError(key="MODEL", message=f"the tokenizer has no {GPT2_EOS} token and its directory names no EOS "
                        "(tokenizer_config.json eos_token or generation_config.json eos_token_id)")
    return SpecialTokens(eos, (eos,), eos)


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(key="MODEL", message=f"{path} is not valid JSON")
    return d if isinstance(d, dict) else {}


def _token_id(tokenizer, files: dict[str, dict], key: str) -> int | None:
    """Id of the token named under ``key`` (a string or an AddedToken dict) in the first tokenizer file naming it."""
    for name, d in files.items():
        v = d.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str) and v:
            i = tokenizer.token_to_id(v)
            if i is None:
                raise UserError(key="MODEL", message=f"{name} {key} {v!r} is not a token of tokenizer.json")
            return i
    return None


def _id_list(files: dict[str, dict], key: str, vocab: int) -> list[int]:
    """The ids under ``key`` in the first file that gives any (an int or a list of ints)."""
    for name, d in files.items():
        v = d.get(key)
        if v is None:
            continue
        ids = v if isinstance(v, list) else [v]
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids):
            raise UserError(key="MODEL", message=f"{name} {key} must be token ids below the vocabulary size ({vocab}), got {v!r}")
        return ids
    return []


def read_special_tokens(model_dir: str | Path, tokenizer) -> SpecialTokens:
    """The special tokens a run or HF model directory declares for ``tokenizer`` (a tokenizers.Tokenizer)."""
    d = Path(model_dir)
    tok_files = {n: _json(d / n) for n in ("tokenizer_config.json", "special_tokens_map.json")}
    id_files = {n: _json(d / n) for n in ("generation_config.json", "config.json")}
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    stop = _id_list(id_files, "eos_token_id", vocab)
    eos = _token_id(tokenizer, tok_files, "eos_token")
    if eos is None:
        if not stop:
            return gpt2_special_tokens(tokenizer)
        eos = stop[0]
    bos = _token_id(tokenizer, tok_files, "bos_token")
    if bos is None:
        bos = next(iter(_id_list(id_files, "bos_token_id", vocab)), None)
    return SpecialTokens(eos, tuple(dict.fromkeys([*stop, eos])), bos)


def write_special_tokens(out_dir: str | Path, tokenizer, special: SpecialTokens):
    """Record ``special`` in ``out_dir`` as generation_config.json (+ tokenizer_config.json unless present)."""
    out = Path(out_dir)
    gen = {"eos_token_id": special.stop_ids[0] if len(special.stop_ids) == 1 else list(special.stop_ids)}
    if special.bos_id is not None:
        gen["bos_token_id"] = special.bos_id
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if not (out / "tokenizer_config.json").is_file():
        names = {"eos_token": tokenizer.id_to_token(special.eos_id)}
        if special.bos_id is not None:
            names["bos_token"] = tokenizer.id_to_token(special.bos_id)
        (out / "tokenizer_config.json").write_text(json.dumps(names, indent=2))
