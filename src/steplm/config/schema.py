"""The run configuration as a schema: one dataclass per concern, each field with its type, its
allowed values (``Literal[...]`` choices, a ``Range`` in the field's metadata) and its help (the
docstring under it, which ``field_docs`` reads for the CLI). Pure Python: no torch, so `steplm plan`
runs without it.

``validate.py`` checks a whole ``RunConfig`` against these fields (one generic checker) and the
consistency rules between fields; ``load.py`` reads YAML and ``--set`` overrides into it.
"""
from __future__ import annotations

import ast
import functools
import dataclasses
import inspect
import math
import textwrap
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

from steplm.plan.memory import MASTER_WEIGHTS, OPTIMIZER_STATES



@dataclass(frozen=True)
class Range:
    """The allowed interval of a numeric field: ``lo``/``hi`` (None: unbounded), open or closed ends,
    and the phrase an error uses ("must be positive")."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    text: str = ""

    def __contains__(self, v) -> bool:
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return self.hi is None or not (v > self.hi or (self.hi_open and v == self.hi))


POSITIVE = Range(0, None, True, text="must be positive")
NON_NEGATIVE = Range(0, text="must be non-negative")
UNIT = Range(0, 1, text="must be in [0, 1]")
UNIT_OPEN = Range(0, 1, True, True, "must be in (0, 1)")
UNIT_RIGHT_OPEN = Range(0, 1, False, True, "must be in [0, 1)")
UNIT_LEFT_OPEN = Range(0, 1, True, False, "must be in (0, 1]")
SEED = Range(0, 2**32, False, True, "must be in [0, 2**32)")


def default_ffn_hidden(d_model: int, multiple_of: int = 64) -> int:
    """LLaMA's SwiGLU width: 8/3·d rounded up to a multiple of ``multiple_of``."""
    hidden = int(8 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ModelConfig:
    vocab_size: int = 50257
    """Vocabulary size; must cover the tokenizer's."""
    d_model: int = 256
    """Hidden size d."""
    n_layers: int = 8
    """Number of decoder blocks L (the final depth for STEP)."""
    n_heads: int = 4
    """Attention heads; d_model must be divisible by it unless head_dim is set."""
    n_kv_heads: int | None = None
    """Key/value heads for GQA; None means n_heads (plain multi-head attention)."""
    head_dim: int | None = None
    """Width of one attention head; None means d_model / n_heads (HF head_dim)."""
    ffn_hidden: int | None = None
    """SwiGLU hidden size; None means 8/3·d rounded up to a multiple of 64."""
    max_seq_len: int = 256
    """Longest sequence the model is trained on (RoPE is computed up to it)."""
    rope_theta: float = field(default=10000.0, metadata={"range": POSITIVE})
    """RoPE base."""
    rope_scaling: dict | None = None
    """RoPE frequency scaling, HF rope_parameters without rope_theta, e.g. {rope_type: linear, factor: 4};
    rope_type linear, llama3 or yarn (computed by transformers' own functions). None: plain RoPE."""
    attention_bias: bool = False
    """Biases on the q/k/v/o projections (HF attention_bias)."""
    mlp_bias: bool = False
    """Biases on the gate/up/down projections (HF mlp_bias)."""
    # RMSNorm divides by sqrt(mean(x**2) + eps): an eps near the activations' mean square stops it normalising
    norm_eps: float = field(default=1e-5, metadata={"range": Range(0, 1, True, True, "must be in (0, 1), e.g. 1e-5 as in LLaMA")})
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the token embedding with the LM head."""
    init_std: float = field(default=0.02, metadata={"range": POSITIVE})
    """Std of the normal init; output projections are further scaled by depth."""
    init_from: str | None = None
    """The model stage 1 starts from instead of a random init (`steplm train --init-from`): an HF Llama
    directory, a steplm run (its final model, or while it trains its newest intact checkpoint), a
    checkpoint folder (RUN/checkpoints/step_N) or RUN/checkpoints. Its config fixes every architecture
    key (a conflicting model.* key is an error) and its tokenizer is used as-is; model.n_layers is the
    final depth, at least the checkpoint's (STEP grows it to that).
    The model classes ignore it: it says where the weights come from, as init_std does for a random init."""

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_hidden is None:
            self.ffn_hidden = default_ffn_hidden(self.d_model)
        if self.head_dim is None and _positive_int(self.d_model) and _positive_int(self.n_heads) \
                and self.d_model % self.n_heads == 0:
            self.head_dim = self.d_model // self.n_heads  # left None otherwise; problems() names d_model

    def problems(self) -> list[str]:
        """Every inconsistency in this config, each naming the key to change."""
        out = []
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            v = getattr(self, name)
            if not _positive_int(v):
                out.append(f"model.{name}: must be a positive integer, got {v!r}")
        if not out:
            if self.head_dim is None:
                out.append(f"model.d_model: must be divisible by model.n_heads ({self.n_heads}), got {self.d_model} "
                           "(or set model.head_dim)")
            elif not _positive_int(self.head_dim) or self.head_dim % 2:
                out.append(f"model.head_dim: must be a positive even integer for RoPE, got {self.head_dim!r}")
            if self.n_heads % self.n_kv_heads:
                out.append(f"model.n_kv_heads: must divide model.n_heads ({self.n_heads}), got {self.n_kv_heads}")
        out += rope_scaling_problems(self.rope_scaling)
        for name in ("attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"model.{name}: must be true or false, got {getattr(self, name)!r}")
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


# RoPE scaling types steplm computes, and the keys each needs (HF rope_parameters names). "dynamic"
# (NTK) rescales only past max_position_embeddings, where steplm never runs: within it transformers
# computes plain RoPE, and so does this (through the same function).
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}
# Optional keys transformers reads, and their type: "number" (finite; attention_factor positive) or bool.
ROPE_OPTIONAL_KEYS = {
    "yarn": {"attention_factor": "number", "beta_fast": "number", "beta_slow": "number", "mscale": "number",
             "mscale_all_dim": "number", "truncate": "bool"},
}


def _finite(v) -> bool:
    """A finite number (an int too large for a float is not)."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def rope_scaling_problems(scaling) -> list[str]:
    """What is wrong with a ``model.rope_scaling`` value (empty if it is None or usable)."""
    if scaling is None:
        return []
    if not isinstance(scaling, dict):
        return [f"model.rope_scaling: must be a mapping such as {{rope_type: linear, factor: 4}}, got {scaling!r}"]
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALING_KEYS:
        return [f"model.rope_scaling: rope_type must be one of {', '.join(ROPE_SCALING_KEYS)}, got {kind!r}"]
    missing = [k for k in ROPE_SCALING_KEYS[kind]
               if not isinstance(scaling.get(k), (int, float)) or isinstance(scaling.get(k), bool)]
    if missing:
        return [f"model.rope_scaling: rope_type {kind} needs a number for {', '.join(missing)}"]
    for k, want in ROPE_OPTIONAL_KEYS.get(kind, {}).items():
        v = scaling.get(k)
        if v is None:  # absent or null: transformers' default
            continue
        is_number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if want == "bool" and not isinstance(v, bool):
            return [f"model.rope_scaling: {kind}'s {k} must be true or false, got {v!r}"]
        if want == "number" and not (is_number and _finite(v) and (k != "attention_factor" or v > 0)):
            what = "a finite positive number" if k == "attention_factor" else "a finite number"
            return [f"model.rope_scaling: {kind}'s {k} must be {what}, got {v!r}"]
    numbers = {k: v for k, v in scaling.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    bad = [k for k, v in numbers.items() if not _finite(v) or (k in ROPE_SCALING_KEYS[kind] and v <= 0)]
    if bad:
        return [f"model.rope_scaling: {', '.join(bad)} must be a finite {'positive ' * (bad[0] in ROPE_SCALING_KEYS[kind])}"
                f"number, got {', '.join(repr(numbers[k]) for k in bad)}"]
    if kind == "llama3" and scaling["low_freq_factor"] >= scaling["high_freq_factor"]:
        return ["model.rope_scaling: llama3's low_freq_factor must be below its high_freq_factor, got "
                f"{scaling['low_freq_factor']!r} and {scaling['high_freq_factor']!r}"]
    if scaling.get("factor", 1) < 1:
        return [f"model.rope_scaling: factor must be at least 1 (it stretches the context), got {scaling['factor']!r}"]
    if "rope_theta" in scaling:
        return ["model.rope_scaling: give the base as model.rope_theta, not inside rope_scaling"]
    return []


@dataclass
class DataConfig:
    path: str | None = None
    """Training text: a .txt/.jsonl/.jsonl.gz/.parquet file, a directory of them (or of .py files), or a HF dataset name."""
    val_path: str | None = None
    """Held-out text; if unset, part of `path` is held out (val_fraction)."""
    val_fraction: float = field(default=0.05, metadata={"range": UNIT_OPEN})
    """Share held out for validation when val_path is unset: whole documents, chosen by a hash of their
    names; when that holds out none, or all of them (one file, or a few), the last val_fraction of the
    token stream instead (a tail split). The start of a run says which."""
    tokenizer: str = "gpt2"
    """'gpt2' (local dir in $STEPLM_GPT2_DIR or the hub), a tokenizer directory, or 'bpe:N' trained on the corpus."""
    text_field: str = "text"
    """Field holding the text in .jsonl/.parquet records."""
    exclude: list[str] = field(default_factory=list)
    """Directory names skipped when `path` is a directory, e.g. [tests] (default none: every .txt, .md,
    .rst, .py, .jsonl, .jsonl.gz and .parquet file under it is read; the start of a run counts them)."""
    cache_dir: str | None = None
    """Where token shards are cached; default $STEPLM_CACHE_DIR, else ~/.cache/steplm/tokens ($XDG_CACHE_HOME)."""
    max_train_tokens: int | None = field(default=None, metadata={"range": POSITIVE})
    """Stop tokenizing the training corpus after about this many tokens (None: all)."""


@dataclass
class TrainConfig:
    max_steps: int = field(default=200, metadata={"range": POSITIVE})
    """Optimizer steps of the vanilla run; STEP gets the same FLOPs (or steps, see step.budget_match)."""
    micro_batch: int = field(default=8, metadata={"range": POSITIVE})
    """Sequences per forward pass."""
    grad_accum: int = field(default=1, metadata={"range": POSITIVE})
    """Micro-batches per optimizer step."""
    seq_len: int = field(default=128, metadata={"range": POSITIVE})
    """Tokens per training sequence (at most model.max_seq_len)."""
    lr: float = field(default=3e-3, metadata={"range": POSITIVE})
    """Peak learning rate (stage 1; STEP rewarms every stage to it)."""
    embedding_lr_scale: float = field(default=1.0, metadata={"range": POSITIVE})
    """Multiplier on lr for the parameters outside the transformer blocks (token embedding, output
    head, final norm); 1 trains everything at one lr, as the paper does."""
    min_lr_ratio: float = field(default=0.1, metadata={"range": UNIT})
    """Cosine floor as a fraction of lr."""
    warmup_steps: int = field(default=20, metadata={"range": NON_NEGATIVE})
    """Linear warmup steps (the paper uses 1000 at full scale)."""
    weight_decay: float = field(default=0.1, metadata={"range": NON_NEGATIVE})
    """AdamW weight decay (not applied to norms or adapters' biases)."""
    beta1: float = field(default=0.9, metadata={"range": UNIT_RIGHT_OPEN})
    """AdamW beta1."""
    beta2: float = field(default=0.95, metadata={"range": UNIT_RIGHT_OPEN})
    """AdamW beta2."""
    grad_clip: float = field(default=1.0, metadata={"range": NON_NEGATIVE})
    """Clip the global gradient norm to this (0 disables)."""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute precision: 'auto' (bf16 autocast where supported), 'bf16' or 'fp32'."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto', 'cpu' or 'cuda'."""
    seed: int = field(default=0, metadata={"range": SEED})
    """Seed for init, data order and adapters."""
    eval_every: int = field(default=50, metadata={"range": NON_NEGATIVE})
    """Evaluate validation loss every this many steps (0: only at the end)."""
    eval_tokens: int = field(default=32768, metadata={"range": POSITIVE})
    """Validation tokens per evaluation."""
    checkpoint_every: int | None = field(default=None, metadata={"range": NON_NEGATIVE})
    """Save a checkpoint every this many steps and at the last step; null (the default): about every
    tenth of the run (ceil(steps / 10), at most 1000 steps apart); 0: never. SIGINT, SIGTERM and
    SIGUSR1 checkpoint the last whole step whatever this says."""
    log_every: int = field(default=10, metadata={"range": POSITIVE})
    """Write a metrics row every this many steps."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass."""
    fused_loss: bool = True
    """Fuse the LM head with the cross-entropy, chunk by chunk, so the (tokens, vocab) logits are never whole."""
    attention_matmul_backward: bool = True
    """On CPU in bf16, compute the causal attention's backward from batched matmuls (attention.py)
    instead of torch's flash backward, which is slower there; false keeps torch's SDPA."""
    host_allocator: Literal["auto", "retain", "system"] = "auto"
    """On CPU: 'retain' makes glibc keep freed memory for reuse instead of unmapping every large
    buffer each step (allocator.retain_host_memory; 1.1-1.2x a CPU step), at the price of a resident
    set up to about 1.6x the step's tensors; 'system' leaves the process's allocator as it is; 'auto'
    retains unless twice the run's least step peak would not fit in the memory available at its
    start (allocator.choose_host_allocator). Process-wide; no effect on GPUs or outside glibc."""
    fused_optimizer: bool = True
    """Use the fused AdamW kernel (FSDP2's sharded parameters always use the foreach kernel)."""
    optimizer_states: Literal[OPTIMIZER_STATES] = "fp32"
    """AdamW moments: fp32 (torch), bf16 (torch-optimi, Kahan summation; needs master_weights bf16), 8bit or 4bit (torchao, block-wise quantized)."""
    master_weights: Literal[MASTER_WEIGHTS] = "fp32"
    """Trainable weights and gradients: fp32, or bf16 (needs optimizer_states bf16, 8bit or 4bit)."""
    parallel: Literal["ddp", "fsdp2"] = "ddp"
    """Under torchrun with several processes: 'ddp' (DistributedDataParallel) or 'fsdp2' (fully_shard)."""
    tensorboard: bool = False
    """Also write TensorBoard event files to <out>/tensorboard (needs the tensorboard package)."""
    keep_checkpoints: int = field(default=3, metadata={"range": POSITIVE})
    """How many of the newest checkpoints to keep."""
    on_nonfinite: Literal["skip", "stop"] = "skip"
    """A NaN/inf loss or gradient norm (or one above max_grad_norm): 'skip' the batch, or 'stop' keeping the last good checkpoint."""
    max_grad_norm: float = field(default=0.0, metadata={"range": NON_NEGATIVE})
    """Treat a batch whose gradient norm exceeds this as bad (0: only NaN/inf)."""
    max_skipped: int = field(default=100, metadata={"range": NON_NEGATIVE})
    """Stop when more than this many batches have been skipped (the run also stops, whatever this
    says, when more than 3 steps in a row, or more than half of its steps once 8 have run, were skipped)."""


@dataclass
class LoraConfig:
    rank: int = field(default=8, metadata={"range": POSITIVE})
    """LoRA rank r on frozen layers (paper: 128 at d 1536-2048)."""
    alpha: float = field(default=16.0, metadata={"range": POSITIVE})
    """LoRA scaling numerator; the update is B·A·alpha/rank."""
    relora_interval: int = field(default=0, metadata={"range": NON_NEGATIVE})
    """Merge adapters into the base and re-initialise them every this many steps (0: never)."""
    relora_warmup: int = field(default=10, metadata={"range": NON_NEGATIVE})
    """Steps of LR re-warmup after each ReLoRA merge (jagged cosine)."""
    reset_prune: float | None = field(default=None, metadata={"range": UNIT_OPEN})
    """At a ReLoRA reset, zero the adapters' Adam moments (None) or zero both at this fraction of
    positions, those whose first moment is smallest in magnitude (one mask for both moments)."""
    warm_start_fraction: float = field(default=0.25, metadata={"range": UNIT_RIGHT_OPEN})
    """method relora: share of train.max_steps trained full-rank before switching to LoRA."""
    merge_rounding: Literal["nearest", "stochastic"] = "nearest"
    """Rounding when adapters merge into frozen bf16 weights: 'nearest' or 'stochastic' (unbiased)."""


@dataclass
class GaloreConfig:
    rank: int | None = field(default=None, metadata={"range": POSITIVE})
    """Projection rank for the attention and MLP weights (paper: 128 at d 1536-2048); None (unset):
    min(16, model.d_model // 2), so that it follows the shape."""
    update_proj_gap: int = field(default=200, metadata={"range": POSITIVE})
    """Recompute the projection (an SVD of the gradient) every this many steps."""
    scale: float = field(default=0.25, metadata={"range": POSITIVE})
    """GaLore's scale on the projected-back update."""
    proj_type: Literal["std", "left", "right", "full"] = "std"
    """galore-torch projection type: std, left, right or full."""


@dataclass
class ApolloConfig:
    rank: int | None = field(default=None, metadata={"range": POSITIVE})
    """APOLLO's random-projection rank for the attention and MLP weights (APOLLO-Mini: 1 with scale_type
    tensor); None (unset): min(256, model.d_model // 2), APOLLO's 256 (at d 512 and wider) following the shape."""
    update_proj_gap: int = field(default=200, metadata={"range": POSITIVE})
    """Draw a new random projection every this many steps."""
    scale: float = field(default=1.0, metadata={"range": POSITIVE})
    """APOLLO's scale on the update (APOLLO-Mini: 128)."""
    scale_type: Literal["channel", "tensor"] = "channel"
    """Gradient scaling factor: channel-wise or tensor-wise."""


@dataclass
class StepConfig:
    n_stages: int = field(default=1, metadata={"range": POSITIVE})
    """K, the number of stages (methods other than step and step-no-pet ignore the step section)."""
    layers_per_stage: list[int] | None = None
    """n_1..n_K, layers added per stage (must sum to model.n_layers); None: choose with the Eq. 3 planner."""
    growth_fraction: float = field(default=0.75, metadata={"range": UNIT_LEFT_OPEN})
    """Grow after this fraction of a stage's nominal steps (paper: 0.75)."""
    init: Literal["mean", "copy"] = "mean"
    """New-layer init: 'mean' (interpolation-mean) or 'copy' (interpolation-copy)."""
    fpi: bool = False
    """Zero o_proj and down_proj of new layers so growth preserves the function."""
    position: Literal["upper", "top", "intermediate", "lower", "random"] = "upper"
    """Where new layers go: upper (one per gap from the top gap down), top (one block above the last
    layer, made as upper makes them), intermediate, lower or random (growth.py states each reading)."""
    budget_match: Literal["flops", "steps"] = "flops"
    """'flops': stages get vanilla's FLOPs for train.max_steps; 'steps': train.max_steps split across stages."""
    flops_convention: Literal["paper", "corrected"] = "paper"
    """FLOPs count used for budget matching: 'paper' (frozen 2N) or 'corrected' (frozen 4N, head, attention)."""
    cap_growth: bool = False
    """Planner constraint n_(i+1) <= N_i (one new layer per existing layer)."""


@dataclass
class SFTConfig:
    model: str | None = None
    """Instruction tuning (steplm sft): the model to tune, a steplm run or HF Llama directory (None: pre-training)."""
    data: str | None = None
    """SFT examples: Alpaca JSON (instruction/input/output) or seed-task JSONL (instances)."""
    epochs: int = field(default=2, metadata={"range": POSITIVE})
    """Passes over the examples (paper Table 8: 2)."""
    limit: int | None = field(default=None, metadata={"range": POSITIVE})
    """Use only the first this many examples (None: all)."""


@dataclass
class RunConfig:
    method: str = "vanilla"
    """vanilla, step, step-no-pet, relora, galore or apollo: any method registered in steplm.methods
    (validate.py checks it against the registry)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    galore: GaloreConfig = field(default_factory=GaloreConfig)
    apollo: ApolloConfig = field(default_factory=ApolloConfig)
    step: StepConfig = field(default_factory=StepConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolve_shape_defaults(self) -> None:
        """Fill, in place, the keys whose default follows the model's shape and that were left unset
        (None): galore.rank and apollo.rank (``SHAPE_RANK_DEFAULTS``). A value the user gave is kept
        (and validated as given). ``config.load`` calls this once the model keys are final."""
        for section, default in SHAPE_RANK_DEFAULTS.items():
            part = getattr(self, section)
            if part.rank is None and _positive_int(self.model.d_model):
                part.rank = shape_rank(default, self.model.d_model)


SHAPE_RANK_DEFAULTS = {"galore": 16, "apollo": 256}
"""The projection ranks of the projected-moment methods on a model at least twice as wide."""


def shape_rank(default: int, d_model: int) -> int:
    """The projection rank an unset galore.rank / apollo.rank takes: ``default``, or half of d_model
    on a narrower model (at least 1), so that the default always fits the shape."""
    return max(1, min(default, d_model // 2))


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "lora": LoraConfig,
            "galore": GaloreConfig, "apollo": ApolloConfig, "step": StepConfig, "sft": SFTConfig}


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass, by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(getattr(b, "value", None), ast.Constant):
            docs[a.target.id] = str(b.value.value)
    return docs


def dotted_fields() -> dict[str, tuple[type, dataclasses.Field]]:
    """Every config key ('method', 'train.lr', ...) with its section class (RunConfig for 'method') and field."""
    out = {"method": (RunConfig, next(f for f in fields(RunConfig) if f.name == "method"))}
    for name, cls in SECTIONS.items():
        for f in fields(cls):
            out[f"{name}.{f.name}"] = (cls, f)
    return out
