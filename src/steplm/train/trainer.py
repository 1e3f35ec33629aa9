"""The Trainer: vanilla and staged (STEP) pre-training with one owner of the run state.

Order of passes at every growth (STEP): grow -> freeze old layers + LoRA -> (re)compile -> build a
new optimizer over the trainable parameters only -> rewarm the LR to the stage-1 peak.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from steplm.train import checkpoint
from steplm import config as config_mod
from steplm.train import distributed
from steplm import methods
from steplm.train import guards
from steplm.devices import autocast, check_model_fits, gib, pick_device, pick_dtype, require_memory, retain_host_memory
from steplm.data.sampler import BatchSampler, eval_windows
from steplm.data.shards import TokenShard, default_cache_dir, prepare
from steplm.eval.perplexity import perplexity_of
from steplm.errors import Preempted, TrainingStopped, UserError
from steplm.passes.lora import LoRALinear, apply_lora, merge_and_reinit, merged_state_dict
from steplm.plan.stages import Stage, minimum_peak_bytes, plan_run
from steplm.config.schema import ModelConfig
from steplm.model.llama import Attention, LLaMA, build_model, count_params, from_state_dict


def _fsdp_module_type():
    from torch.distributed.fsdp import FSDPModule
    return FSDPModule


# ---------------------------------------------------------------------------- helpers
def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds: for a tensor subclass (torchao's quantized optimizer states) the
    sum over its inner tensors (codes, block scales, lookup table), not numel × nominal dtype."""
    if hasattr(t, "__tensor_flatten__") and not _is_dtensor(t):  # FSDP2's DTensor: its global size, as before
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(x) for x in (getattr(t, n) for n in names) if torch.is_tensor(x))
    return t.numel() * t.element_size()


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def state_bytes(model: LLaMA, optimizer: torch.optim.Optimizer) -> dict:
    """Bytes held by parameters, gradients and per-element optimizer state (Adam moments), from the
    live tensors, split into transformer layers and the rest. Adam's 0-d step counters are reported
    apart (``optimizer_step_counters``) because the paper's 16 B/param model has no term for them."""
    layers = total = counters = 0
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        b = p.numel() * p.element_size()
        if p.grad is not None:
            b += p.grad.numel() * p.grad.element_size()
        for t in optimizer.state.get(p, {}).values():
            if hasattr(t, "ortho_matrix"):  # a GaLore projector holds its projection matrix (or two)
                mats = t.ortho_matrix if isinstance(t.ortho_matrix, (list, tuple)) else [t.ortho_matrix]
                b += sum(m.numel() * m.element_size() for m in mats if m is not None)
            elif torch.is_tensor(t):
                if t.dim() == 0:
                    counters += t.numel() * t.element_size()
                else:
                    b += _tensor_bytes(t)
        total += b
        if name.startswith("model.layers."):
            layers += b
    return {"layers": layers, "total": total, "optimizer_step_counters": counters}


