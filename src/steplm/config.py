"""Run configuration: one small dataclass per concern, YAML round-trip, `--set` overrides, validation.

Every field carries a docstring (the string literal under it); ``field_docs`` reads them for the
CLI help, so the config stays the single source of truth.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .model import ModelConfig

from .methods import REGISTRY as _METHODS

METHODS = tuple(_METHODS)
POSITIONS = ("upper", "intermediate", "lower", "random")
INITS = ("mean", "copy")


@dataclass
class DataConfig:
    path: str | None = None
    """Training text: a .txt/.jsonl/.jsonl.gz/.parquet file, a directory of them (or of .py files), or a HF dataset name."""
    val_path: str | None = None
    """Held-out text; if unset, whole documents of `path` are held out (val_fraction)."""
    val_fraction: float = 0.05
    """Share of documents held out for validation when val_path is unset."""
    tokenizer: str = "gpt2"
    """'gpt2' (local dir in $STEPLM_GPT2_DIR or the hub), a tokenizer directory, or 'bpe:N' trained on the corpus."""
    text_field: str = "text"
    """Field holding the text in .jsonl/.parquet records."""
    exclude: list[str] = field(default_factory=lambda: ["test", "tests", "idle_test"])
    """Directory names skipped when `path` is a directory."""
    cache_dir: str | None = None
    """Where token shards are cached; default <out>/../.cache/steplm or ~/.cache/steplm."""
    max_train_tokens: int | None = None
    """Stop tokenizing the training corpus after about this many tokens (None: all)."""


@dataclass
class TrainConfig:
    max_steps: int = 200
    """Optimizer steps of the vanilla run; STEP gets the same FLOPs (or steps, see step.budget_match)."""
    micro_batch: int = 8
    """Sequences per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    seq_len: int = 128
    """Tokens per training sequence (at most model.max_seq_len)."""
    lr: float = 3e-3
    """Peak learning rate (stage 1; STEP rewarms every stage to it)."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of lr."""
    warmup_steps: int = 20
    """Linear warmup steps (the paper uses 1000 at full scale)."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms or adapters' biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    dtype: str = "auto"
    """Compute precision: 'auto' (bf16 autocast where supported), 'bf16' or 'fp32'."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda'."""
    seed: int = 0
    """Seed for init, data order and adapters."""
    eval_every: int = 50
    """Evaluate validation loss every this many steps (0: only at the end)."""
    eval_tokens: int = 32768
    """Validation tokens per evaluation."""
    checkpoint_every: int = 0
    """Save a checkpoint every this many steps (0: only at the end)."""
    log_every: int = 10
    """Write a metrics row every this many steps."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass."""
    fused_optimizer: bool = True
    """Use the fused AdamW kernel (FSDP2's sharded parameters always use the foreach kernel)."""
    parallel: str = "ddp"
    """Under torchrun with several processes: 'ddp' (DistributedDataParallel) or 'fsdp2' (fully_shard)."""
    tensorboard: bool = False
    """Also write TensorBoard event files to <out>/tensorboard (needs the tensorboard package)."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep."""
    on_nonfinite: str = "skip"
    """A NaN/inf loss or gradient norm (or one above max_grad_norm): 'skip' the batch, or 'stop' keeping the last good checkpoint."""
    max_grad_norm: float = 0.0
    """Treat a batch whose gradient norm exceeds this as bad (0: only NaN/inf)."""
    max_skipped: int = 100
    """Stop when more than this many batches have been skipped."""


@dataclass
class LoraConfig:
    rank: int = 8
    """LoRA rank r on frozen layers (paper: 128 at d 1536-2048)."""
    alpha: float = 16.0
    """LoRA scaling numerator; the update is B·A·alpha/rank."""
    relora_interval: int = 0
    """Merge adapters into the base and re-initialise them every this many steps (0: never)."""
    relora_warmup: int = 10
    """Steps of LR re-warmup after each ReLoRA merge (jagged cosine)."""
    reset_prune: float | None = None
    """At a ReLoRA reset, zero the adapters' Adam moments (None) or prune this fraction by magnitude."""
    warm_start_fraction: float = 0.25
    """method relora: share of train.max_steps trained full-rank before switching to LoRA."""


@dataclass
class GaloreConfig:
    rank: int = 16
    """Projection rank for the attention and MLP weights (paper: 128 at d 1536-2048)."""
    update_proj_gap: int = 200
    """Recompute the projection (an SVD of the gradient) every this many steps."""
    scale: float = 0.25
    """GaLore's scale on the projected-back update."""
    proj_type: str = "std"
    """galore-torch projection type: std, left, right or full."""


