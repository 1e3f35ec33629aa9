"""Full-parameter instruction tuning (paper App. H): Alpaca template, loss on response tokens only,
AdamW (0.9, 0.95), cosine schedule with warmup, a fixed number of epochs."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .errors import TrainingStopped, UserError
from .generate import alpaca_prompt
from .tokens import SpecialTokens, gpt2_special_tokens, write_special_tokens
from .runguard import all_finite, dumps

IGNORE = -100


def read_examples(path: str | Path) -> list[dict]:
    """(instruction, input, output) records from Alpaca JSON (a list) or seed-task JSONL (``instances``)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--data: {p} not found")
    text = p.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(x) for x in text.splitlines() if x.strip()]
    except json.JSONDecodeError:
        raise UserError(f"--data: {p} is neither Alpaca JSON nor JSONL")
    out = []
    for n, r in enumerate(records, 1):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str):
            raise UserError(f"--data: record {n} of {p} has no 'instruction' string")
        if "instances" in r:
            out += [{"instruction": r["instruction"], "input": i.get("input", ""), "output": i.get("output", "")}
                    for i in r["instances"]]
        elif isinstance(r.get("output"), str):
            out.append({"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]})
        else:
            raise UserError(f"--data: record {n} of {p} has neither 'output' nor 'instances'")
    if not out:
        raise UserError(f"--data: {p} holds no examples")
    return out


def build_example(tokenizer, ex: dict, eos: int, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels; prompt positions are labelled IGNORE so only the response (+EOS) is learned.
    The prompt is encoded with the tokenizer's own template (a Llama tokenizer adds BOS), as generation does."""
    prompt = tokenizer.encode(alpaca_prompt(ex["instruction"], ex["input"])).ids
    response = tokenizer.encode(ex["output"], add_special_tokens=False).ids + [eos]
    ids = (prompt + response)[:max_len]
    labels = ([IGNORE] * len(prompt) + response)[:max_len]
    return ids, labels


class SFTBatches:
    """Epochs × batches over tokenized (ids, labels) examples. Each epoch is a shuffle seeded by (seed, epoch),
    so the position (epoch, batch index) is the whole state a resume needs."""

    def __init__(self, data: list[tuple[list[int], list[int]]], batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.epoch = self.index = 0

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.data) / self.batch_size)

    def next(self) -> list[tuple[list[int], list[int]]]:
        """The examples of the next optimizer step (the last batch of an epoch may be smaller)."""
        if self.index == self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = list(range(len(self.data)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        b = self.index * self.batch_size
        self.index += 1
        return [self.data[i] for i in order[b:b + self.batch_size]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict):
        self.epoch, self.index = state["epoch"], state["index"]


def pad_batch(batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels), each (B, T) with T the longest example of ``batch``, right-padded (ids with ``pad_id``,
    labels with IGNORE). Under causal attention right padding never reaches a real position, so no mask is needed."""
    T = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)
    for row, (x, y) in enumerate(batch):
        ids[row, :len(x)] = torch.tensor(x)
        labels[row, :len(y)] = torch.tensor(y)
    return ids, labels


def accumulate_response_loss(model, batch: list[tuple[list[int], list[int]]], micro_batch: int, pad_id: int,
                             device, dtype=torch.float32) -> float:
    """Forward and backward ``batch`` in micro-batches of ``micro_batch`` examples (each padded to its own
    longest), the loss summed over response tokens and divided by the response-token count of the whole
    batch, so the gradients and the returned loss equal those of the batch in one piece."""
    from .devices import autocast

    micro = [pad_batch(batch[i:i + micro_batch], pad_id) for i in range(0, len(batch), micro_batch)]
    n_response = sum(int((labels[:, 1:] != IGNORE).sum()) for _, labels in micro)
    total = 0.0
    for ids, labels in micro:
        ids, labels = ids.to(device), labels.to(device)
        with autocast(device, dtype):
            logits = model(ids)[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE, reduction="sum") / n_response
        loss.backward()
        total += loss.item()
    return total


def train_sft(model, tokenizer, examples: list[dict], out_dir: str | Path, epochs: int = 2, lr: float = 1e-4,
              warmup_steps: int = 100, batch_size: int = 8, weight_decay: float = 0.0, seed: int = 0,
              progress: bool = True, special: SpecialTokens | None = None,
              dtype: torch.dtype = torch.float32, micro_batch: int | None = None) -> dict:
    """Fine-tune in place on the model's device, save a run directory (weights, config, tokenizer, special
    tokens, sft_summary.json). Responses end with ``special.eos_id`` (default: GPT-2's <|endoftext|>).
    ``dtype`` bf16 runs forward and backward under bf16 autocast; weights and AdamW stay fp32. Each step of
    ``batch_size`` examples runs as micro-batches of ``micro_batch`` (default: all at once) with the loss
    normalised by the step's response tokens."""
    from tqdm import tqdm

    from .devices import model_device
    from .lora import merged_state_dict

    special = special or gpt2_special_tokens(tokenizer)
    device = model_device(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eos = special.eos_id
    data = [build_example(tokenizer, ex, eos, model.config.max_seq_len) for ex in examples]
    data = [d for d in data if any(label != IGNORE for label in d[1][1:])]
    if not data:
        raise UserError("--data: every example's response is cut off by the model's max_seq_len")
    batches = SFTBatches(data, batch_size, seed)
    total = batches.batches_per_epoch * epochs
    warmup = min(warmup_steps, max(1, total // 10))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                            weight_decay=weight_decay)
    losses = []
    model.train()
    bar = tqdm(total=total, desc="sft", disable=not progress)
    for step in range(total):
        scale = (step + 1) / warmup if step < warmup else \
            0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        losses.append(accumulate_response_loss(model, batches.next(), micro_batch or batch_size, eos, device, dtype))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.update(1)
    step = total
    bar.close()
    model.eval()
    final = merged_state_dict(model)
    if not all_finite(final.values()):
        raise TrainingStopped(f"step {step}: the weights are not finite; no model was written (lower --lr)")
    save_file(final, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model_config.json").write_text(dumps(model.config.to_dict(), indent=2))
    tokenizer.save(str(out / "tokenizer.json"))
    write_special_tokens(out, tokenizer, special)
    summary = {"examples": len(data), "epochs": epochs, "steps": step, "lr": lr, "warmup_steps": warmup,
               "first_loss": losses[0], "final_loss": losses[-1], "losses": losses}
    (out / "sft_summary.json").write_text(dumps(summary, indent=2))
    return summary
