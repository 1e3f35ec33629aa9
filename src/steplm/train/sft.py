"""Full-parameter instruction tuning (paper App. H) as a second use of the pre-training loop
(``train.Trainer``): Alpaca template, loss on response tokens only, AdamW (0.9, 0.95), cosine
schedule with warmup, a fixed number of epochs."""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from steplm.devices import autocast
from steplm.errors import UserError
from steplm.eval.generate import alpaca_prompt
from steplm.io.files import dumps
from steplm.io.special_tokens import check_ids, write_special_tokens
from steplm.train.loop import Trainer
from steplm.train.task import PretrainTask

IGNORE = -100


def read_examples(path: str | Path) -> list[dict]:
    """(instruction, input, output) records from Alpaca JSON (a list) or seed-task JSONL (``instances``)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--data: {p} not found")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--data: {p} is not readable UTF-8 text ({e.__class__.__name__})")
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(x) for x in text.splitlines() if x.strip()]
    except json.JSONDecodeError:
        raise UserError(f"--data: {p} is neither Alpaca JSON nor JSONL")
    if not isinstance(records, list):
        raise UserError(f"--data: {p} is neither Alpaca JSON (a list of records) nor JSONL")
    out = []

    def strings(where: str, rec: dict) -> dict:
        """The example's input and output, each a string ('' when absent or null, as pandas and datasets
        write a missing value); anything else is refused, not turned into text."""
        ex = {"instruction": r["instruction"], **{k: "" if rec.get(k) is None else rec[k] for k in ("input", "output")}}
        for k in ("input", "output"):
            if not isinstance(ex[k], str):
                raise UserError(f"--data: {where} of {p} has an '{k}' that is not a string "
                                f"({type(ex[k]).__name__})")
        return ex

    for n, r in enumerate(records, 1):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str):
            raise UserError(f"--data: record {n} of {p} has no 'instruction' string")
        if "instances" in r and "output" in r:  # which one is the example? neither is dropped silently
            raise UserError(f"--data: record {n} of {p} has both 'output' and 'instances'; keep one")
        if "instances" in r:
            if not isinstance(r["instances"], list) or not all(isinstance(i, dict) for i in r["instances"]):
                raise UserError(f"--data: record {n} of {p} has 'instances' that are not a list of objects")
            out += [strings(f"record {n} instance {j}", i) for j, i in enumerate(r["instances"], 1)]
        elif "output" in r:
            out.append(strings(f"record {n}", r))
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


def accumulate_response_loss(loss_fn, micro_batches: list[list[tuple[list[int], list[int]]]], pad_id: int, device,
                             n_response: int, scale: float = 1.0, after_micro_batch=None) -> torch.Tensor:
    """Forward and backward each micro-batch (each right-padded to its own longest example), its loss
    weighted so that the step's loss is the sum over response tokens divided by ``n_response``, the
    response-token count of the whole step: the gradients and the returned loss (a 0-d tensor on
    ``device``) equal those of the step's examples in one piece, whatever the split. ``loss_fn(x, y)``
    is the mean next-token loss over the targets of ``y`` that are not IGNORE (the trainer's loss);
    ``scale`` multiplies every term (DDP: the world size, because DDP averages gradients over ranks).
    An empty micro-batch is skipped; a micro-batch given as ``("dummy", batch)`` runs with weight 0,
    so that every rank calls backward equally often."""
    total = torch.zeros((), device=device)
    for mb in micro_batches:
        dummy = isinstance(mb, tuple) and mb and mb[0] == "dummy"
        examples = mb[1] if dummy else mb
        if not examples:
            continue
        ids, labels = pad_batch(examples, pad_id)
        x, y = ids[:, :-1].to(device, non_blocking=True), labels[:, 1:].to(device, non_blocking=True)
        count = 0 if dummy else int((labels[:, 1:] != IGNORE).sum())
        if count == 0 and not dummy:
            continue
        loss = loss_fn(x, y) * (scale * count / max(1, n_response))
        loss.backward()
        total += loss.detach()
        if after_micro_batch is not None:
            after_micro_batch()
    return total


def response_tokens(examples: list[tuple[list[int], list[int]]]) -> int:
    """Targets that count in the loss: labels after the first position that are not IGNORE."""
    return sum(sum(1 for label in y[1:] if label != IGNORE) for _, y in examples)


class SFTTask(PretrainTask):
    """Full-parameter instruction tuning on the pre-training loop (paper App. H, Table 8): one stage
    of vanilla AdamW over the model in ``cfg.sft.model``, examples from ``cfg.sft.data`` in the Alpaca
    template with the loss on response tokens only, ``cfg.sft.epochs`` shuffled passes. What the loop
    brings: autocast and compile, gradient accumulation (normalised by the step's response tokens),
    atomic checkpoints with bitwise resume, the NaN guard, metrics.jsonl, the progress bar and
    torchrun DDP/FSDP2. ``cfg.train.max_steps`` is derived here (epochs × batches per epoch) and the
    warmup capped at a tenth of it; the global batch is micro_batch × grad_accum × world examples."""

    lr_key = "--lr"
    warmup_key = "--warmup-steps"
    checkpoint_key = "--checkpoint-every"
    fit_activations = False  # examples are shorter than the model's max_seq_len, the seq_len set here
    fit_keys = {"states": "MODEL's size", "activations": "--micro-batch", "rope": "MODEL's max_position_embeddings"}
    flags_init_std = False
    eval_key = "train_loss"  # the loss on training examples: SFT data has no held-out split
    eval_what = "loss on the first training examples"

    def configure(self, run) -> None:
        """Load MODEL and the examples, and set train.max_steps and train.warmup_steps from them."""
        from steplm.io.run_dir import load_model_dir, resolve_source

        s, t = run.cfg.sft, run.cfg.train
        source = resolve_source(s.model)
        self.source = load_model_dir(source, run.device)
        self.pretraining = pretraining_history(source)
        self.special = self.source.special
        tok = self.source.tokenizer
        examples = read_examples(s.data)[:s.limit]
        max_len = self.source.config.max_seq_len
        usable = [ex for ex in examples if ex["output"].strip()]  # a blank response teaches only to stop
        data = [build_example(tok, ex, self.special.eos_id, max_len) for ex in usable]
        for ids, _ in data:
            check_ids(ids, self.source.config.vocab_size, "an example of --data")
        self.examples = [d for d in data if response_tokens([d])]
        if not self.examples:
            raise UserError(f"--data: no example of {s.data} has a response to learn: {len(examples) - len(usable)} "
                            f"of {len(examples)} have an empty output, and the rest's responses "
                            f"are cut off by the model's max_seq_len ({max_len} tokens)")
        empty, cut = len(examples) - len(usable), len(data) - len(self.examples)
        short = sum(labels[-1] != self.special.eos_id for _, labels in self.examples)  # EOS past the context
        if (empty or cut or short) and run.main:  # said so: an SFT run never drops or cuts examples silently
            print(f"steplm: warning: tuning on {len(self.examples)} of {len(examples)} examples of {s.data}: "
                  f"{empty} have an empty output, {cut} a response cut off by the model's max_seq_len "
                  f"({max_len} tokens); {short} of the {len(self.examples)} are cut short (their end and EOS are "
                  f"past it)", file=sys.stderr)
        self.batch_examples = t.micro_batch * t.grad_accum * run.world
        steps = math.ceil(len(self.examples) / self.batch_examples) * s.epochs
        # at most a tenth of the run, so the run decays (a schedule no longer than its warmup is warned
        # about, in train.warmup_steps' name); 0 and 1 warmup steps are the same schedule (peak first)
        t.max_steps, t.warmup_steps = steps, min(t.warmup_steps, steps // 10)

    def setup_data(self, run) -> None:
        run.tokenizer = self.source.tokenizer
        run.data_line = self.describe_data(run)

    def describe_data(self, run) -> str:
        """'data: ...': the examples tuned on, their tokens, and what the loss reported as validation
        is computed on (the run's one line about its data, as pre-training's ``describe_data``)."""
        tokens = sum(len(ids) for ids, _ in self.examples)
        return (f"data: {run.cfg.sft.data}: {len(self.examples):,} examples tuned on, {tokens:,} tokens "
                f"({response_tokens(self.examples):,} response tokens, which the loss is on); validation: none "
                f"held out (the loss at each evaluation is on the first {min(EVAL_EXAMPLES, len(self.examples))} "
                f"training examples)")

    def build_model(self, run, stage1):
        model = self.source.model.float().train()
        model.requires_grad_(True)
        return model

    def build_sampler(self, run):
        return SFTBatches(self.examples, self.batch_examples, run.cfg.train.seed)

    def forward_backward(self, run) -> torch.Tensor:
        """The step's examples (one shuffled batch of the epoch) split over ranks and micro-batches,
        every rank running grad_accum micro-batches (empty ones as weight-0 dummies)."""
        t = run.cfg.train
        t0 = time.perf_counter()
        batch = run.sampler.next()
        self.batch_tokens = sum(len(ids) for ids, _ in batch)  # the whole step's, every rank's share included
        n_response = response_tokens(batch)
        slots = [batch[(j * run.world + run.rank) * t.micro_batch:(j * run.world + run.rank + 1) * t.micro_batch]
                 for j in range(t.grad_accum)]
        micro = [mb if mb else ("dummy", batch[:1]) for mb in slots] if run.world > 1 else slots
        run.state.data_seconds += time.perf_counter() - t0
        return accumulate_response_loss(run.loss_fn, micro, self.special.eos_id, run.device, n_response,
                                        scale=float(run.world), after_micro_batch=run.micro_batch_done)

    def step_tokens(self, run) -> int:
        """The step's real tokens (prompts and responses, no padding): examples are not seq_len long."""
        return self.batch_tokens

    @torch.no_grad()
    def evaluate(self, run, max_tokens: int | None = None) -> float:
        """Response loss (nats) on the first EVAL_EXAMPLES training examples in file order: SFT
        data has no held-out split; this tracks fitting, not generalisation (hence "train_loss")."""
        run.model.eval()
        first = self.examples[:EVAL_EXAMPLES]
        n = response_tokens(first)
        total = 0.0
        for i in range(0, len(first), run.cfg.train.micro_batch):
            ids, labels = pad_batch(first[i:i + run.cfg.train.micro_batch], self.special.eos_id)
            x, y = ids[:, :-1].to(run.device), labels[:, 1:].to(run.device)
            count = int((y != IGNORE).sum())
            if count:
                with autocast(run.device, run.dtype):
                    logits = run.model(x)
                total += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                         ignore_index=IGNORE, reduction="sum").item()
        return total / max(1, n)

    def data_fingerprint(self, run) -> None:
        return None

    def finish(self, run, summary: dict) -> dict:
        """The special tokens beside the weights, and sft_summary.json: examples, epochs, steps, losses."""
        write_special_tokens(run.out, run.tokenizer, self.special)
        from steplm.plots import read_metrics
        rows = read_metrics(run.out)
        losses = [r["loss"] for r in rows if "loss" in r]
        t = run.cfg.train
        sft = {"model": run.cfg.sft.model, "data": run.cfg.sft.data, "examples": len(self.examples),
               "epochs": run.cfg.sft.epochs, "steps": run.step, "lr": t.lr, "warmup_steps": t.warmup_steps,
               "batch_examples": self.batch_examples, "first_loss": losses[0], "final_loss": losses[-1],
               "final_train_loss": summary["final_train_loss"],
               "losses": losses, "train_seconds": summary["train_seconds"],
               "tokens_per_second": summary["tokens_per_second"], "weights_sha256": summary["weights_sha256"],
               "dtype": summary["dtype"], "device": summary["device"]}
        (run.out / "sft_summary.json").write_text(dumps(sft, indent=2))
        return {**summary, **sft}

    def summary_extra(self, run) -> dict:
        """summary.json keeps the tuned model's history (``pretraining_history``) under "pretraining",
        so that info and export still say how it was pre-trained."""
        return {"pretraining": self.pretraining}


def pretraining_history(source) -> dict:
    """How the model an SFT run tunes was made (``run_dir.run_history`` of ``source``, a resolved model
    folder: method, layers and steps per stage, tokens seen, final validation loss), and "source", the
    folder it was read from: what SFT's summary.json keeps under "pretraining"."""
    from steplm.io.run_dir import run_history

    h = {k: v for k, v in run_history(source).items() if k != "version"}
    return {**h, "source": str(source.given)}


def sft_trainer(cfg, out_dir, progress: bool = True) -> Trainer:
    """The Trainer of an SFT run (``sft_config``'s config)."""
    return Trainer(cfg, out_dir, progress, task=SFTTask())


EVAL_EXAMPLES = 64


def sft_config(model_dir: str, data: str, source_config, *, epochs: int = 2, limit: int | None = None,
               lr: float = 1e-4, warmup_steps: int = 100, batch_size: int = 8, micro_batch: int | None = None,
               weight_decay: float = 0.0, seed: int = 0, device: str = "auto", dtype: str = "auto",
               compile: bool = False, checkpoint_every: int | None = None, world: int = 1,
               overrides: list[str] = ()):
    """The RunConfig of an SFT run with the paper's Table 8 schedule: AdamW (0.9, 0.95), lr 1e-4,
    cosine to 0 after ``warmup_steps`` of linear warmup, ``epochs`` passes, grad clip 1. A step
    takes ``batch_size`` examples in forwards of ``micro_batch`` (per rank); ``source_config`` is
    the model's ModelConfig. Raises UserError when batch_size is not a multiple of micro_batch × world."""
    from steplm import config as config_mod

    micro = micro_batch or max(1, batch_size // world)
    if batch_size % (micro * world):
        raise UserError(f"--batch-size: {batch_size} examples per step is not a multiple of --micro-batch "
                        f"({micro}) × processes ({world}); change --batch-size or --micro-batch")
    sets = {"method": "vanilla", "sft.model": model_dir, "sft.data": data, "sft.epochs": epochs,
            "train.micro_batch": micro, "train.grad_accum": batch_size // (micro * world), "train.lr": lr,
            "train.warmup_steps": warmup_steps, "train.min_lr_ratio": 0.0, "train.weight_decay": weight_decay,
            "train.beta1": 0.9, "train.beta2": 0.95, "train.grad_clip": 1.0, "train.seed": seed,
            "train.device": device, "train.dtype": dtype, "train.compile": compile,
            "train.seq_len": source_config.max_seq_len, "train.eval_every": 0, "train.log_every": 1,
            "train.checkpoint_every": "null" if checkpoint_every is None else checkpoint_every,
            "train.max_steps": 1, "data.tokenizer": model_dir}
    if limit:
        sets["sft.limit"] = limit
    given = {config_mod.override_key(item) for item in overrides}  # a --set key replaces the schedule's value
    cfg = config_mod.load(None, [f"{k}={v}" for k, v in sets.items() if k not in given] + list(overrides))
    cfg.model = replace(source_config, init_from=None)
    return cfg