@dataclass
class StepConfig:
    n_stages: int = 1
    """K, the number of stages (methods other than step and step-no-pet ignore the step section)."""
    layers_per_stage: list[int] | None = None
    """n_1..n_K, layers added per stage (must sum to model.n_layers); None: choose with the Eq. 3 planner."""
    growth_fraction: float = 0.75
    """Grow after this fraction of a stage's nominal steps (paper: 0.75)."""
    init: str = "mean"
    """New-layer init: 'mean' (interpolation-mean) or 'copy' (interpolation-copy)."""
    fpi: bool = False
    """Zero o_proj and down_proj of new layers so growth preserves the function."""
    position: str = "upper"
    """Where new layers go: upper, intermediate, lower or random."""
    budget_match: str = "flops"
    """'flops': stages get vanilla's FLOPs for train.max_steps; 'steps': train.max_steps split across stages."""
    flops_convention: str = "paper"
    """FLOPs count used for budget matching: 'paper' (frozen 2N) or 'corrected' (frozen 4N, head, attention)."""
    cap_growth: bool = False
    """Planner constraint n_(i+1) <= N_i (one new layer per existing layer)."""


@dataclass
class RunConfig:
    method: str = "vanilla"
    """vanilla, step, step-no-pet, relora or galore (registered in steplm.methods)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    galore: GaloreConfig = field(default_factory=GaloreConfig)
    step: StepConfig = field(default_factory=StepConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


STRING_KEYS = {"data.path", "data.val_path", "data.cache_dir", "data.tokenizer", "data.text_field"}
SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "lora": LoraConfig,
            "galore": GaloreConfig, "step": StepConfig}


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass, by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(getattr(b, "value", None), ast.Constant):
            docs[a.target.id] = str(b.value.value)
    return docs


def _coerce(value: Any, default: Any, key: str) -> Any:
    """Turn a YAML/CLI value into the type of the field's default where that is unambiguous."""
    if isinstance(value, str) and not isinstance(default, str) and key not in STRING_KEYS:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"{key}: cannot parse value {value!r}")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(f"{key}: must be true or false, got {value!r}")
    elif isinstance(default, float) and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads "1e-3" as a string
        except ValueError:
            raise UserError(f"{key}: must be a number, got {value!r}")
    elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


