"""What a training run varies, as explicit builders: a task prepares its data, builds the stage-1
model and the sampler, runs the forward and backward of one optimizer step, counts its tokens,
evaluates, and adds to the summary. ``PretrainTask`` is language-model pre-training on a tokenized
corpus (steplm train); ``train/sft.py``'s ``SFTTask`` is instruction tuning (steplm sft). The loop
(``train/loop.py``) is the same for both, as torchtitan varies its trainer through a TrainSpec."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from steplm.data.report import describe_data
from steplm.data.sampler import BatchSampler, eval_windows
from steplm.data.shards import TokenShard, default_cache_dir, prepare
from steplm.devices import autocast
from steplm.errors import UserError
from steplm.model.llama import LLaMA, build_model
from steplm.train import distributed
from steplm.train.state import data_fingerprint


class PretrainTask:
    """Pre-training on data.path: next-token loss on random windows of train.seq_len tokens,
    validation loss on the first train.eval_tokens of the held-out split."""

    lr_key = "train.lr"
    """What a divergence message tells the user to lower."""
    warmup_key = "train.warmup_steps"
    """What sets the warmup, named when a run that does not train has none."""
    checkpoint_key = "train.checkpoint_every"
    """What keeps checkpoints."""
    fit_activations = True
    """Whether train.seq_len is the length of every sequence (the memory check counts its activations)."""
    fit_keys = {"states": "model.d_model, model.n_layers or model.vocab_size",
                "activations": "train.micro_batch or train.seq_len", "rope": "model.max_seq_len"}
    """The keys to lower when a run cannot fit, by the largest part of its memory."""
    flags_init_std = True
    """Whether a divergence hint may name model.init_std (not when the weights come from a model)."""
    eval_key = "val_loss"
    """The name of ``evaluate``'s loss in metrics rows, stage records and the summary (final_val_loss)."""
    eval_what = "validation loss"
    """``evaluate``'s loss in messages."""

    def configure(self, run) -> None:
        """Complete ``run.cfg`` before the run is planned (nothing to do for pre-training)."""

    def setup_data(self, run) -> None:
        """Tokenize the corpus (rank 0 first, the others read its cache) and open the token shards;
        sets run.tokenizer, run.train_shard, run.val_tokens and run.data_line (``describe_data``)."""
        cfg = run.cfg
        cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
        if not run.main:
            distributed.barrier()  # rank 0 tokenizes first; the others then read its cache
        run.shard_dir, run.tokenizer = prepare(cfg.data, cache, run.progress)
        if run.main:
            distributed.barrier()
        n_vocab = run.tokenizer.get_vocab_size()
        if n_vocab > cfg.model.vocab_size and cfg.model.init_from:
            raise UserError(f"model.init_from: {cfg.model.init_from}'s tokenizer, with the <|endoftext|> token "
                            f"steplm ends every training document with, has {n_vocab} tokens, more than its model's "
                            f"vocabulary ({cfg.model.vocab_size})")
        if n_vocab > cfg.model.vocab_size:
            raise UserError(f"model.vocab_size: the tokenizer has {n_vocab} tokens, more than model.vocab_size "
                            f"({cfg.model.vocab_size}); raise model.vocab_size")
        run.train_shard = TokenShard.open(run.shard_dir / "train.bin")
        run.val_tokens = np.asarray(TokenShard.open(run.shard_dir / "val.bin").tokens)
        if len(run.val_tokens) <= cfg.train.seq_len:  # found now, not at the first evaluation
            where = (f"data.val_path: {cfg.data.val_path} holds" if cfg.data.val_path else
                     f"data.val_fraction: the validation split ({cfg.data.val_fraction} of {cfg.data.path}) holds")
            raise UserError(f"{where} {len(run.val_tokens)} tokens, fewer than one window of train.seq_len + 1 = "
                            f"{cfg.train.seq_len + 1}; give more validation text or lower train.seq_len")
        run.data_line = describe_data(cfg.data, run.shard_dir)  # said as training starts

    def build_model(self, run, stage1) -> LLaMA:
        """Stage 1's model: fresh (seeded) or loaded from model.init_from."""
        if run.cfg.model.init_from:
            return pretrained_model(stage1, run.device)
        return build_model(stage1, seed=run.cfg.train.seed, device=run.device)

    def build_sampler(self, run):
        """The data position: anything with next() and state_dict()/load_state_dict()."""
        t = run.cfg.train
        return BatchSampler(run.train_shard, t.seq_len, t.micro_batch, t.seed, run.rank, run.world)

    def forward_backward(self, run) -> torch.Tensor:
        """Forward and backward every micro-batch of one optimizer step; the step's loss (nats, a
        0-d tensor on the device: no host synchronisation per micro-batch)."""
        t = run.cfg.train
        total = torch.zeros((), device=run.device)
        for _ in range(t.grad_accum):
            t0 = time.perf_counter()
            x, y = run.sampler.next()
            x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
            run.state.data_seconds += time.perf_counter() - t0
            loss = run.loss_fn(x, y) / t.grad_accum
            loss.backward()
            total += loss.detach()
            run.micro_batch_done()
        return total

    def step_tokens(self, run) -> int:
        """Tokens one optimizer step trains on, over all ranks (train.micro_batch is per rank): every
        sequence is seq_len long."""
        t = run.cfg.train
        return t.micro_batch * t.grad_accum * t.seq_len * run.world

    @torch.no_grad()
    def evaluate(self, run, max_tokens: int | None = None) -> float:
        """Mean next-token loss on the first ``max_tokens`` (train.eval_tokens) of the validation split (nats)."""
        run.model.eval()
        windows = torch.from_numpy(eval_windows(run.val_tokens, run.cfg.train.seq_len,
                                                max_tokens or run.cfg.train.eval_tokens))
        total, count = 0.0, 0
        for i in range(0, len(windows), run.cfg.train.micro_batch):
            w = windows[i:i + run.cfg.train.micro_batch].to(run.device)
            with autocast(run.device, run.dtype):
                logits = run.model(w[:, :-1])
            total += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += w[:, 1:].numel()
        return total / count

    def data_fingerprint(self, run) -> dict | None:
        """What a resume checks it trains on the same data with (``state.data_fingerprint``)."""
        return data_fingerprint(run.train_shard.tokens, run.val_tokens)

    def summary_extra(self, run) -> dict:
        """Keys the task adds to summary.json (pre-training: none)."""
        return {}

    def finish(self, run, summary: dict) -> dict:
        """The run's summary, completed by the task (pre-training: as it is)."""
        return summary


