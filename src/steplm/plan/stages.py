"""The stage plan of a run: what every stage trains, for how long, and at what memory. Pure: no torch.

``plan_run(cfg)`` turns a ``RunConfig`` into a ``StagePlan`` by asking the config's method (see
``methods/``) for its stages. The trainer runs this plan, ``steplm plan CONFIG`` prints it, and the
replication benchmark reads it; nothing re-derives it. Bytes are model-state bytes (weights,
gradients, optimizer moments) as in the paper's Eq. 1-2; FLOPs are given under both conventions of
``flops.py``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from steplm.plan import flops as flops_mod
from steplm import methods
from steplm.methods.base import CONVENTIONS, flops_per_token, full_rank_counts, layer_shape, precision, tokens_per_step
from steplm.plan import memory

__all__ = ["Stage", "StagePlan", "plan_run", "schedule_warnings", "layer_shape", "format_plan"]


@dataclass
class Stage:
    """One stage of a run. Parameter counts exclude embeddings, head and final norm (Eq. 2's terms)."""
    index: int
    """0-based stage index."""
    kind: str
    """'full' (every layer trainable), 'grown' (old layers frozen, new ones trainable) or 'lora'."""
    layers: int
    """Depth of the model during this stage."""
    new_layers: int
    """Layers inserted at the start of this stage (n_i)."""
    trainable_params: int
    frozen_params: int
    lora_params: int
    lora_rank: int
    """Rank of the adapters on frozen linears (0: none)."""
    start_step: int
    """Global step at which this stage begins."""
    steps: int
    """Optimizer steps trained in this stage."""
    tokens: int
    """Tokens trained in this stage: steps · micro_batch · grad_accum · seq_len."""
    flops_per_token: dict[str, int]
    """Training FLOPs per token under the 'paper' and 'corrected' conventions."""
    flops: dict[str, int]
    """flops_per_token · tokens, per convention."""
    schedule_restarts: bool
    """Whether the LR schedule (warmup + cosine) restarts at this stage (STEP) or runs on (one cosine)."""
    schedule_start: int
    """Global step at which the LR schedule this stage follows began."""
    schedule_steps: int
    """Nominal length of that schedule (STEP's early stages are cut at step.growth_fraction of it)."""
    adapter_resets: bool
    """Whether ReLoRA merges and re-initialises the adapters every lora.relora_interval steps."""
    restart_ramp_from: int
    """Step of the stage from which the LR follows ReLoRA's restart ramp (with adapter_resets)."""
    planned_state_bytes: dict[str, int]
    """Model-state bytes: 'layers' (Eq. 2) and 'total' (+ embeddings, head, final norm at 16 B)."""

    def to_dict(self) -> dict:
        """The fields, with the stage numbered from 1 as ``stage`` (as metrics.jsonl, summary.json and
        the plan's table number it) in place of the 0-based ``index``."""
        d = asdict(self)
        return {"stage": d.pop("index") + 1, **d}


@dataclass
class StagePlan:
    """Every stage of a run, with vanilla at the same depth and budget for comparison."""
    method: str
    layers_per_stage: list[int]
    stages: list[Stage]
    flops_convention: str
    """The convention used for budget matching (step.flops_convention)."""
    vanilla: dict = field(default_factory=dict)
    """Vanilla at the final depth: layers, steps, tokens, flops, planned_state_bytes."""
    warnings: list[str] = field(default_factory=list)
    """Ways the LR schedule cannot do what its keys say (``schedule_warnings``), one line each."""

    @property
    def steps(self) -> list[int]:
        return [s.steps for s in self.stages]

    @property
    def total_steps(self) -> int:
        return sum(self.steps)

    def peak_state_bytes(self) -> dict[str, int]:
        """The largest stage's planned model-state bytes ('layers' and 'total')."""
        return {k: max(s.planned_state_bytes[k] for s in self.stages) for k in ("layers", "total")}

    def reduction(self) -> dict[str, float]:
        """1 - peak / vanilla, for 'layers' and 'total' model-state bytes."""
        peak = self.peak_state_bytes()
        return {k: 1 - peak[k] / self.vanilla["planned_state_bytes"][k] for k in peak}

    def totals(self) -> dict:
        """Steps, tokens and FLOPs (per convention) summed over the stages."""
        return {"steps": self.total_steps, "tokens": sum(s.tokens for s in self.stages),
                "flops": {c: sum(s.flops[c] for s in self.stages) for c in CONVENTIONS}}

    def to_dict(self) -> dict:
        return {"method": self.method, "layers_per_stage": self.layers_per_stage,
                "flops_convention": self.flops_convention, "stages": [s.to_dict() for s in self.stages],
                "totals": self.totals(), "peak_state_bytes": self.peak_state_bytes(), "vanilla": self.vanilla,
                "reduction": self.reduction(), "warnings": self.warnings}


def _vanilla(cfg) -> dict:
    counts, tokens = full_rank_counts(cfg), cfg.train.max_steps * tokens_per_step(cfg)
    layers = cfg.model.n_layers * memory.trainable_layer_bytes(layer_shape(cfg.model), precision(cfg))
    return {"layers": cfg.model.n_layers, "steps": cfg.train.max_steps, "tokens": tokens,
            "flops": {c: flops_per_token(cfg, counts, c) * tokens for c in CONVENTIONS},
            "planned_state_bytes": {"layers": layers, "total": layers + methods.get("vanilla").outer_state_bytes(cfg)}}


def plan_run(cfg) -> StagePlan:
    """The ``StagePlan`` of a validated ``RunConfig`` (its method's stages, steps and bytes)."""
    method = methods.get(cfg.method)
    layers_per_stage = method.layers_per_stage(cfg)
    counts = method.stage_counts(cfg, layers_per_stage)
    steps = method.stage_steps(cfg, counts)
    layer_bytes = method.layer_state_bytes(cfg, layers_per_stage, counts)
    total = sum(steps)
    nominal = flops_mod.nominal_lengths(steps, cfg.step.growth_fraction)
    rank, per_step, head = method.lora_rank(cfg), tokens_per_step(cfg), method.outer_state_bytes(cfg)
    stages, start = [], 0
    for i, (c, n, b) in enumerate(zip(counts, steps, layer_bytes)):
        kind = method.stage_kind(cfg, i, c)
        fpt = {conv: flops_per_token(cfg, c, conv) for conv in CONVENTIONS}
        stages.append(Stage(
            index=i, kind=kind, layers=c["layers"], new_layers=c["new_layers"], trainable_params=c["trainable"],
            frozen_params=c["frozen"], lora_params=c["lora"], lora_rank=rank if c["lora"] else 0,
            start_step=start, steps=n,
            tokens=n * per_step, flops_per_token=fpt, flops={conv: f * n * per_step for conv, f in fpt.items()},
            schedule_restarts=method.staged, schedule_start=start if method.staged else 0, schedule_steps=nominal[i] if method.staged else total,
            adapter_resets=bool(cfg.lora.relora_interval and c["lora"]),
            restart_ramp_from=method.restart_ramp_from(cfg, kind),
            planned_state_bytes={"layers": b, "total": b + head}))
        start += n
    return StagePlan(cfg.method, list(layers_per_stage), stages, cfg.step.flops_convention, _vanilla(cfg),
                     schedule_warnings(cfg, stages))


def schedule_warnings(cfg, stages: list[Stage]) -> list[str]:
    """One line for each way the LR schedule (``train/schedule.py``) cannot do what its keys say,
    each naming the key to change; the keys are kept as given, as torchtitan and nanoGPT keep theirs.
    A schedule (each STEP stage; the whole run under one cosine) of no more steps than
    train.warmup_steps stays in warmup to its end and never decays; ReLoRA resets no more than
    lora.relora_warmup steps apart leave the lr ramping from each reset to the next, never on its cosine."""
    W, out = cfg.train.warmup_steps, []
    if stages[0].schedule_restarts:
        short = [(f"stage {s.index + 1}", s.steps) for s in stages if s.steps <= W]
    else:
        total = sum(s.steps for s in stages)
        short = [("the run", total)] if total <= W else []
    if short:
        parts = " and ".join(f"{name} ({n} step{'s' * (n != 1)}, the last at {100 * n / W:.0f} % of train.lr)"
                             for name, n in short)
        out.append(f"train.warmup_steps ({W}) is not shorter than {parts}, whose lr stays in warmup to the end "
                   f"and never decays; lower train.warmup_steps")
    k, R = cfg.lora.relora_interval, cfg.lora.relora_warmup
    ramped = [s for s in stages if s.adapter_resets and R and s.steps > s.restart_ramp_from]
    if ramped and k <= R:
        names = " and ".join(f"stage {s.index + 1}" for s in ramped)
        out.append(f"lora.relora_interval ({k}) is not longer than lora.relora_warmup ({R}): in {names} the lr "
                   f"ramps from each reset to the next, reaching {100 * k / R:.0f} % of its cosine by then, and "
                   f"never runs on it; lower lora.relora_warmup")
    return out


def minimum_peak_bytes(cfg, plan: StagePlan, with_activations: bool = True) -> dict[str, int]:
    """A lower bound on one process's peak memory for this run (bytes), to refuse a run that cannot
    fit before anything is allocated. The largest over stages of the larger of two sets that are
    alive together: the stage's model states (planned_state_bytes 'total', Eq. 2 with embeddings and
    head) at the optimizer step, and what one micro-batch keeps for backward even under activation
    checkpointing and torch.compile (``memory.activation_bytes`` with checkpointing, at 2 bytes per
    value: every block's input, one block's graph, the head's and loss chunk's); plus the RoPE tables
    (2 · max_seq_len · head_dim fp32), which live throughout. Returns 'total' and its three parts,
    'states', 'activations' and 'rope', of the stage that sets it. ``with_activations`` False leaves
    the activations out (SFT: its sequences are shorter than train.seq_len)."""
    m, t = cfg.model, cfg.train
    shape = layer_shape(m)
    rope = memory.rope_table_bytes(m.max_seq_len, m.head_dim)
    best = None
    for s in plan.stages:
        states = s.planned_state_bytes["total"]
        acts = memory.activation_bytes(s.layers, m.d_model, m.n_heads, t.seq_len, t.micro_batch, m.vocab_size,
                                        True, ffn_hidden=shape.ffn_hidden, q_dim=shape.q_dim, kv_dim=shape.kv_dim,
                                        act_bytes=2) if with_activations else 0
        row = {"total": max(states, acts) + rope, "states": states, "activations": acts, "rope": rope}
        if best is None or row["total"] > best["total"]:
            best = row
    return best


def _fmt_bytes(b: float, unit: float) -> str:
    return f"{b / unit:.2f}"


def format_plan(plan: StagePlan, notes: list[str] = ()) -> str:
    """The plan as a text table: one row per stage, then vanilla's totals and the reduction, the
    ``notes`` (lines such as what the run's data are), and the plan's warnings last."""
    peak, van = plan.peak_state_bytes(), plan.vanilla["planned_state_bytes"]
    unit, name = (memory.GB, "GB") if van["total"] >= memory.GB else (2**20, "MiB")
    conv = plan.flops_convention
    head = (f"{'stage':>5} {'kind':>5} {'layers':>6} {'new':>4} {'trainable':>13} {'frozen':>13} {'adapter':>11} "
            f"{'steps':>7} {'tokens':>13} {'FLOPs (' + conv + ')':>18} {'layers ' + name:>10} {'total ' + name:>10}")
    lines = [f"method {plan.method}: layers per stage {plan.layers_per_stage}", head]
    for s in plan.stages:
        lines.append(f"{s.index + 1:>5} {s.kind:>5} {s.layers:>6} {s.new_layers:>4} {s.trainable_params:>13,} "
                     f"{s.frozen_params:>13,} {s.lora_params:>11,} {s.steps:>7,} {s.tokens:>13,} "
                     f"{s.flops[conv]:>18.3e} {_fmt_bytes(s.planned_state_bytes['layers'], unit):>10} "
                     f"{_fmt_bytes(s.planned_state_bytes['total'], unit):>10}")
    t, v = plan.totals(), plan.vanilla
    lines.append(f"{'all':>5} {'':>5} {plan.stages[-1].layers:>6} {'':>4} {'':>13} {'':>13} {'':>11} "
                 f"{t['steps']:>7,} {t['tokens']:>13,} {t['flops'][conv]:>18.3e} "
                 f"{_fmt_bytes(peak['layers'], unit):>10} {_fmt_bytes(peak['total'], unit):>10}  (peak)")
    lines.append(f"{'vanilla':>11} {v['layers']:>6} {'':>4} {'':>13} {'':>13} {'':>11} {v['steps']:>7,} "
                 f"{v['tokens']:>13,} {v['flops'][conv]:>18.3e} {_fmt_bytes(van['layers'], unit):>10} "
                 f"{_fmt_bytes(van['total'], unit):>10}")
    change = {k: -100 * r + 0.0 for k, r in plan.reduction().items()}  # + 0.0: no "-0.0"
    lines.append(f"peak model-state memory vs vanilla: layers {change['layers']:+.1f} %, "
                 f"total {change['total']:+.1f} %; FLOPs ({conv}) {t['flops'][conv] / v['flops'][conv]:.3f}x, "
                 f"tokens {t['tokens'] / v['tokens']:.3f}x vanilla's")
    lines += list(notes) + [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)