def from_dict(d: dict) -> RunConfig:
    """Build a RunConfig from nested dicts; unknown keys are errors naming the key."""
    if not isinstance(d, dict):
        raise UserError("config: top level must be a mapping of sections (model, data, train, lora, galore, step)")
    cfg = RunConfig()
    unknown = []
    for key, value in d.items():
        if key == "method":
            cfg.method = value
        elif key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise UserError(f"{key}: must be a mapping, got {value!r}")
            section = getattr(cfg, key)
            names = {f.name for f in dataclasses.fields(section)}
            given = {}
            for k, v in value.items():
                if k not in names:
                    unknown.append(f"{key}.{k}")
                else:
                    given[k] = _coerce(v, getattr(section, k), f"{key}.{k}")
            # Rebuild so that derived defaults (model.n_kv_heads, model.ffn_hidden) follow the given keys.
            setattr(cfg, key, SECTIONS[key](**given))
        else:
            unknown.append(key)
    if unknown:
        raise UserError(f"unknown config key{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
    return cfg


def load(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or the defaults if ``path`` is None) and apply ``key=value`` overrides."""
    d: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}")
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. train.lr=1e-3")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) == 1 and parts[0] == "method":
            d["method"] = value
        elif len(parts) == 2:
            section = d.get(parts[0])
            if not isinstance(section, dict):
                section = d[parts[0]] = {}
            section[parts[1]] = value
        else:
            raise UserError(f"--set {item!r}: key must look like section.name, e.g. train.lr")
    return from_dict(d)


def save(cfg: RunConfig, path: str | Path):
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# Keys that may differ when a run resumes: they change logging and bookkeeping, not the trajectory.
RESUME_SAFE_KEYS = {"train.eval_every", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                    "train.eval_tokens", "data.cache_dir"}


def differing_keys(a: RunConfig, b: RunConfig) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    da, db = a.to_dict(), b.to_dict()
    out = []
    for sec in da:
        if isinstance(da[sec], dict):
            out += [f"{sec}.{k}" for k in da[sec] if da[sec][k] != db.get(sec, {}).get(k)]
        elif da[sec] != db.get(sec):
            out.append(sec)
    return out


def problems(cfg: RunConfig) -> list[str]:
    """Every problem in the config, each naming the key to change."""
    out = list(cfg.model.problems())
    t, s, lo = cfg.train, cfg.step, cfg.lora
    if cfg.method not in METHODS:
        out.append(f"method: must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    for name in ("max_steps", "micro_batch", "grad_accum", "seq_len"):
        v = getattr(t, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            out.append(f"train.{name}: must be a positive integer, got {v!r}")
    if isinstance(t.seq_len, int) and isinstance(cfg.model.max_seq_len, int) and t.seq_len > cfg.model.max_seq_len:
        out.append(f"train.seq_len: must be at most model.max_seq_len ({cfg.model.max_seq_len}), got {t.seq_len}")
    if not (isinstance(t.lr, (int, float)) and t.lr > 0):
        out.append(f"train.lr: must be positive, got {t.lr!r}")
    if not (0 <= t.min_lr_ratio <= 1):
        out.append(f"train.min_lr_ratio: must be in [0, 1], got {t.min_lr_ratio}")
    if not (isinstance(t.warmup_steps, int) and t.warmup_steps >= 0):
        out.append(f"train.warmup_steps: must be a non-negative integer, got {t.warmup_steps!r}")
    if t.parallel not in ("ddp", "fsdp2"):
        out.append(f"train.parallel: must be ddp or fsdp2, got {t.parallel!r}")
    if t.on_nonfinite not in ("skip", "stop"):
        out.append(f"train.on_nonfinite: must be skip or stop, got {t.on_nonfinite!r}")
    if not (isinstance(t.keep_checkpoints, int) and t.keep_checkpoints >= 1):
        out.append(f"train.keep_checkpoints: must be a positive integer, got {t.keep_checkpoints!r}")
    if t.dtype not in ("auto", "bf16", "fp32"):
        out.append(f"train.dtype: must be auto, bf16 or fp32, got {t.dtype!r}")
    if t.device not in ("auto", "cpu", "cuda"):
        out.append(f"train.device: must be auto, cpu or cuda, got {t.device!r}")
    if not (0 < cfg.data.val_fraction < 1):
        out.append(f"data.val_fraction: must be in (0, 1), got {cfg.data.val_fraction}")
    # PET / STEP
    if not (isinstance(lo.rank, int) and lo.rank > 0):
        out.append(f"lora.rank: must be a positive integer, got {lo.rank!r}")
    elif isinstance(cfg.model.d_model, int) and lo.rank > cfg.model.d_model:
        out.append(f"lora.rank: must be at most model.d_model ({cfg.model.d_model}), got {lo.rank}")
    if not (isinstance(lo.relora_interval, int) and lo.relora_interval >= 0):
        out.append(f"lora.relora_interval: must be a non-negative integer, got {lo.relora_interval!r}")
    if lo.reset_prune is not None and not (0 < lo.reset_prune < 1):
        out.append(f"lora.reset_prune: must be in (0, 1) or null, got {lo.reset_prune!r}")
    if not (0 <= lo.warm_start_fraction < 1):
        out.append(f"lora.warm_start_fraction: must be in [0, 1), got {lo.warm_start_fraction!r}")
    g = cfg.galore
    if not (isinstance(g.rank, int) and g.rank > 0):
        out.append(f"galore.rank: must be a positive integer, got {g.rank!r}")
    if not (isinstance(g.update_proj_gap, int) and g.update_proj_gap > 0):
        out.append(f"galore.update_proj_gap: must be a positive integer, got {g.update_proj_gap!r}")
    if g.proj_type not in ("std", "left", "right", "full"):
        out.append(f"galore.proj_type: must be std, left, right or full, got {g.proj_type!r}")
    if s.init not in INITS:
        out.append(f"step.init: must be one of {', '.join(INITS)}, got {s.init!r}")
    if s.position not in POSITIONS:
        out.append(f"step.position: must be one of {', '.join(POSITIONS)}, got {s.position!r}")
    if s.budget_match not in ("flops", "steps"):
        out.append(f"step.budget_match: must be flops or steps, got {s.budget_match!r}")
    if s.flops_convention not in ("paper", "corrected"):
        out.append(f"step.flops_convention: must be paper or corrected, got {s.flops_convention!r}")
    if not (isinstance(s.growth_fraction, (int, float)) and 0 < s.growth_fraction <= 1):
        out.append(f"step.growth_fraction: must be in (0, 1], got {s.growth_fraction!r}")
    L = cfg.model.n_layers if isinstance(cfg.model.n_layers, int) else None
    if not (isinstance(s.n_stages, int) and s.n_stages >= 1):
        out.append(f"step.n_stages: must be a positive integer, got {s.n_stages!r}")
    elif L and s.n_stages > L:
        out.append(f"step.n_stages: must be at most model.n_layers ({L}), got {s.n_stages}")
    if s.layers_per_stage is not None:
        lps = s.layers_per_stage
        if not (isinstance(lps, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in lps)):
            out.append(f"step.layers_per_stage: must be a list of positive integers, got {lps!r}")
        else:
            if isinstance(s.n_stages, int) and len(lps) != s.n_stages:
                out.append(f"step.layers_per_stage: needs step.n_stages ({s.n_stages}) entries, got {len(lps)}")
            if L and sum(lps) != L:
                out.append(f"step.layers_per_stage: must sum to model.n_layers ({L}), got {sum(lps)}")
    if cfg.method in _METHODS:
        out += _METHODS[cfg.method].problems(cfg)
    return out


def validate(cfg: RunConfig):
    """Raise one UserError listing every problem (joined with '; ')."""
    found = problems(cfg)
    if found:
        raise UserError("; ".join(found))
