"""Held-out perplexity of a steplm run directory or an HF Llama directory."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from steplm.data.sampler import eval_windows
from steplm.eval.loss import perplexity_of
from steplm.io.run_dir import Pretrained, load_model_dir
from steplm.data.corpus import read_documents
from steplm.errors import UserError
from steplm.io.special_tokens import check_ids


def token_stream(path: str, encode, eos: int, text_field: str = "text") -> np.ndarray:
    """Every document of ``path`` (the ``text_field`` of .jsonl/.parquet records) encoded and joined
    with EOS (int64). Raises UserError naming --data or --text-field."""
    ids: list[int] = []
    for _, text in read_documents(path, text_field, key="--data", field_key="--text-field"):
        if text.strip():
            ids.extend(encode(text))
            ids.append(eos)
    if not ids:
        raise UserError(f"--data: {path} holds no text")
    return np.asarray(ids, dtype=np.int64)


@torch.no_grad()
def windows_loss(logits_fn, windows: np.ndarray, batch_size: int, device="cpu") -> tuple[float, int]:
    """Summed next-token NLL (nats) and predicted-token count over (N, T+1) windows, in batches of
    ``batch_size`` on ``device``. The windows are all one length, so no batch holds padding; the loss is
    summed in fp32 whatever the compute dtype."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for i in range(0, len(windows), batch_size):
        w = torch.from_numpy(windows[i:i + batch_size]).to(device)
        logits = logits_fn(w[:, :-1]).float()
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1), reduction="sum")
        count += w[:, 1:].numel()
    return total.item(), count


def perplexity(model_path: str | Pretrained, data: str, max_tokens: int | None = None, backend: str = "steplm",
               seq_len: int | None = None, batch_size: int = 8, progress: bool = False,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, text_field: str = "text"
               ) -> dict:
    """{"loss", "ppl", "tokens"} on non-overlapping windows of ``data``, run on ``device``; ``dtype`` bf16 runs
    the model under bf16 autocast (weights stay fp32), fp32 (the default) is the reference. ``text_field``
    is the field of .jsonl/.parquet records that holds the text. ``model_path``: a folder, or (backend
    steplm) a model already loaded."""
    from steplm.devices import autocast

    device = torch.device(device)
    if not Path(data).exists():
        raise UserError(f"--data: {data} does not exist")
    if backend == "steplm":
        p = model_path if isinstance(model_path, Pretrained) else load_model_dir(model_path, device)
        model, tok = p.model, p.tokenizer
        stream = token_stream(data, lambda t: tok.encode(t, add_special_tokens=False).ids, p.special.eos_id, text_field)
        check_ids(stream, model.config.vocab_size, f"--data {data}")
        T = _context(seq_len, model.config.max_seq_len)
        logits_fn = model
    elif backend == "transformers":
        from steplm.io.files import one_line, read_json, read_tokenizer
        p = Path(model_path)
        if not (p / "config.json").is_file():
            raise UserError(key="MODEL", message=f"--backend transformers needs an HF directory (run `steplm export {p} --to DIR`)")
        model_type = read_json(p / "config.json", "MODEL").get("model_type")
        if model_type != "llama":
            raise UserError(key="MODEL", message=f"config.json has model_type {model_type!r}; only Llama models are supported")
        if (p / "tokenizer.json").is_file():
            read_tokenizer(p / "tokenizer.json", "MODEL")  # a damaged one: one line, not transformers' traceback
        from safetensors import SafetensorError
        from transformers import AutoTokenizer, LlamaForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its weight-loading bar would break a one-line error
        try:
            hf = LlamaForCausalLM.from_pretrained(str(p), dtype=torch.float32).to(device).eval()
            hf_tok = AutoTokenizer.from_pretrained(str(p))
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
            raise UserError(key="MODEL", message=f"transformers cannot load {p} ({one_line(e)})")
        from steplm.io.hf import check_finite
        check_finite(dict(hf.named_parameters()), p)
        if hf_tok.eos_token_id is None:
            raise UserError(key="MODEL", message=f"{p} tokenizer_config.json names no eos_token")
        stream = token_stream(data, lambda t: hf_tok(t, add_special_tokens=False, verbose=False)["input_ids"], hf_tok.eos_token_id,
                              text_field)
        check_ids(stream, hf.config.vocab_size, f"--data {data}")
        T = _context(seq_len, hf.config.max_position_embeddings)
        logits_fn = lambda x: hf(input_ids=x).logits  # noqa: E731
    else:
        raise UserError(f"--backend: must be steplm or transformers, got {backend!r}")
    windows = eval_windows(stream, T, max_tokens)
    with autocast(device, dtype):
        total, count = windows_loss(logits_fn, windows, batch_size, device)
    loss = total / count
    return {"loss": loss, "ppl": perplexity_of(loss), "tokens": count}


def _context(seq_len: int | None, max_len: int) -> int:
    """The evaluation window: --seq-len, at most the model's context (max_seq_len); default that context."""
    if seq_len and seq_len > max_len:
        raise UserError(f"--seq-len: the model's context is {max_len} tokens, got {seq_len}; give at most {max_len}")
    return seq_len or max_len
