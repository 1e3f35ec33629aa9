"""Tokenizers: GPT-2's byte-level BPE from a local folder, a tokenizer folder, or a BPE of N
tokens trained on the corpus ('bpe:N'); every one ends documents with EOS.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from steplm.errors import UserError
from steplm.io.files import one_line, read_tokenizer

EOS = "<|endoftext|>"
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


