"""The Trainer: one owner of a run's state, and the loop of a run read top to bottom.

A run is a plan (``plan.stages.plan_run``: the stages, their steps and bytes) that the loop carries
out. What a run varies comes in as builders: the method (``methods/``: its passes at each stage
boundary, its optimizer, its post-step hook such as ReLoRA's reset) and the task (``train/task.py``:
pre-training or SFT data, loss and evaluation). Everything else lives beside it: the run state
(``state.py``), checkpoints (``checkpoint.py``), metrics (``metrics.py``), guards (``guards.py``),
the schedule (``schedule.py``), the optimizer (``optimizer.py``) and parallel wrapping
(``passes/parallelize.py``).

Order of passes at every growth (STEP): grow -> freeze old layers + LoRA -> (re)wrap and compile ->
build a new optimizer over the trainable parameters only -> rewarm the LR to the stage-1 peak.
"""
from __future__ import annotations

import math
import random
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from steplm import config as config_mod
from steplm import methods
from steplm.devices import autocast, pick_device, pick_dtype
from steplm.errors import Interrupted, Preempted, TrainingStopped
from steplm.passes import parallelize
from steplm.plan.stages import Stage, plan_run
from steplm.train import checkpoint, distributed, faults, guards, saving
from steplm.train.console import Console, eval_line, growth_line
from steplm.train import metrics
from steplm.train.metrics import require_tensorboard
from steplm.train.optimizer import build_optimizer, clip_in_step
from steplm.train.schedule import lr_at
from steplm.train.state import TrainState, restore, run_state_dict
from steplm.train.task import PretrainTask


