"""The run state a checkpoint holds besides the weights: the counters (``TrainState``), the shape of
the model (which layers are frozen in bf16 with adapters of which rank), the RNG states and a
fingerprint of the data; and the model rebuilt from such a checkpoint."""
from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from steplm.model.llama import LLaMA, build_model
from steplm.passes.lora import LoRALinear, apply_lora


@dataclass
class TrainState:
    """Counters of a run: where it is (step, stage, step in the stage) and what it has spent."""
    step: int = 0
    """Optimizer steps done, over all stages."""
    stage: int = 0
    """0-based index of the current stage."""
    step_in_stage: int = 0
    tokens: int = 0
    """Training tokens seen (every rank's sequences)."""
    flops: dict = field(default_factory=lambda: {"paper": 0, "corrected": 0})
    """Training FLOPs so far under both counts (flops.py)."""
    skipped: int = 0
    """Bad batches skipped (non-finite loss or gradient norm)."""
    skipped_in_row: int = 0
    """Steps skipped since the last applied one."""
    elapsed_seconds: float = 0.0
    """Wall seconds the run had trained at the last checkpoint (metrics' elapsed_s goes on from it)."""
    data_seconds: float = 0.0
    step_seconds: float = 0.0
    stage_records: list = field(default_factory=list)
    """One record per finished stage: layers, parameters, planned and measured bytes, peak, val loss."""
    record: dict | None = None
    """The current stage's record, filled after its first optimizer step."""
    metrics_bytes: int = 0
    """Length of metrics.jsonl at the last checkpoint."""

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            if k in self.__dataclass_fields__:
                setattr(self, k, dict(v) if k == "flops" else v)


def layer_layout(model: LLaMA) -> list[dict]:
    """The model's current shape: per layer whether it is frozen, its adapter rank, frozen norms."""
    out = []
    for block in model.model.layers:
        lins = [m for m in block.modules() if isinstance(m, LoRALinear)]
        out.append({"frozen": bool(lins), "rank": lins[0].rank if lins else 0,
                    "norms_frozen": not block.input_layernorm.weight.requires_grad})
    return out


def plain_model(cfg, layout: list[dict], weights: dict[str, torch.Tensor], device) -> LLaMA:
    """An unwrapped model of the given shape (frozen bf16 layers with adapters) holding ``weights``
    (``cfg``: the RunConfig)."""
    model = build_model(replace(cfg.model, n_layers=len(layout)), seed=cfg.train.seed, device=device)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    for block, desc in zip(model.model.layers, layout):
        if desc["frozen"]:
            apply_lora(block, desc["rank"], cfg.lora.alpha, freeze_norms=desc["norms_frozen"])
    if cfg.model.tie_embeddings:
        weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])
    model.load_state_dict(weights, strict=True)
    return model


def rng_state(gen: torch.Generator) -> dict:
    """Python's, numpy's, torch's (and CUDA's) global RNG states and the run's own generator."""
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "gen": gen.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng: dict, gen: torch.Generator) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    gen.set_state(rng["gen"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def data_fingerprint(train_tokens, val_tokens) -> dict:
    """What identifies the tokenized data a run trains on: both splits' token counts and a hash of
    their first 64K tokens (content, not file times: a copied corpus still resumes)."""
    train, val = np.asarray(train_tokens), np.asarray(val_tokens)
    h = hashlib.sha256(np.ascontiguousarray(train[:65536]).tobytes() + np.ascontiguousarray(val[:65536]).tobytes())
    return {"train_tokens": int(len(train)), "val_tokens": int(len(val)), "sha256_head": h.hexdigest()}


def run_state_dict(run, model, optimizer) -> dict:
    """Everything of a run (``run``: the Trainer) but the weights: counters, the model's shape,
    optimizer, data position, RNGs, the plan's split and steps, and the data's fingerprint."""
    return {**run.state.state_dict(), "layers": layer_layout(model), "optimizer": optimizer.state_dict(),
            "sampler": run.sampler.state_dict(), "rng": rng_state(run.gen), "stage_steps": run.stage_steps,
            "layers_per_stage": run.layers_per_stage, "data": run.task.data_fingerprint(run),
            "stages_from": 1}


def renumber_stages(state: dict, metrics: Path | None) -> None:
    """A checkpoint written before ``stages_from`` was recorded numbers stages from 0 in its stage
    records and metrics rows: renumber the records (in ``state``) and, with ``metrics``
    (metrics.jsonl, None on ranks that do not write it), the rows up to the checkpoint's length from
    1, as steplm numbers them now; ``state["metrics_bytes"]`` follows the rewritten file. Rows past
    that length are cut on resume anyway."""
    import json
    import os

    from steplm.io.files import dumps

    for record in [*state.get("stage_records", []), state.get("record") or {}]:
        if "stage" in record:
            record["stage"] += 1
    if metrics is None or not metrics.is_file():
        return
    rows = []
    for line in metrics.read_bytes()[:state.get("metrics_bytes", 0)].decode().splitlines():
        row = json.loads(line)
        if "stage" in row:
            row["stage"] += 1
        rows.append(dumps(row) + "\n")
    text = "".join(rows).encode()
    tmp = metrics.with_name(metrics.name + ".tmp")
    tmp.write_bytes(text)
    os.replace(tmp, metrics)
    state["metrics_bytes"] = len(text)
    state["stages_from"] = 1


def restore(run, state: dict, weights: dict[str, torch.Tensor]) -> None:
    """Rebuild ``run``'s model in the checkpoint's shape (grown layers, frozen bf16 bases, adapters),
    then load the weights, counters, optimizer, data position and RNGs; refuses other data. The
    caller wraps the new model again (``passes.parallelize``)."""
    from steplm.errors import UserError

    saved, now = state.get("data"), run.task.data_fingerprint(run)
    if saved is not None and now is not None and saved != now:  # its data position would mean other text
        key = "data.path or data.val_path" if run.cfg.data.val_path else "data.path"
        raise UserError(f"the data differ from those the checkpoint was trained on ({saved['train_tokens']:,} "
                        f"training and {saved['val_tokens']:,} validation tokens then, {now['train_tokens']:,} and "
                        f"{now['val_tokens']:,} now, or other text); resume with the same data, or start a new --out",
                        key=key)
    if state.get("stages_from") != 1:
        renumber_stages(state, run.out / "metrics.jsonl" if run.main else None)
    run.model = plain_model(run.cfg, state["layers"], weights, run.device)
    run.state.load_state_dict(state)
    run.optimizer = run.build_optimizer()
    run.optimizer.load_state_dict(state["optimizer"])
    run.sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"], run.gen)