def _cpu_peak_step(step_fn, model, optimizer, trainer=None) -> int | None:
    """Peak tracked tensor bytes during one step on CPU (torch's MemTracker), or None if unsupported."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:
        return None

    class Tracker(MemTracker):
        # MemTracker hooks every parameter's gradient to label it, which fails on frozen ones; the
        # hooks only label, every allocation is still counted in the total.
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

        # After every op MemTracker also updates each tracked module's own peak, a walk over all
        # modules: 3-4x the step's tracked time at 12 layers. Only the global peak is read here,
        # so the library's update runs with no modules to walk; the total it tracks is unchanged.
        def _update_peak_stats(self, peak_state):
            modules, self.memory_tracking = self.memory_tracking, {}
            try:
                super()._update_peak_stats(peak_state)
            finally:
                self.memory_tracking = modules

    tracker = Tracker()
    tracker.track_external(model, optimizer)
    if trainer is not None:  # with gradient accumulation: one forward per micro-batch, same global peak
        trainer.after_micro_batch = tracker.reset_mod_stats
    try:
        with tracker:
            step_fn()
    finally:
        if trainer is not None:
            trainer.after_micro_batch = None
    peak = tracker.get_tracker_snapshot("peak")
    return int(next(iter(peak.values()))["Total"]) if peak else None


def pretrained_model(stage1: ModelConfig, device: torch.device) -> LLaMA:
    """Stage 1's model loaded from model.init_from (fp32, trainable), checked against ``stage1``,
    the validated config it must match in every architecture key and in depth."""
    from steplm.io.hf import load_pretrained

    src = stage1.init_from
    try:
        loaded = load_pretrained(src, device)
    except UserError as e:  # name the key that gave the folder, as config.load does for config.json
        raise UserError(str(e).replace("MODEL:", "model.init_from:", 1)) from None
    if loaded.config.n_layers != stage1.n_layers:  # validation and the planner make n_1 the checkpoint's depth
        raise RuntimeError(f"stage 1 has {stage1.n_layers} layers, the checkpoint {loaded.config.n_layers}")
    if replace(loaded.config, init_std=stage1.init_std, init_from=src) != stage1:
        # only when the weights disagree with config.json (an untied lm_head.weight): hf.load_pretrained warned
        raise UserError(f"model.init_from: {src}'s weights do not match its config.json "
                        f"(tie_word_embeddings {stage1.tie_embeddings}); fix config.json")
    model = loaded.model.train()
    model.config = replace(stage1)  # a copy: growth updates model.config.n_layers
    return model


# ---------------------------------------------------------------------------- trainer
def _own_code(method):
    """``method`` (a bound method) over its own copy of the code object. torch.compile keeps its
    compiled graphs and their guards on the code object, and stops compiling a code object after
    ``torch._dynamo.config.recompile_limit`` (8) of them: every stage of every Trainer in one process
    compiling the same ``Trainer._loss`` would reach it (a third 3-stage run in a sweep), and the rest
    would run eager without a word. A copy per (trainer, stage) holds one graph and is freed with it."""
    f = method.__func__
    g = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__, g.__qualname__ = f.__kwdefaults__, f.__qualname__
    return types.MethodType(g, method.__self__)


class Trainer:
    """Owns model, optimizer, schedule, data position, step, stage and RNG state of one run."""

    LR_KEY = "train.lr"  # what a divergence message tells the user to lower
    CHECKPOINT_KEY = "train.checkpoint_every"  # what keeps checkpoints (sft: its flag)
    DIVERGED_NATS = 1.0  # a final val loss this far above ln(vocab_size) (a uniform guess) stops the run: diverged
    # A final val loss less than this far below ln(vocab_size) warns: the model learned (almost) nothing. A fresh
    # model scores ln(vocab_size) plus or minus a few hundredths; one that learned only the token frequencies of
    # English text is already about ln(vocab_size) - 1 (unigram entropy), so 0.1 separates the two with room.
    LEARNED_NATS = 0.1

    def __init__(self, cfg: config_mod.RunConfig, out_dir: str | Path, progress: bool = True):
        config_mod.validate(cfg)
        self.cfg, self.out, self.progress = cfg, Path(out_dir), progress
        self.device = pick_device(cfg.train.device)
        self.dtype = pick_dtype(cfg.train.dtype, self.device)
        if self.device.type == "cpu" and cfg.train.host_allocator == "retain":
            retain_host_memory()
        self.rank, self.world = distributed.init(self.device)
        self.main = self.rank == 0  # only rank 0 logs and writes
        self.fsdp = self.world > 1 and cfg.train.parallel == "fsdp2"
        self.progress = progress and self.main
        self.lock = None
        self.preemption: guards.Preemption | None = None  # set while fit runs
        if not self.fsdp:  # FSDP2 shards the states over the ranks
            self._check_fits(plan_run(cfg))
        if self.main:
            self._prepare_output_dir()
        self._setup_data()
        self.plan = plan_run(cfg)
        self.method = methods.get(self.plan.method)
        self.layers_per_stage = self.plan.layers_per_stage
        self.stage_steps = self.plan.steps

        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        self.gen = torch.Generator().manual_seed(cfg.train.seed + 1)  # adapters, growth
        self.model = self._initial_model(replace(cfg.model, n_layers=self.plan.stages[0].layers))
        self.model.activation_checkpointing = cfg.train.activation_checkpointing
        self.sampler = self._make_sampler()
        self.stage = self.step = self.step_in_stage = self.tokens = self.skipped = 0
        self.flops = {"paper": 0, "corrected": 0}
        self.data_seconds = self.step_seconds = 0.0
        self.stage_records: list[dict] = []
        self.record: dict | None = None  # the current stage's record, filled after its first step
        self.metrics_bytes = 0  # length of metrics.jsonl at the last checkpoint
        self.resumed_from: Path | None = None
        self.after_micro_batch = None  # set while the CPU peak tracker watches a step
        self.saved_step = None  # step of the checkpoint this process wrote last
        self.merge_rows: list[dict] = []  # metrics rows of adapter merges, logged by fit
        self.warned_merge = False
        self.method.enter_stage(self, self.current_stage)
        self.optimizer = self._build_optimizer()
        self._compile()
        latest = checkpoint.latest_valid(self.out / "checkpoints")
        if latest is not None:
            self._check_resume_config()
            self.load_checkpoint(latest)

    # keys to lower when a run cannot fit (the three parts of stages.minimum_peak_bytes)
    FIT_ACTIVATIONS = True  # whether train.seq_len is the length of every sequence (not with SFT)
    FIT_KEYS = {"states": "model.d_model, model.n_layers or model.vocab_size",
                "activations": "train.micro_batch or train.seq_len", "rope": "model.max_seq_len"}

    def _check_fits(self, plan):
        """Refuse a run whose lower bound on peak memory exceeds what the device can ever hold, before
        anything is allocated (a size like model.d_model=1e9 would otherwise end in an allocator's
        traceback): one line with the bound, its parts and the keys that set the largest part."""
        need = minimum_peak_bytes(self.cfg, plan, self.FIT_ACTIVATIONS)
        part = max(("states", "activations", "rope"), key=need.get)
        key = self.FIT_KEYS[part]
        if part == "rope" and self.cfg.model.init_from:
            key += " (max_position_embeddings in model.init_from's config.json)"
        require_memory(need["total"], self.device, f"this run (model states {gib(need['states'])}, activations "
                       f"{gib(need['activations'])}, RoPE tables {gib(need['rope'])})", key)

    # -- set-up (the three hooks a second use of the loop, SFT, overrides) -------------------------
    def _setup_data(self):
        """Tokenize the corpus (rank 0 first, the others read its cache) and open the token shards;
        sets self.tokenizer, self.train_shard and self.val_tokens."""
        cfg = self.cfg
        cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
        if not self.main:
            distributed.barrier()  # rank 0 tokenizes first; the others then read its cache
        self.shard_dir, self.tokenizer = prepare(cfg.data, cache, self.progress)
        if self.main:
            distributed.barrier()
        n_vocab = self.tokenizer.get_vocab_size()
        if n_vocab > cfg.model.vocab_size and cfg.model.init_from:
            raise UserError(f"model.init_from: {cfg.model.init_from}'s tokenizer, with the <|endoftext|> token "
                            f"steplm ends every training document with, has {n_vocab} tokens, more than its model's "
                            f"vocabulary ({cfg.model.vocab_size})")
        if n_vocab > cfg.model.vocab_size:
            raise UserError(f"model.vocab_size: the tokenizer has {n_vocab} tokens, more than model.vocab_size "
                            f"({cfg.model.vocab_size}); raise model.vocab_size")
        self.train_shard = TokenShard.open(self.shard_dir / "train.bin")
        self.val_tokens = np.asarray(TokenShard.open(self.shard_dir / "val.bin").tokens)
        if len(self.val_tokens) <= cfg.train.seq_len:  # found now, not at the first evaluation
            where = (f"data.val_path: {cfg.data.val_path} holds" if cfg.data.val_path else
                     f"data.val_fraction: the validation split ({cfg.data.val_fraction} of {cfg.data.path}) holds")
            raise UserError(f"{where} {len(self.val_tokens)} tokens, fewer than one window of train.seq_len + 1 = "
                            f"{cfg.train.seq_len + 1}; give more validation text or lower train.seq_len")

    def _initial_model(self, stage1: ModelConfig) -> LLaMA:
        """Stage 1's model: fresh (seeded) or loaded from model.init_from."""
        if self.cfg.model.init_from:
            return pretrained_model(stage1, self.device)
        return build_model(stage1, seed=self.cfg.train.seed, device=self.device)

    def _make_sampler(self):
        """The data position: anything with next() and state_dict()/load_state_dict()."""
        t = self.cfg.train
        return BatchSampler(self.train_shard, t.seq_len, t.micro_batch, t.seed, self.rank, self.world)

    def _prepare_output_dir(self):
        """Create the run directory and take its lock (one writer per directory; a dead holder's lock
        is taken over). Creating the lock file doubles as the write test. A finished run or a foreign
        non-empty directory is refused before anything is written there."""
        guards.check_run_dir(self.out)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out: cannot write to {self.out} ({e.strerror})")
        self.lock = guards.RunLock(self.out)
        if self.lock.stale_pid and self.progress:
            print(f"steplm: taking over {self.out} from pid {self.lock.stale_pid}, which died holding it",
                  file=sys.stderr)

    def _compile(self):
        """(Re)wrap after every change of the model's shape: DDP across ranks, then compile forward +
        loss as one graph (the cross-entropy over the vocabulary fuses with the head)."""
        for m in self.model.modules():  # new layers of a growth start from the class default
            if isinstance(m, Attention):
                m.matmul_backward = self.cfg.train.attention_matmul_backward
        self.wrapped = self.model
        if self.fsdp:
            if not isinstance(self.model, _fsdp_module_type()):
                self._shard()
        elif self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.wrapped = DistributedDataParallel(self.model)
        self.loss_fn = torch.compile(_own_code(self._loss)) if self.cfg.train.compile else self._loss

    def _build_optimizer(self, previous: torch.optim.Optimizer | None = None, model: LLaMA | None = None
                         ) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters only: 2-D weights decay, norms do not. The state of
        embeddings, head and final norm (trainable in every stage) is carried over; every layer
        parameter, adapters included, starts fresh, so the old layers' moments are freed.
        Groups: [decay, no decay]; with train.embedding_lr_scale != 1 the parameters outside the
        blocks move to two more groups, [decay, no decay], whose ``lr_scale`` multiplies the lr."""
        t = self.cfg.train
        model = model or self.model
        sharded = self.fsdp and isinstance(model, _fsdp_module_type())
        split = t.embedding_lr_scale != 1.0
        decay, no_decay, outer_decay, outer_no_decay, carry = [], [], [], [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                outer = not name.startswith("model.layers.")
                if split and outer:
                    (outer_decay if p.dim() >= 2 else outer_no_decay).append(p)
                else:
                    (decay if p.dim() >= 2 else no_decay).append(p)
                if outer:
                    carry.append(p)
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups += [{"params": ps, "weight_decay": wd, "lr_scale": t.embedding_lr_scale}
                   for ps, wd in ((outer_decay, t.weight_decay), (outer_no_decay, 0.0)) if ps]
        # fused AdamW does not take FSDP2's DTensor shards
        opt = self.method.build_optimizer(self.cfg, model, groups, fused=t.fused_optimizer and not sharded)
        if previous is not None:
            for p in carry:
                if p in previous.state:
                    opt.state[p] = previous.state[p]
        return opt

    # -- schedule ---------------------------------------------------------------------------
    @property
    def current_stage(self) -> Stage:
        return self.plan.stages[self.stage]

    def lr_at(self, step_in_stage: int) -> float:
        """LR at a step of the current stage: warmup then cosine over the stage's schedule (STEP
        rewarms to the stage-1 peak each stage; the other methods follow one cosine over the run),
        times ReLoRA's restart ramp (jagged cosine) in stages whose adapters are reset."""
        t, st = self.cfg.train, self.current_stage
        s = step_in_stage if st.schedule_restarts else self.step  # position in the schedule
        total = st.schedule_steps
        if s < t.warmup_steps:
            lr = t.lr * (s + 1) / t.warmup_steps
        else:
            progress = min(1.0, (s - t.warmup_steps) / max(1, total - t.warmup_steps))
            lr = t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        if st.adapter_resets and self.cfg.lora.relora_warmup and step_in_stage >= st.restart_ramp_from:
            lr *= methods.base.restart_ramp(self.cfg, step_in_stage)
        return lr

    # -- stage transitions --------------------------------------------------------------------
    def next_stage(self):
        """Move to the next stage: the method's pass over the model (grow and freeze, or switch to
        LoRA), then a new optimizer over the trainable parameters and a new compiled step."""
        self._unwrap()
        self.stage += 1
        self.step_in_stage = 0
        self.method.enter_stage(self, self.current_stage)
        old = self.optimizer
        self.optimizer = self._build_optimizer(previous=old)
        del old
        self._compile()

    def merge_adapters(self, optimizer=None, prune_ratio=None) -> int:
        """Fold every adapter into its frozen base and re-initialise it (``merge_and_reinit``), and
        queue a metrics row with the share of the update that the rounding into bf16 kept. Warns once
        when that share falls below 0.9."""
        lo, stats = self.cfg.lora, {}
        n = merge_and_reinit(self.model, optimizer, self.gen, prune_ratio, lo.merge_rounding, stats)
        share = stats.get("kept_share")
        if share is None:
            return n
        self.merge_rows.append({"step": self.step, "stage": self.stage, "merge_kept_share": share,
                                "merge_update_rms_ratio": stats["update_rms_ratio"],
                                "merge_rounding": lo.merge_rounding, "merged_adapters": n})
        if share < 0.9 and not self.warned_merge and self.main:
            self.warned_merge = True
            print(f"steplm: warning: step {self.step}: rounding the merged adapters into bf16 kept {share:.0%} of "
                  f"their update (update/weight rms {stats['update_rms_ratio']:.1e}); merge larger updates with a "
                  f"longer lora.relora_interval or a higher train.lr, or set lora.merge_rounding=stochastic",
                  file=sys.stderr)
        return n

    # -- training ---------------------------------------------------------------------------
    def _loss(self, x, y):
        """Mean next-token loss of one micro-batch (x, y: (B, T) token ids), in nats."""
        with autocast(self.device, self.dtype):
            if self.cfg.train.fused_loss:  # head + cross-entropy chunk by chunk (loss.py)
                return self.wrapped(x, targets=y)
            logits = self.wrapped(x)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

    def train_step(self) -> float:
        """One optimizer step (with gradient accumulation); returns the mean micro-batch loss."""
        t = self.cfg.train
        self.model.train()
        lr = self.lr_at(self.step_in_stage)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        start = self.sampler.state_dict()  # a step abandoned on preemption is redone from here
        try:
            total = self.forward_backward()
        except guards.StepAbandoned:
            self.sampler.load_state_dict(start)
            self.optimizer.zero_grad(set_to_none=True)
            raise
        params = [p for p in self.model.parameters() if p.requires_grad]
        scale = None
        if self._clip_in_step():
            # torch's fused AdamW divides each gradient by grad_scale inside its kernel (and stores it
            # back so): clipping there saves clip_grad_norm_'s separate pass over every gradient
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            scale = torch.clamp((norm + 1e-6) / t.grad_clip, min=1.0)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip or float("inf"))
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        total, norm = torch.stack([total.float(), norm.float()]).tolist()  # one synchronisation per step
        if checkpoint.fault_active("nan_at_step", self.step + 1):
            total = float("nan")
        bad = not (math.isfinite(total) and math.isfinite(norm)) or (t.max_grad_norm and norm > t.max_grad_norm)
        if bad:
            what = f"loss {total:.4g}, gradient norm {norm:.4g}"
            if t.on_nonfinite == "stop":
                raise TrainingStopped(f"step {self.step + 1}: bad batch ({what}); stopped, {self._kept()} "
                                      f"(set train.on_nonfinite=skip to skip such batches)")
            self.skipped += 1
            if self.skipped > t.max_skipped:
                raise TrainingStopped(f"step {self.step + 1}: {self.skipped} bad batches skipped, more than "
                                      f"train.max_skipped ({t.max_skipped}); {self._lower_hint()}")
            return total, False
        self.optimizer.grad_scale = scale  # None: no scale; read by this step only (GradScaler's protocol)
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.grad_scale
        return total, True

    def _clip_in_step(self) -> bool:
        """Whether the gradient clipping rides on the optimizer step (``grad_scale`` of torch's fused
        AdamW: the clip coefficient's inverse) instead of a pass rescaling the gradients first. The same
        update up to rounding; only where the step is torch's fused AdamW over local tensors."""
        opt = self.optimizer
        return (bool(self.cfg.train.grad_clip) and type(opt) is torch.optim.AdamW
                and bool(opt.defaults.get("fused")) and not self.fsdp)

    def forward_backward(self) -> torch.Tensor:
        """Forward and backward every micro-batch of one optimizer step; the step's loss (nats, a
        0-d tensor on the device: no host synchronisation per micro-batch)."""
        t = self.cfg.train
        total = torch.zeros((), device=self.device)
        for _ in range(t.grad_accum):
            t0 = time.perf_counter()
            x, y = self.sampler.next()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            self.data_seconds += time.perf_counter() - t0
            loss = self.loss_fn(x, y) / t.grad_accum
            loss.backward()
            total += loss.detach()
            self._micro_batch_done()
        return total

    def _micro_batch_done(self):
        """Between micro-batches: the CPU peak tracker's hook, the mid-step fault hook, and a
        preemption check. In one process a SIGTERM/SIGUSR1 abandons the step here (StepAbandoned):
        a step of many micro-batches can outlast a scheduler's grace period. With several ranks the
        check stays between optimizer steps, where one collective per step asks every rank."""
        if self.after_micro_batch is not None:
            self.after_micro_batch()
        checkpoint.signal_fault(self.step + 1, "mid_step")
        if self.world == 1 and self.preemption is not None and self.preemption.signum is not None:
            raise guards.StepAbandoned

    def _step_tokens(self) -> int:
        """Tokens one optimizer step trains on, over all ranks (train.micro_batch is per rank): every
        sequence is seq_len long."""
        return self.cfg.train.micro_batch * self.cfg.train.grad_accum * self.cfg.train.seq_len * self.world

    def _account(self):
        tokens = self._step_tokens()
        self.tokens += tokens
        for conv in self.flops:
            self.flops[conv] += self.current_stage.flops_per_token[conv] * tokens
        self.step += 1
        self.step_in_stage += 1
        self.method.after_optimizer_step(self)

    @torch.no_grad()
    def evaluate(self, max_tokens: int | None = None) -> float:
        """Mean next-token loss on the first ``max_tokens`` of the validation split (nats)."""
        self.model.eval()
        windows = torch.from_numpy(eval_windows(self.val_tokens, self.cfg.train.seq_len,
                                                max_tokens or self.cfg.train.eval_tokens))
        total, count = 0.0, 0
        for i in range(0, len(windows), self.cfg.train.micro_batch):
            w = windows[i:i + self.cfg.train.micro_batch].to(self.device)
            with autocast(self.device, self.dtype):
                logits = self.model(w[:, :-1])
            total += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += w[:, 1:].numel()
        return total / count

    def _stage_record(self, measured: dict, peak: int | None) -> dict:
        st = self.current_stage
        return {"stage": self.stage, "layers": st.layers, "new_layers": st.new_layers,
                "trainable_params": st.trainable_params, "frozen_params": st.frozen_params,
                "lora_params": st.lora_params, "planned_state_bytes": dict(st.planned_state_bytes),
                "measured_state_bytes": {"layers": measured["layers"], "total": measured["total"]},
                "optimizer_step_counter_bytes": measured["optimizer_step_counters"],
                "peak_bytes": peak, "peak_source": "cuda.max_memory_allocated" if self.device.type == "cuda"
                else "MemTracker (tracked tensor bytes)"}

    # -- run state ---------------------------------------------------------------------------
    def layer_layout(self, model=None) -> list[dict]:
        """The model's current shape: per layer whether it is frozen, its adapter rank, frozen norms."""
        out = []
        for block in (model or self.model).model.layers:
            lins = [m for m in block.modules() if isinstance(m, LoRALinear)]
            out.append({"frozen": bool(lins), "rank": lins[0].rank if lins else 0,
                        "norms_frozen": not block.input_layernorm.weight.requires_grad})
        return out

    def state_dict(self, model=None, optimizer=None) -> dict:
        """Everything but the weights: optimizer, schedule position, data position, counters, RNGs."""
        model, optimizer = model or self.model, optimizer or self.optimizer
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "gen": self.gen.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"step": self.step, "stage": self.stage, "step_in_stage": self.step_in_stage, "tokens": self.tokens,
                "flops": dict(self.flops), "skipped": self.skipped, "data_seconds": self.data_seconds,
                "step_seconds": self.step_seconds, "stage_records": self.stage_records, "record": self.record,
                "layers": self.layer_layout(model), "optimizer": optimizer.state_dict(),
                "sampler": self.sampler.state_dict(), "rng": rng, "metrics_bytes": self.metrics_bytes,
                "stage_steps": self.stage_steps, "layers_per_stage": self.layers_per_stage,
                "data": self._data_fingerprint()}

    def _data_fingerprint(self) -> dict | None:
        """What identifies the tokenized data a run trains on: both splits' token counts and a hash of
        their first 64K tokens (content, not file times: a copied corpus still resumes). None for SFT."""
        if getattr(self, "train_shard", None) is None:
            return None
        import hashlib
        train, val = np.asarray(self.train_shard.tokens), np.asarray(self.val_tokens)
        h = hashlib.sha256(np.ascontiguousarray(train[:65536]).tobytes() + np.ascontiguousarray(val[:65536]).tobytes())
        return {"train_tokens": int(len(train)), "val_tokens": int(len(val)), "sha256_head": h.hexdigest()}

    def _plain_model(self, layout: list[dict], weights: dict[str, torch.Tensor]) -> LLaMA:
        """An unwrapped model of the given shape (frozen bf16 layers with adapters) holding ``weights``."""
        model = build_model(replace(self.cfg.model, n_layers=len(layout)), seed=self.cfg.train.seed, device=self.device)
        model.activation_checkpointing = self.cfg.train.activation_checkpointing
        for block, desc in zip(model.model.layers, layout):
            if desc["frozen"]:
                apply_lora(block, desc["rank"], self.cfg.lora.alpha, freeze_norms=desc["norms_frozen"])
        if self.cfg.model.tie_embeddings:
            weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])
        model.load_state_dict(weights, strict=True)
        return model

    def _gather_plain(self) -> tuple[LLaMA, torch.optim.Optimizer]:
        """FSDP2: the full model and optimizer rebuilt unwrapped on every rank (a collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        names = {id(p): n for n, p in self.model.named_parameters()}
        state = {names[id(p)]: {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in st.items()}
                 for p, st in self.optimizer.state.items()}
        model = self._plain_model(self.layer_layout(), dict(weights))
        optimizer = self._build_optimizer(model=model)
        for name, p in model.named_parameters():
            if name in state:
                optimizer.state[p] = state[name]
        return model, optimizer

    def _shard(self):
        """FSDP2: shard each block and the root in place, then rebuild the optimizer over the shards,
        moving each parameter's state by name (parameters without state start fresh)."""
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import distribute_tensor

        names = {id(p): n for n, p in self.model.named_parameters()}
        state = {names[id(p)]: st for p, st in self.optimizer.state.items()}
        for block in self.model.model.layers:
            fully_shard(block)
        fully_shard(self.model)
        self.optimizer = self._build_optimizer()
        for name, p in self.model.named_parameters():
            if name in state:
                self.optimizer.state[p] = {k: distribute_tensor(v, p.device_mesh, p.placements)
                                           if torch.is_tensor(v) and v.dim() else v for k, v in state[name].items()}

    def _unwrap(self):
        """FSDP2: make self.model / self.optimizer unwrapped again before a change of shape."""
        if self.fsdp:
            self.model, self.optimizer = self._gather_plain()

    def load_state_dict(self, state: dict, weights: dict[str, torch.Tensor]):
        """Rebuild the model's shape (grown layers, frozen bf16 bases, adapters), then load everything."""
        saved, now = state.get("data"), self._data_fingerprint()
        if saved is not None and now is not None and saved != now:  # its data position would mean other text
            key = "data.path or data.val_path" if self.cfg.data.val_path else "data.path"
            raise UserError(f"{key}: the data differ from those the checkpoint was trained on ({saved['train_tokens']:,} "
                            f"training and {saved['val_tokens']:,} validation tokens then, {now['train_tokens']:,} and "
                            f"{now['val_tokens']:,} now, or other text); resume with the same data, or start a new --out")
        self.model = self._plain_model(state["layers"], weights)
        for key in ("step", "stage", "step_in_stage", "tokens", "skipped", "data_seconds", "step_seconds",
                    "stage_records", "record", "metrics_bytes"):
            setattr(self, key, state[key])
        self.flops = dict(state["flops"])
        self.optimizer = self._build_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        self.gen.set_state(rng["gen"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self._compile()

    def save_checkpoint(self) -> Path | None:
        """Atomic checkpoint of weights + run state in the single-process format (every rank takes
        part under FSDP2; rank 0 writes); refuses to save a non-finite model."""
        self.saved_step = self.step
        model, optimizer = self._gather_plain() if self.fsdp else (self.model, self.optimizer)
        if not self.main:
            return None
        if not guards.all_finite(model.parameters()):
            raise self._nonfinite("checkpoint")
        weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if self.cfg.model.tie_embeddings:
            weights.pop("lm_head.weight", None)
        state = self.state_dict(model, optimizer)
        return checkpoint.save(self.out / "checkpoints", self.step, {
            "model.safetensors": lambda p: save_file(weights, str(p)),
            "trainer.pt": lambda p: torch.save(state, p),
            "config.yaml": lambda p: config_mod.save(self.cfg, p),
        }, keep=self.cfg.train.keep_checkpoints)

    def load_checkpoint(self, path: Path):
        weights = load_file(str(path / "model.safetensors"), device=str(self.device))
        state = torch.load(path / "trainer.pt", map_location=self.device, weights_only=False)
        self.load_state_dict(state, weights)
        self.resumed_from = path
        if self.progress:
            print(f"steplm: resuming from {path} (step {self.step}, {self._stage_name()})", file=sys.stderr)

    def _check_resume_config(self):
        saved = self.out / "config.yaml"
        if not saved.is_file():
            return
        diff = [k for k in config_mod.differing_keys(config_mod.load(saved), self.cfg)
                if k not in config_mod.RESUME_SAFE_KEYS]
        if diff:
            raise UserError(f"--out: {self.out} holds a run with a different config ({', '.join(diff)}); "
                            f"use the same config to resume, or another --out")

    def fit(self) -> dict:
        """Train every stage (resuming where a checkpoint left off); write metrics.jsonl, checkpoints,
        the final weights and summary.json. Returns the summary. On SIGTERM or SIGUSR1 it stops at the
        next micro-batch (one process: the unfinished step is dropped and redone on resume) or after
        the current optimizer step (several ranks), writes a checkpoint and raises Preempted; it raises
        TrainingStopped rather than write non-finite weights."""
        try:
            with guards.Preemption() as self.preemption:
                return self._fit()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _fit(self) -> dict:
        from tqdm import tqdm

        cfg, t = self.cfg, self.cfg.train
        metrics = self._open_metrics() if self.main else None
        board = self._open_tensorboard() if self.main and t.tensorboard else None

        def log(row):
            if metrics is None:
                return
            metrics.write(guards.dumps(row) + "\n")
            metrics.flush()
            if board is not None:
                for k, v in row.items():
                    if k not in ("step", "stage") and isinstance(v, (int, float)):
                        board.add_scalar(k, v, row["step"])

        total_steps = sum(self.stage_steps)
        bar = tqdm(total=total_steps, initial=self.step, desc="train", disable=not self.progress, dynamic_ncols=True)
        t_start = time.perf_counter()
        tok_window, t_window = 0, time.perf_counter()
        while self.step < total_steps:
            if self.step_in_stage == self.stage_steps[self.stage]:  # the stage is done: grow / switch
                self.next_stage()
                self._log_merges(log)
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
            n_steps = self.stage_steps[self.stage]
            measure_peak = self.step_in_stage == min(1, n_steps - 1) and self.device.type == "cpu" and not t.compile
            t0 = time.perf_counter()
            try:
                if measure_peak and self.world == 1:
                    box = {}
                    peak = _cpu_peak_step(lambda: box.setdefault("out", self.train_step()), self.model,
                                          self.optimizer, self)
                    loss, ok = box["out"]
                else:
                    (loss, ok), peak = self.train_step(), None
            except guards.StepAbandoned:
                self._stop_for_preemption(metrics)  # the checkpoint of the last whole step
            if self.record is None and ok:  # after the stage's first optimizer step
                self.record = self._stage_record(state_bytes(self.model, self.optimizer), None)
                self.record["_seconds_at_start"] = self.step_seconds
            if measure_peak and self.record is not None:
                self.record["peak_bytes"] = peak
            self.optimizer.zero_grad(set_to_none=True)
            self._account()
            self._log_merges(log)
            self.step_seconds += time.perf_counter() - t0
            tok_window += self._step_tokens()
            if self.world > 1:
                loss = distributed.mean(loss)
            if self.step % t.log_every == 0 or self.step == total_steps or not ok:
                now = time.perf_counter()
                tps = tok_window / max(now - t_window, 1e-9)
                tok_window, t_window = 0, now
                log({"step": self.step, "stage": self.stage, "loss": round(loss, 5) if math.isfinite(loss) else str(loss),
                     "lr": self.optimizer.param_groups[0]["lr"], "tokens": self.tokens,
                     "flops": self.flops[cfg.step.flops_convention], "skipped": self.skipped,
                     "tok_per_s": round(tps, 1)})
                bar.set_postfix(stage=self.stage, loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
                self._check_weights_finite()  # after the row, so metrics.jsonl shows what happened
            if self.step_in_stage == n_steps:
                self._finish_stage(log)
            elif t.eval_every and self.step % t.eval_every == 0:
                log({"step": self.step, "stage": self.stage, "val_loss": round(self.evaluate(), 5),
                     "tokens": self.tokens, "flops": self.flops[cfg.step.flops_convention]})
            if t.checkpoint_every and (self.step % t.checkpoint_every == 0 or self.step == total_steps):
                if self.main:
                    self.metrics_bytes = metrics.tell()
                self.save_checkpoint()
                if self.main:
                    checkpoint._fault("kill_after_step", self.step)
                distributed.barrier()
            bar.update(1)
            checkpoint.signal_fault(self.step)
            if self.preemption.requested(self.world):
                self._stop_for_preemption(metrics)
        bar.close()
        if metrics is not None:
            metrics.close()
        if board is not None:
            board.close()
        return self._finish(self.step_seconds if self.resumed_from else time.perf_counter() - t_start)

    def _log_merges(self, log):
        while self.merge_rows:
            log(self.merge_rows.pop(0))

    def _check_weights_finite(self):
        """Stop (exit 3) as soon as a parameter holds NaN/inf: one fused on-device reduction and one
        host sync, at log steps only."""
        finite = guards.all_finite(self.model.parameters())
        if self.world > 1:
            finite = distributed.mean(float(finite)) == 1.0
        if not finite:
            raise self._nonfinite("log step")

    def _nonfinite(self, where: str) -> TrainingStopped:
        return TrainingStopped(f"step {self.step}: the weights are not finite (found at the {where}); {self._kept()} "
                               f"and no model was written ({self._lower_hint()})")

    def _stop_for_preemption(self, metrics):
        """Checkpoint the step just finished (unless that was already done) and raise Preempted."""
        if self.saved_step != self.step:
            if self.main:
                self.metrics_bytes = metrics.tell()
            self.save_checkpoint()
            distributed.barrier()
        raise Preempted(f"{self.preemption.name} after step {self.step}: checkpoint "
                        f"{checkpoint.step_dir(self.out / 'checkpoints', self.step)} written; rerun the same "
                        f"command to resume")

    def _open_metrics(self):
        config_mod.save(self.cfg, self.out / "config.yaml")
        self.tokenizer.save(str(self.out / "tokenizer.json"))
        path = self.out / "metrics.jsonl"
        if self.resumed_from is not None and path.exists():
            os.truncate(path, self.metrics_bytes)  # drop rows written after the checkpoint
        elif self.resumed_from is None:
            path.write_text("")
        return open(path, "a")

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("train.tensorboard: needs the tensorboard package (pip install tensorboard)")
        return SummaryWriter(str(self.out / "tensorboard"))

    def _stage_name(self) -> str:
        """'stage 2 of 3': 1-based, as `steplm plan` numbers stages (metrics rows keep the 0-based index)."""
        return f"stage {self.stage + 1} of {len(self.stage_steps)}"

    def _lower_hint(self) -> str:
        """What to lower when steps keep failing: the lr; with adapters in the model their scale; and an
        init_std far above the default's 0.02, whose logits start huge."""
        from steplm.passes.lora import LoRALinear
        hint = f"lower {self.LR_KEY}"
        if any(isinstance(m, LoRALinear) for m in self.model.modules()):
            lo = self.cfg.lora
            hint += (f", or lora.alpha (the adapters scale their update by lora.alpha / lora.rank = "
                     f"{lo.alpha / lo.rank:.3g})")
        if self.cfg.model.init_std > 0.2 and not self.cfg.sft.model:
            hint += f", or model.init_std ({self.cfg.model.init_std:g}; the default is 0.02)"
        return hint

    def _kept(self) -> str:
        """What a stopped run leaves to resume from: its newest checkpoint, or nothing."""
        steps = checkpoint.list_steps(self.out / "checkpoints")
        if steps:
            return f"the last good checkpoint (step {steps[-1]}) is kept"
        return f"there is no checkpoint to resume from ({self.CHECKPOINT_KEY} keeps them)"

    def _finish_stage(self, log):
        """End-of-stage evaluation and memory record."""
        if self.record is None:
            raise TrainingStopped(f"{self._stage_name()} ended without a successful optimizer step: every step's loss "
                                  f"or gradient norm was not finite, or above train.max_grad_norm; {self._lower_hint()}")
        if self.device.type == "cuda":
            self.record["peak_bytes"] = torch.cuda.max_memory_allocated()
        val = self.evaluate()
        if not math.isfinite(val):  # finite weights whose logits overflow: a diverged model is not a result
            raise TrainingStopped(f"{self._stage_name()}: the validation loss is {val} (the model diverged); "
                                  f"{self._kept()} and no model is written ({self._lower_hint()})")
        uniform = math.log(self.cfg.model.vocab_size)  # the loss of a uniform guess, about where training starts
        if self.stage == len(self.stage_steps) - 1 and val > uniform + self.DIVERGED_NATS:
            raise TrainingStopped(f"{self._stage_name()}: the final validation loss {val:.4g} nats is above "
                                  f"ln(vocab_size) = {uniform:.4g}, the loss of a uniform guess (the model diverged); "
                                  f"{self._kept()} and no model is written ({self._lower_hint()})")
        if self.stage == len(self.stage_steps) - 1 and val > uniform - self.LEARNED_NATS and self.main:
            skipped = (f"; {self.skipped} of its {sum(self.stage_steps)} steps were skipped as bad batches"
                       if self.skipped else "")
            print(f"steplm: warning: the final validation loss {val:.4g} nats is not {self.LEARNED_NATS} below "
                  f"ln(vocab_size) = {uniform:.4g}, the loss of a uniform guess: the model learned nothing "
                  f"(check {self.LR_KEY} and model.norm_eps, or train longer){skipped}", file=sys.stderr)
        self.record.update(steps=self.stage_steps[self.stage], tokens=self.tokens, flops=dict(self.flops), val_loss=val,
                           step_seconds=self.step_seconds - self.record.pop("_seconds_at_start"))
        self.stage_records.append(self.record)
        self.record = None
        log({"step": self.step, "stage": self.stage, "val_loss": round(val, 5), "tokens": self.tokens,
             "flops": self.flops[self.cfg.step.flops_convention]})

    def _finish(self, train_seconds: float) -> dict:
        self._unwrap()
        final = merged_state_dict(self.model)
        if not self.main:
            return {"weights_sha256": weights_sha256(final)}
        if not guards.all_finite(final.values()):  # never write a poisoned model as the result
            raise self._nonfinite("final save")
        tmp = self.out / "model.safetensors.tmp"
        save_file(final, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, self.out / "model.safetensors")
        final_cfg = replace(self.cfg.model, n_layers=len(self.model.model.layers))
        (self.out / "model_config.json").write_text(json.dumps(final_cfg.to_dict(), indent=2))
        val = self.stage_records[-1]["val_loss"]
        params = count_params(self.model)
        summary = {
            "method": self.method.name,
            "final_val_loss": val, "final_val_ppl": perplexity_of(val),
            "tokens_seen": self.tokens,
            "flops": self.flops[self.cfg.step.flops_convention],
            "flops_convention": self.cfg.step.flops_convention,
            "flops_by_convention": dict(self.flops),
            "train_seconds": train_seconds,
            "tokens_per_second": self.tokens / max(self.step_seconds, 1e-9),
            "data_wait_fraction": self.data_seconds / max(self.step_seconds, 1e-9),
            "weights_sha256": weights_sha256(final),
            "params": params,
            "layers_per_stage": self.layers_per_stage,
            "stage_steps": self.stage_steps,
            "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "stages": self.stage_records,
        }
        (self.out / "summary.json").write_text(guards.dumps(summary, indent=2))
        return summary


# ---------------------------------------------------------------------------- loading
def load_run(run_dir: str | Path, device="cpu", who: str = "MODEL") -> tuple[LLaMA, object]:
    """The final merged model and tokenizer of a run directory; a one-line UserError naming ``who``
    (the argument that gave the folder: MODEL, or RUN_DIR for export) when it cannot."""
    from steplm.io.files import one_line, read_model_config, read_safetensors, read_tokenizer, unfinished_run

    d = Path(run_dir)
    if unfinished_run(d, who):
        raise unfinished_run(d, who)
    if not (d / "model.safetensors").is_file() or not (d / "model_config.json").is_file():
        raise UserError(f"{who}: {d} is not a finished steplm run (no model.safetensors / model_config.json)")
    mcfg = read_model_config(d, who)
    tok = read_tokenizer(d / "tokenizer.json", who)
    state = read_safetensors(d / "model.safetensors", who, device)
    check_model_fits(mcfg, sum(t.numel() for t in state.values()), device, d / "model_config.json", "max_seq_len", who)
    try:
        model = from_state_dict(mcfg, state, device)
    except (KeyError, RuntimeError) as e:  # missing tensors or wrong shapes for model_config.json
        raise UserError(f"{who}: {d / 'model.safetensors'} does not match its model_config.json ({one_line(e)})")
    from steplm.io.hf import check_finite
    check_finite(model.state_dict(), f"{who}: {d}")
    return model, tok