def pretrained_model(stage1, device: torch.device) -> LLaMA:
    """Stage 1's model loaded from model.init_from (fp32, trainable), checked against ``stage1``,
    the validated config it must match in every architecture key and in depth."""
    from steplm.io.run_dir import load_model_dir

    src = stage1.init_from
    try:
        loaded = load_model_dir(src, device)
    except UserError as e:  # name the key that gave the folder, as config.load does for config.json
        raise e.rekeyed("model.init_from", "MODEL") from None
    if loaded.config.n_layers != stage1.n_layers:  # validation and the planner make n_1 the checkpoint's depth
        raise UserError(f"model.init_from: {src} now holds a model of {loaded.config.n_layers} layers, not the "
                        f"{stage1.n_layers} the run was planned for: a run that is still training wrote a newer "
                        f"checkpoint meanwhile; give one checkpoint folder (RUN/checkpoints/step_N)")
    if replace(loaded.config, init_std=stage1.init_std, init_from=src) != stage1:
        # only when the weights disagree with config.json (an untied lm_head.weight): hf.load_pretrained warned
        raise UserError(f"model.init_from: {src}'s weights do not match its config.json "
                        f"(tie_word_embeddings {stage1.tie_embeddings}); fix config.json")
    model = loaded.model.train()
    model.config = replace(stage1)  # a copy: growth updates model.config.n_layers
    return model