class Trainer:
    """Owns model, optimizer, schedule, data position, step, stage and RNG state of one run."""

    def __init__(self, cfg: config_mod.RunConfig, out_dir: str | Path, progress: bool = True, task=None):
        config_mod.validate(cfg)
        self.cfg, self.out, self.task = cfg, Path(out_dir), task or PretrainTask()
        self.device = pick_device(cfg.train.device)
        self.dtype = pick_dtype(cfg.train.dtype, self.device)
        self.rank, self.world = distributed.init(self.device)
        self.main = self.rank == 0  # only rank 0 logs and writes
        self.fsdp = self.world > 1 and cfg.train.parallel == "fsdp2"
        self.progress = progress and self.main
        self.lock = self.preemption = self.metrics = None  # the folder's lock; while fit runs: signals, metrics
        self.hooks = {"micro_batch_end": [], "step_loss": [], "step_end": [], "checkpoint_end": []}
        if self.main:
            guards.check_run_dir(self.out)  # before the task reads anything: a clobbered --out is said first
        self.task.configure(self)
        self.plan = plan_run(cfg)
        if self.main:
            for line in self.plan.warnings:  # the warmup is the user's: said, not changed
                print(f"steplm: warning: {line}", file=sys.stderr)
        self.method = methods.get(self.plan.method)
        self.layers_per_stage, self.stage_steps = self.plan.layers_per_stage, self.plan.steps
        if not self.fsdp:  # FSDP2 shards the states over the ranks
            guards.check_fits(self)
        if self.device.type == "cpu":  # before the model and its states are allocated
            self.host_allocator = guards.pick_host_allocator(self)
        if self.main:
            if cfg.train.tensorboard:
                require_tensorboard()
            self.lock = guards.take_run_dir(self.out, self.progress)
        self.task.setup_data(self)

        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        self.gen = torch.Generator().manual_seed(cfg.train.seed + 1)  # adapters, growth
        self.model = self.task.build_model(self, replace(cfg.model, n_layers=self.plan.stages[0].layers))
        self.model.activation_checkpointing = cfg.train.activation_checkpointing
        self.sampler = self.task.build_sampler(self)
        self.state = TrainState()
        self.resumed_from: Path | None = None
        self.saved_step = None  # step of the checkpoint this process wrote last
        self.merge_rows: list[dict] = []  # metrics rows of adapter merges, logged by the loop
        self.grad_norm = math.nan  # of the last step (train_step)
        self.console = Console("quiet", 0, 0)  # fit's: the bar or the log lines
        self.warned_merge = False
        self.method.enter_stage(self, self.current_stage)
        self.optimizer = self.build_optimizer()
        parallelize.parallelize(self)
        faults.install(self)
        saving.resume_or_start(self)

    # -- where the run is ------------------------------------------------------------------------
    def _counter(name):  # noqa: N805 - a property of TrainState's counter, on the trainer for short
        return property(lambda self: getattr(self.state, name), lambda self, v: setattr(self.state, name, v))

    step, stage, step_in_stage, tokens = _counter("step"), _counter("stage"), _counter("step_in_stage"), _counter("tokens")
    del _counter

    @property
    def current_stage(self) -> Stage:
        return self.plan.stages[self.state.stage]

    def lr_at(self, step_in_stage: int) -> float:
        """The lr at ``step_in_stage`` of the current stage (``schedule.lr_at``)."""
        return lr_at(self.cfg, self.current_stage, step_in_stage, self.step)

    def stage_name(self) -> str:
        """'stage 2 of 3': 1-based, as `steplm plan`, metrics.jsonl and summary.json number stages
        (``state.stage`` is the 0-based index into the plan)."""
        return f"stage {self.stage + 1} of {len(self.stage_steps)}"

    # -- stage transitions -----------------------------------------------------------------------
    def build_optimizer(self, previous: torch.optim.Optimizer | None = None, model=None) -> torch.optim.Optimizer:
        """The method's optimizer over the trainable parameters (``optimizer.build_optimizer``); fused
        AdamW does not take FSDP2's DTensor shards."""
        model = model or self.model
        sharded = self.fsdp and isinstance(model, parallelize.fsdp_module_type())
        return build_optimizer(self.cfg, self.method, model, previous, fused=self.cfg.train.fused_optimizer and not sharded)

    def next_stage(self):
        """Move to the next stage: the method's pass over the model (grow and freeze, or switch to
        LoRA), then a new optimizer over the trainable parameters and a new compiled step."""
        parallelize.unwrap(self)
        self.state.stage += 1
        self.state.step_in_stage = 0
        self.method.enter_stage(self, self.current_stage)
        old = self.optimizer
        self.optimizer = self.build_optimizer(previous=old)
        del old
        parallelize.parallelize(self)

    # -- one optimizer step ----------------------------------------------------------------------
    def loss(self, x, y):
        """Mean next-token loss of one micro-batch (x, y: (B, T) token ids), in nats."""
        with autocast(self.device, self.dtype):
            if self.cfg.train.fused_loss:  # head + cross-entropy chunk by chunk (loss.py)
                return self.wrapped(x, targets=y)
            logits = self.wrapped(x)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

    def train_step(self) -> tuple[float, bool]:
        """One optimizer step (with gradient accumulation): (the mean micro-batch loss in nats, whether
        the step was applied; a non-finite loss or gradient norm skips it). Leaves the step's pre-clip
        total gradient norm in ``self.grad_norm``."""
        t = self.cfg.train
        self.model.train()
        lr = self.lr_at(self.step_in_stage)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        start = self.sampler.state_dict()  # a step abandoned on preemption is redone from here
        try:
            total = self.task.forward_backward(self)
        except guards.StepAbandoned:
            self.sampler.load_state_dict(start)
            self.optimizer.zero_grad(set_to_none=True)
            raise
        params = [p for p in self.model.parameters() if p.requires_grad]
        scale = None
        if clip_in_step(self.cfg, self.optimizer, self.fsdp):
            # torch's fused AdamW divides each gradient by grad_scale inside its kernel (and stores it
            # back so): clipping there saves clip_grad_norm_'s separate pass over every gradient
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            scale = torch.clamp((norm + 1e-6) / t.grad_clip, min=1.0)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip or float("inf"))
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        total, norm = torch.stack([total.float(), norm.float()]).tolist()  # one synchronisation per step
        self.grad_norm = norm  # the pre-clip total norm (clip_grad_norm_ computes it even with no clipping)
        for hook in self.hooks["step_loss"]:
            total = hook(self, total)
        if guards.bad_batch(self, total, norm):
            return total, False
        self.optimizer.grad_scale = scale  # None: no scale; read by this step only (GradScaler's protocol)
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.grad_scale
        return total, True

    def micro_batch_done(self):
        """Between micro-batches: the hooks (the CPU peak tracker's, injected faults), then a
        preemption check. In one process a SIGTERM/SIGUSR1 abandons the step here (StepAbandoned):
        a step of many micro-batches can outlast a scheduler's grace period. With several ranks the
        check stays between optimizer steps, where one collective per step asks every rank."""
        for hook in self.hooks["micro_batch_end"]:
            hook(self)
        if self.world == 1 and self.preemption is not None and self.preemption.signum is not None:
            raise guards.StepAbandoned

    def account(self):
        """Count the optimizer step just taken: tokens, FLOPs, step; then the method's post-step hook."""
        s, tokens = self.state, self.task.step_tokens(self)
        s.tokens += tokens
        for conv in s.flops:
            s.flops[conv] += self.current_stage.flops_per_token[conv] * tokens
        s.step += 1
        s.step_in_stage += 1
        self.method.after_optimizer_step(self)

    def evaluate(self, max_tokens: int | None = None) -> float:
        """The task's validation loss (nats)."""
        return self.task.evaluate(self, max_tokens)

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train every stage (resuming where a checkpoint left off); write metrics.jsonl, checkpoints,
        the final weights and summary.json. Returns the summary. On SIGTERM, SIGUSR1 or SIGINT it
        stops at the next micro-batch (one process: the unfinished step is dropped and redone on
        resume) or after the current optimizer step (several ranks), writes a checkpoint of the last
        whole step and raises Preempted (Interrupted for SIGINT); it raises TrainingStopped rather than
        write non-finite weights, or train on when most steps are skipped."""
        try:
            with guards.Preemption(notify=self.progress) as self.preemption:
                return self._fit()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _fit(self) -> dict:
        s = self.state
        self.metrics = saving.open_run_files(self) if self.main else None
        if self.progress and getattr(self, "data_line", None):  # the task's line on what the run reads (not --quiet)
            print(f"steplm: {self.data_line}", file=sys.stderr)
        total_steps = sum(self.stage_steps)
        self.checkpoint_every = saving.checkpoint_interval(self.cfg.train.checkpoint_every, total_steps)
        self.console = Console(Console.pick(self.progress), total_steps, s.step)
        self.wall_origin = time.perf_counter() - s.elapsed_seconds  # elapsed_s goes on across resumes
        t_start = time.perf_counter()
        self.window = (0, time.perf_counter())  # tokens since the last metrics row, and when it was
        try:
            while s.step < total_steps:
                self._one_step(total_steps)
        finally:
            self.console.close()
        if self.metrics is not None:
            self.metrics.close()
        return self._finish(s.step_seconds if self.resumed_from else time.perf_counter() - t_start)

    def _one_step(self, total_steps: int) -> None:
        """One optimizer step of the loop and what follows it: growth before it when the stage is
        done; the metrics row, evaluation, end of stage and checkpoint after it; then the preemption
        check."""
        s, t = self.state, self.cfg.train
        if s.step_in_stage == self.stage_steps[s.stage]:  # the stage is done: grow / switch
            self._enter_next_stage()
        t0 = time.perf_counter()
        loss, ok = metrics.measured_step(self)
        self.optimizer.zero_grad(set_to_none=True)
        self.account()
        self._log_merges()
        s.step_seconds += time.perf_counter() - t0
        self.window = (self.window[0] + self.task.step_tokens(self), self.window[1])
        if self.world > 1:
            loss = distributed.mean(loss)
        if s.step % t.log_every == 0 or s.step == total_steps or not ok:
            self._log_step(loss)
            guards.check_weights_finite(self)  # after the row, so metrics.jsonl shows what happened
        if not ok:
            guards.check_training(self, loss, self.grad_norm)  # so do these: mostly skipped steps stop the run
        if s.step_in_stage == self.stage_steps[s.stage]:
            self._finish_stage()
        elif t.eval_every and s.step % t.eval_every == 0:
            self._log_eval(self.evaluate())
        if self.checkpoint_every and (s.step % self.checkpoint_every == 0 or s.step == total_steps):
            path = self.save_checkpoint()
            for hook in self.hooks["checkpoint_end"]:
                hook(self)
            distributed.barrier()
            if path is not None:
                self.console.say(f"step {s.step}/{total_steps} | checkpoint {path}")
        self.console.advance()
        for hook in self.hooks["step_end"]:
            hook(self)
        if self.preemption.requested(self.world):
            self._stop_for_preemption()

    def _enter_next_stage(self) -> None:
        """Grow / switch to the next stage (``next_stage``), and say so."""
        before = self.current_stage
        self.next_stage()
        self._log_merges()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.console.say(f"step {self.step}/{self.console.total} | "
                         f"{growth_line(before, self.current_stage, self.stage_name())}")

    def log(self, row: dict) -> None:
        """One metrics row (rank 0 writes)."""
        if self.metrics is not None:
            self.metrics.write(row)

    def _log_step(self, loss: float) -> None:
        """The metrics row of the step just taken, and its line on the console."""
        tokens, since = self.window
        self.window = (0, time.perf_counter())
        row = metrics.step_row(self, loss, tokens, self.window[1] - since)
        self.log(row)
        self.console.row(row, self.stage_name())

    def _log_eval(self, val: float) -> None:
        """The metrics row and console line of an evaluation loss (nats) at this step."""
        self.log(metrics.eval_row(self, val))
        split = self.task.eval_key.split("_")[0]  # val; SFT's train
        self.console.say(eval_line(self.step, self.console.total, self.stage_name(), val, split))

    def _log_merges(self):
        while self.merge_rows:
            self.log(self.merge_rows.pop(0))

    def _stop_for_preemption(self):
        """Checkpoint the step just finished (unless that was already done) and raise Preempted
        (Interrupted on SIGINT)."""
        if self.saved_step != self.step:
            self.save_checkpoint()
            distributed.barrier()
        stop = Interrupted if self.preemption.signum == signal.SIGINT else Preempted
        raise stop(f"{self.preemption.name} after step {self.step}: checkpoint "
                   f"{checkpoint.step_dir(self.out / 'checkpoints', self.step)} written")

    def _finish_stage(self):
        """End-of-stage evaluation (the guards judge it) and the stage's memory record."""
        s = self.state
        if s.record is None:
            raise TrainingStopped(f"{self.stage_name()} ended without a successful optimizer step: every step's loss "
                                  f"or gradient norm was not finite, or above train.max_grad_norm; "
                                  f"{guards.lower_hint(self)}")
        if self.device.type == "cuda":
            s.record["peak_bytes"] = torch.cuda.max_memory_allocated()
        val = self.evaluate()
        guards.check_stage_loss(self, val)
        s.record.update(steps=self.stage_steps[s.stage], tokens=s.tokens, flops=dict(s.flops),
                        **{self.task.eval_key: val},
                        step_seconds=s.step_seconds - s.record.pop("_seconds_at_start"))
        s.stage_records.append(s.record)
        s.record = None
        self._log_eval(val)

    def _finish(self, train_seconds: float) -> dict:
        parallelize.unwrap(self)
        summary = saving.write_final_model(self, train_seconds)
        return self.task.finish(self, summary) if self.main else summary

    # -- run state and checkpoints ---------------------------------------------------------------
    def state_dict(self, model=None, optimizer=None) -> dict:
        """Everything but the weights (``state.run_state_dict``)."""
        return run_state_dict(self, model or self.model, optimizer or self.optimizer)

    def load_state_dict(self, state: dict, weights: dict[str, torch.Tensor]):
        """Rebuild the model's shape and load everything (``state.restore``)."""
        restore(self, state, weights)
        parallelize.parallelize(self)

    def save_checkpoint(self) -> Path | None:
        """The run's checkpoint at this step (``checkpoint.save_run``)."""
        return saving.save_run(self)

    def load_checkpoint(self, path: Path):
        """Resume from a checkpoint folder (``checkpoint.load_run``)."""
        saving.load_run(self, path)
        self.resumed_from = path
        if self.progress:
            print(f"steplm: resuming from {path} (step {self.step}, {self.stage_name()})", file=sys.stderr)
