"""What a run writes to resume and to finish, from the Trainer's state: its checkpoints (through
``checkpoint.py``'s atomic folders), the check that a resume uses the same config, and the final
merged model with model_config.json and summary.json."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from steplm.errors import UserError
from steplm.train import checkpoint, metrics


AUTO_CHECKPOINTS = 10
"""train.checkpoint_every null: this many checkpoints over the run (about every tenth of it)..."""
AUTO_CHECKPOINT_MAX_STEPS = 1000
"""...and never more than this many steps apart (litgpt's save_interval; torchtitan's is 500)."""


def checkpoint_interval(every: int | None, total_steps: int) -> int:
    """Steps between periodic checkpoints (0: none): train.checkpoint_every, or with null (auto)
    ceil(total_steps / AUTO_CHECKPOINTS), at most AUTO_CHECKPOINT_MAX_STEPS. A run of 64 steps
    checkpoints every 7, one of 33,000 every 1000. The run's last step is checkpointed too."""
    if every is not None:
        return every
    return max(1, min(-(-total_steps // AUTO_CHECKPOINTS), AUTO_CHECKPOINT_MAX_STEPS))


def open_run_files(run):
    """Write the run folder's config.yaml and tokenizer.json, and open its metrics log
    (``metrics.MetricsLog``, cut back to the checkpoint's length on resume)."""
    from steplm import config

    config.save(run.cfg, run.out / "config.yaml")
    run.tokenizer.save(str(run.out / "tokenizer.json"))
    resume = run.state.metrics_bytes if run.resumed_from is not None else None
    return metrics.MetricsLog(run.out, resume, run.cfg.train.tensorboard)


def resume_or_start(run) -> None:
    """Load the run folder's newest intact checkpoint, if any, after checking that the folder holds
    this run (``check_resume_config``); a folder whose run ended before its first checkpoint starts
    again from step 0, with a warning."""
    latest = checkpoint.latest_valid(run.out / "checkpoints")
    check_resume_config(run)  # the folder's run, with or without a checkpoint: not another's
    if latest is not None:
        run.load_checkpoint(latest)
    elif run.main and (run.out / "metrics.jsonl").is_file():
        print(f"steplm: warning: {run.out} holds a run that ended before its first checkpoint; it starts "
              f"again from step 0 (and its metrics.jsonl afresh)", file=sys.stderr)


def save_run(run) -> Path | None:
    """Atomic checkpoint of a run (``run``: the Trainer) at its current step: the weights
    (model.safetensors), everything else (trainer.pt: ``run.state_dict()``) and the config, in the
    single-process format (every rank takes part under FSDP2; rank 0 writes). Refuses to save a
    non-finite model."""
    import torch
    from safetensors.torch import save_file

    from steplm import config as config_mod
    from steplm.passes import parallelize
    from steplm.train import guards

    run.saved_step = run.step
    model, optimizer = parallelize.gather_plain(run) if run.fsdp else (run.model, run.optimizer)
    if not run.main:
        return None
    if run.metrics is not None:
        run.state.metrics_bytes = run.metrics.tell()
    run.state.elapsed_seconds = metrics.elapsed_seconds(run)
    if not guards.all_finite(model.parameters()):
        raise guards.nonfinite(run, "checkpoint")
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if run.cfg.model.tie_embeddings:
        weights.pop("lm_head.weight", None)
    state = run.state_dict(model, optimizer)
    return checkpoint.save(run.out / "checkpoints", run.step, {
        "model.safetensors": lambda p: save_file(weights, str(p)),
        "trainer.pt": lambda p: torch.save(state, p),
        "config.yaml": lambda p: config_mod.save(run.cfg, p),
        "tokenizer.json": lambda p: run.tokenizer.save(str(p)),  # a checkpoint copied out is still a model
    }, keep=run.cfg.train.keep_checkpoints)


def load_run(run, path: Path) -> None:
    """Load a checkpoint folder written by ``save_run`` into ``run`` (``run.load_state_dict``)."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(path / "model.safetensors"), device=str(run.device))
    state = torch.load(path / "trainer.pt", map_location=run.device, weights_only=False)
    run.load_state_dict(state, weights)


def check_resume_config(run) -> None:
    """Refuse to resume a run folder whose config.yaml differs from ``run.cfg`` in a key that changes
    the trajectory (config.RESUME_SAFE_KEYS may differ, and so may the keys the run does not read,
    ``config.unread_keys``)."""
    from steplm import config as config_mod

    saved = run.out / "config.yaml"
    if not saved.is_file():
        return
    ignored = config_mod.RESUME_SAFE_KEYS | config_mod.unread_keys(run.cfg)
    diff = [k for k in config_mod.differing_keys(config_mod.load_saved(saved), run.cfg) if k not in ignored]
    if diff:
        raise UserError(f"--out: {run.out} holds a run with a different config ({', '.join(diff)}); "
                        f"use the same config to resume, or another --out")


def write_final_model(run, train_seconds: float) -> dict:
    """The end of a run (``run``: the Trainer): the merged final weights (model.safetensors, written
    atomically, never non-finite), model_config.json and summary.json. Returns the summary (on ranks
    other than 0: the weights' hash only)."""
    from steplm.eval.loss import perplexity_of
    from steplm.model.llama import count_params
    from steplm.passes.lora import merged_state_dict
    from dataclasses import replace

    from safetensors.torch import save_file

    from steplm.io.files import dumps
    from steplm.train import guards
    from steplm.train.metrics import weights_sha256

    final = merged_state_dict(run.model)
    if not run.main:
        return {"weights_sha256": weights_sha256(final)}
    if not guards.all_finite(final.values()):  # never write a poisoned model as the result
        raise guards.nonfinite(run, "final save")
    tmp = run.out / "model.safetensors.tmp"
    save_file(final, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, run.out / "model.safetensors")
    final_cfg = replace(run.cfg.model, n_layers=len(run.model.model.layers))
    (run.out / "model_config.json").write_text(json.dumps(final_cfg.to_dict(), indent=2))
    s, conv = run.state, run.cfg.step.flops_convention
    key = run.task.eval_key  # val_loss; an SFT run's is train_loss (it holds no examples out)
    val = s.stage_records[-1][key]
    summary = {
        "method": run.method.name,
        f"final_{key}": val, f"final_{key.replace('loss', 'ppl')}": perplexity_of(val),
        "tokens_seen": s.tokens,
        "flops": s.flops[conv],
        "flops_convention": conv,
        "flops_by_convention": dict(s.flops),
        "train_seconds": train_seconds,
        "tokens_per_second": s.tokens / max(s.step_seconds, 1e-9),
        "data_wait_fraction": s.data_seconds / max(s.step_seconds, 1e-9),
        "weights_sha256": weights_sha256(final),
        "params": count_params(run.model),
        "layers_per_stage": run.layers_per_stage,
        "stage_steps": run.stage_steps,
        "device": str(run.device), "dtype": str(run.dtype).replace("torch.", ""),
        "stages": s.stage_records,
        **run.task.summary_extra(run),
    }
    (run.out / "summary.json").write_text(dumps(summary, indent=2))
    return summary
