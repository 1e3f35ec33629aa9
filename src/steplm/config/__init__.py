"""Run configuration: one small dataclass per concern, YAML round-trip, `--set` overrides, validation.

Every field carries a docstring (the string literal under it); ``field_docs`` reads them for the
CLI help, so the config stays the single source of truth.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from steplm.errors import UserError
from steplm.model.llama import ModelConfig

from steplm.methods import REGISTRY as _METHODS
from steplm.methods.base import init_depth
from steplm.plan.memory import MASTER_WEIGHTS, OPTIMIZER_STATES, Precision

METHODS = tuple(_METHODS)
POSITIONS = ("upper", "top", "intermediate", "lower", "random")
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
    """Where token shards are cached; default $STEPLM_CACHE_DIR, else ~/.cache/steplm/tokens ($XDG_CACHE_HOME)."""
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
    embedding_lr_scale: float = 1.0
    """Multiplier on lr for the parameters outside the transformer blocks (token embedding, output
    head, final norm); 1 trains everything at one lr, as the paper does."""
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
    fused_loss: bool = True
    """Fuse the LM head with the cross-entropy, chunk by chunk, so the (tokens, vocab) logits are never whole."""
    attention_matmul_backward: bool = True
    """On CPU in bf16, compute the causal attention's backward from batched matmuls (attention.py)
    instead of torch's flash backward, which is slower there; false keeps torch's SDPA."""
    host_allocator: str = "retain"
    """On CPU: 'retain' makes glibc keep freed memory for reuse instead of unmapping every large
    buffer each step (devices.retain_host_memory; 1.1-1.2x a CPU step), 'system' leaves the
    process's allocator as it is. Process-wide; no effect on GPUs or outside glibc."""
    fused_optimizer: bool = True
    """Use the fused AdamW kernel (FSDP2's sharded parameters always use the foreach kernel)."""
    optimizer_states: str = "fp32"
    """AdamW moments: fp32 (torch), bf16 (torch-optimi, Kahan summation; needs master_weights bf16), 8bit or 4bit (torchao, block-wise quantized)."""
    master_weights: str = "fp32"
    """Trainable weights and gradients: fp32, or bf16 (needs optimizer_states bf16, 8bit or 4bit)."""
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
    merge_rounding: str = "nearest"
    """Rounding when adapters merge into frozen bf16 weights: 'nearest' or 'stochastic' (unbiased)."""


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
class ApolloConfig:
    rank: int = 256
    """APOLLO's random-projection rank for the attention and MLP weights (APOLLO-Mini: 1 with scale_type tensor)."""
    update_proj_gap: int = 200
    """Draw a new random projection every this many steps."""
    scale: float = 1.0
    """APOLLO's scale on the update (APOLLO-Mini: 128)."""
    scale_type: str = "channel"
    """Gradient scaling factor: channel-wise or tensor-wise."""


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
    """Where new layers go: upper (one per gap from the top gap down), top (one block above the last
    layer, made as upper makes them), intermediate, lower or random (growth.py states each reading)."""
    budget_match: str = "flops"
    """'flops': stages get vanilla's FLOPs for train.max_steps; 'steps': train.max_steps split across stages."""
    flops_convention: str = "paper"
    """FLOPs count used for budget matching: 'paper' (frozen 2N) or 'corrected' (frozen 4N, head, attention)."""
    cap_growth: bool = False
    """Planner constraint n_(i+1) <= N_i (one new layer per existing layer)."""


@dataclass
class SFTConfig:
    model: str | None = None
    """Instruction tuning (steplm sft): the model to tune, a steplm run or HF Llama directory (None: pre-training)."""
    data: str | None = None
    """SFT examples: Alpaca JSON (instruction/input/output) or seed-task JSONL (instances)."""
    epochs: int = 2
    """Passes over the examples (paper Table 8: 2)."""
    limit: int | None = None
    """Use only the first this many examples (None: all)."""


@dataclass
class RunConfig:
    method: str = "vanilla"
    """vanilla, step, step-no-pet, relora, galore or apollo (registered in steplm.methods)."""
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


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "lora": LoraConfig,
            "galore": GaloreConfig, "apollo": ApolloConfig, "step": StepConfig, "sft": SFTConfig}


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass, by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(getattr(b, "value", None), ast.Constant):
            docs[a.target.id] = str(b.value.value)
    return docs


class _Raw(str):
    """A --set value as typed: kept as text for string fields, read as YAML for the others."""


def _show(value: Any, limit: int = 40) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[:limit - 3] + "..."


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
          dict: "a mapping such as {rope_type: linear, factor: 4}"}


def _describe(hint) -> str:
    """What a value of this annotation looks like, for error messages."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(args[0]).split(' ', 1)[-1]}s"
    return _KINDS.get(hint, getattr(hint, "__name__", str(hint)))


def _accepts_str(hint) -> bool:
    return hint is str or (typing.get_origin(hint) in (types.UnionType, typing.Union) and str in typing.get_args(hint))


def check_value(value: Any, hint, key: str, problems: list[str]) -> Any:
    """``value`` checked against the field annotation ``hint`` (bool, int, float, str, dict, ``X | None``,
    ``list[X]``): returns it (ints widened to float for float fields, YAML 1.1's "1e-3" strings read
    as numbers), or appends a problem naming ``key`` and returns None. Bools are not integers, and a
    float must be finite."""
    if isinstance(value, _Raw):
        if _accepts_str(hint):
            return str(value)
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            problems.append(f"{key}: cannot read {str(value)!r} as {_describe(hint)}")
            return None
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        if len(options) != 1:
            raise TypeError(f"{key}: unsupported annotation {hint}")  # a programming error, not bad input
        mine: list[str] = []
        out = check_value(value, options[0], key, mine)
        problems += [m.replace(f"must be {_describe(options[0])}", f"must be {_describe(hint)}") for m in mine]
        return out
    bad = f"{key}: must be {_describe(hint)}, got {_show(value)}"
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            problems.append(bad)
            return None
        (item,) = typing.get_args(hint)
        return [check_value(v, item, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if hint is dict:  # a mapping whose contents the owning section checks (model.rope_scaling)
        if not isinstance(value, dict):
            problems.append(bad)
            return None
        return value
    if hint is bool or hint is str:
        if not isinstance(value, hint):
            problems.append(bad)
            return None
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(bad)
            return None
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                number = float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
            except ValueError:
                problems.append(bad)
                return None
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                problems.append(f"{key}: must be a finite number, got {_show(value)}")
                return None
        else:
            problems.append(bad)
            return None
        if not math.isfinite(number):
            problems.append(f"{key}: must be a finite number, got {_show(value)}")
            return None
        return number
    raise TypeError(f"{key}: unsupported annotation {hint}")


def _section(cls, value: Any, name: str, problems: list[str], unknown: list[str], ranges: list[str]):
    """One config section built from a mapping, every value checked first; None if anything is wrong.
    Range problems of values that did type-check go to ``ranges``, reported only with type problems
    (otherwise ``validate`` reports them)."""
    if not isinstance(value, dict):
        problems.append(f"{name}: must be a mapping of {name} keys, got {_show(value)}")
        return None
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    given, before = {}, len(problems)
    for k, v in value.items():
        if k not in names:
            unknown.append(f"{name}.{k}")
            continue
        mine: list[str] = []
        given[k] = check_value(v, hints[k], f"{name}.{k}", mine)
        problems += mine
        if not mine and _value_problem(f"{name}.{k}", given[k]):
            ranges.append(_value_problem(f"{name}.{k}", given[k]))
    if len(problems) > before:
        return None
    # Built only from checked values, so __post_init__ (derived n_kv_heads, ffn_hidden) sees no garbage.
    return cls(**given)


def from_dict(d: dict, init_source: str = "model.init_from") -> RunConfig:
    """Build a RunConfig from nested dicts. Every value is checked against its field's annotation
    before any object is built; unknown keys and wrong types are reported together in one error.
    With model.init_from, the model keys not given are taken from that directory (``resolve_init_from``);
    ``init_source`` is how errors name it (``--init-from`` when it came from the flag)."""
    if not isinstance(d, dict):
        raise UserError(f"config: top level must be a mapping of sections (method, {', '.join(SECTIONS)}), "
                        f"got {_show(d)}")
    cfg = RunConfig()
    unknown: list[str] = []
    problems: list[str] = []
    ranges: list[str] = []
    for key, value in d.items():
        if key == "method":
            method = check_value(value, str, "method", problems)
            if method is not None:
                cfg.method = method
        elif key in SECTIONS:
            if value is None:
                continue
            section = _section(SECTIONS[key], value, key, problems, unknown, ranges)
            if section is not None:
                setattr(cfg, key, section)
        else:
            unknown.append(str(key))
    found = []
    if unknown:
        found.append(f"unknown config key{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
    if found or problems:
        raise UserError("; ".join(found + problems + (ranges if problems else [])))
    if cfg.model.init_from:
        given_model = set(d["model"]) if isinstance(d.get("model"), dict) else set()
        given_data = set(d["data"]) if isinstance(d.get("data"), dict) else set()
        conflicts = resolve_init_from(cfg, given_model, "tokenizer" in given_data, init_source)
        if conflicts:
            raise UserError("; ".join(conflicts))
    return cfg


# ModelConfig keys that model.init_from does not fix: the final depth, and how weights are initialised.
NOT_FROM_CHECKPOINT = ("n_layers", "init_std", "init_from")


def _checkpoint_config(cfg: RunConfig, source: str) -> ModelConfig:
    """The ModelConfig of model.init_from's config.json, or a UserError naming ``source``."""
    from steplm.io.hf import read_config

    d = Path(cfg.model.init_from)
    try:
        ck = read_config(d)
    except UserError as e:
        raise UserError(str(e).replace("MODEL:", f"{source}:", 1))
    if not (d / "tokenizer.json").is_file():
        raise UserError(f"{source}: {d} has no tokenizer.json (its tokenizer is used as-is)")
    return ck


def init_from_conflicts(cfg: RunConfig, given: set[str], given_tokenizer: bool, ck: ModelConfig,
                        source: str = "model.init_from") -> list[str]:
    """The model keys in ``given`` (and data.tokenizer) whose values differ from model.init_from's
    checkpoint ``ck``, each naming both sides."""
    from steplm.io.hf import HF_NAMES

    m, d, out = cfg.model, cfg.model.init_from, []
    for f in dataclasses.fields(ModelConfig):
        if f.name in given and f.name not in NOT_FROM_CHECKPOINT and getattr(m, f.name) != getattr(ck, f.name):
            out.append(f"model.{f.name}: {getattr(m, f.name)!r} conflicts with {source} {d} "
                       f"({HF_NAMES.get(f.name, f.name)} {getattr(ck, f.name)!r})")
    if given_tokenizer and Path(cfg.data.tokenizer).expanduser().resolve() != Path(d).expanduser().resolve():
        out.append(f"data.tokenizer: {cfg.data.tokenizer!r} conflicts with {source} {d} (its tokenizer is used "
                   f"as-is; drop data.tokenizer or set it to that directory)")
    return out


def resolve_init_from(cfg: RunConfig, given: set[str], given_tokenizer: bool,
                      source: str = "model.init_from") -> list[str]:
    """Fill ``cfg`` in place from model.init_from: every architecture key from its config.json,
    data.tokenizer = the directory, model.n_layers = its depth unless given. Returns the conflicts
    with keys the user gave (``given``: model keys; ``given_tokenizer``: data.tokenizer), if any."""
    ck = _checkpoint_config(cfg, source)
    conflicts = init_from_conflicts(cfg, given, given_tokenizer, ck, source)
    if not conflicts:
        n_layers = cfg.model.n_layers if "n_layers" in given else ck.n_layers
        cfg.model = dataclasses.replace(ck, n_layers=n_layers, init_std=cfg.model.init_std,
                                        init_from=cfg.model.init_from)
        cfg.data.tokenizer = cfg.model.init_from
    return conflicts


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (safe_load keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue  # merge keys (<<: *base) are resolved by flatten_mapping; complex keys left to YAML
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice (line {key_node.start_mark.line + 1})",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def override_key(item: str) -> str:
    """The key of one ``key=value`` override (``--set`` item), e.g. 'train.lr'."""
    return item.split("=", 1)[0].strip()


def load(path: str | Path | None, overrides: list[str] = (), init_from: str | None = None) -> RunConfig:
    """Read a YAML config (or the defaults if ``path`` is None) and apply ``key=value`` overrides, then
    ``init_from`` (the --init-from flag, which sets model.init_from)."""
    d: dict = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise UserError(f"config file {p} is a directory; give a YAML file (see configs/)")
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            d = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"config file {p} cannot be read ({e})")
        if not isinstance(d, dict):
            raise UserError(f"config file {p}: top level must be a mapping of sections "
                            f"(method, {', '.join(SECTIONS)}), got {_show(d)}")
    given: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. train.lr=1e-3")
        key, value = item.split("=", 1)
        if override_key(item) in given and given[override_key(item)] != value:  # which was meant? (as YAML refuses)
            raise UserError(f"--set {override_key(item)}: given twice ({given[override_key(item)]!r}, then {value!r}); "
                            f"give it once")
        given[override_key(item)] = value
        parts = key.strip().split(".")
        if len(parts) == 1 and parts[0] == "method":
            d["method"] = _Raw(value)
        elif len(parts) == 2:
            section = d.get(parts[0])
            if section is None:
                section = d[parts[0]] = {}
            if isinstance(section, dict):  # otherwise from_dict names the section that is not a mapping
                section[parts[1]] = _Raw(value)
        else:
            raise UserError(f"--set {item!r}: key must look like section.name, e.g. train.lr")
    if init_from is not None:
        if not isinstance(d.get("model", {}), dict):
            return from_dict(d)  # names the model section that is not a mapping
        d.setdefault("model", {})["init_from"] = init_from
        return from_dict(d, "--init-from")
    return from_dict(d)


def save(cfg: RunConfig, path: str | Path):
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# Keys that may differ when a run resumes: they change logging and bookkeeping, not the trajectory.
RESUME_SAFE_KEYS = {"train.eval_every", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                    "train.eval_tokens", "data.cache_dir", "train.host_allocator"}


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


_POSITIVE = (lambda v: v > 0, "must be positive")
_NON_NEGATIVE = (lambda v: v >= 0, "must be non-negative")
_UNIT = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
_UNIT_OPEN = (lambda v: 0 < v < 1, "must be in (0, 1)")
_UNIT_RIGHT_OPEN = (lambda v: 0 <= v < 1, "must be in [0, 1)")
_UNIT_LEFT_OPEN = (lambda v: 0 < v <= 1, "must be in (0, 1]")
# The range of every numeric field (None values of optional fields are not checked).
RANGES = {
    "model.rope_theta": _POSITIVE, "model.init_std": _POSITIVE,
    # RMSNorm divides by sqrt(mean(x**2) + eps): an eps near the activations' mean square stops it normalising
    "model.norm_eps": (lambda v: 0 < v < 1, "must be in (0, 1), e.g. 1e-5 as in LLaMA"),
    "data.val_fraction": _UNIT_OPEN, "data.max_train_tokens": _POSITIVE,
    "train.max_steps": _POSITIVE, "train.micro_batch": _POSITIVE, "train.grad_accum": _POSITIVE,
    "train.seq_len": _POSITIVE, "train.lr": _POSITIVE, "train.embedding_lr_scale": _POSITIVE,
    "train.min_lr_ratio": _UNIT,
    "train.warmup_steps": _NON_NEGATIVE, "train.weight_decay": _NON_NEGATIVE, "train.beta1": _UNIT_RIGHT_OPEN,
    "train.beta2": _UNIT_RIGHT_OPEN, "train.grad_clip": _NON_NEGATIVE,
    "train.seed": (lambda v: 0 <= v < 2**32, "must be in [0, 2**32)"),
    "train.eval_every": _NON_NEGATIVE, "train.eval_tokens": _POSITIVE, "train.checkpoint_every": _NON_NEGATIVE,
    "train.log_every": _POSITIVE, "train.keep_checkpoints": _POSITIVE, "train.max_grad_norm": _NON_NEGATIVE,
    "train.max_skipped": _NON_NEGATIVE, "sft.epochs": _POSITIVE, "sft.limit": _POSITIVE,
    "lora.rank": _POSITIVE, "lora.alpha": _POSITIVE, "lora.relora_interval": _NON_NEGATIVE,
    "lora.relora_warmup": _NON_NEGATIVE, "lora.reset_prune": _UNIT_OPEN, "lora.warm_start_fraction": _UNIT_RIGHT_OPEN,
    "galore.rank": _POSITIVE, "galore.update_proj_gap": _POSITIVE, "galore.scale": _POSITIVE,
    "apollo.rank": _POSITIVE, "apollo.update_proj_gap": _POSITIVE, "apollo.scale": _POSITIVE,
    "step.n_stages": _POSITIVE, "step.growth_fraction": _UNIT_LEFT_OPEN,
}
CHOICES = {
    "method": _METHODS, "train.dtype": ("auto", "bf16", "fp32"), "train.device": ("auto", "cpu", "cuda"),
    "train.parallel": ("ddp", "fsdp2"), "train.on_nonfinite": ("skip", "stop"),
    "train.host_allocator": ("retain", "system"),
    "lora.merge_rounding": ("nearest", "stochastic"), "galore.proj_type": ("std", "left", "right", "full"),
    "train.optimizer_states": OPTIMIZER_STATES, "train.master_weights": MASTER_WEIGHTS,
    "apollo.scale_type": ("channel", "tensor"),
    "step.init": INITS, "step.position": POSITIONS, "step.budget_match": ("flops", "steps"),
    "step.flops_convention": ("paper", "corrected"),
}


def _value_problem(key: str, v) -> str | None:
    """The range or choice problem of one type-checked value, if any."""
    if key in RANGES and v is not None and not RANGES[key][0](v):
        return f"{key}: {RANGES[key][1]}, got {v!r}"
    if key in CHOICES and v not in CHOICES[key]:
        return f"{key}: must be one of {', '.join(CHOICES[key])}, got {v!r}"
    return None


def _get(cfg: RunConfig, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def type_problems(cfg: RunConfig) -> list[str]:
    """Every value of ``cfg`` that does not match its field's annotation (``from_dict`` and ``load``
    refuse such values already; this covers configs built in code)."""
    out: list[str] = []
    check_value(cfg.method, str, "method", out)
    for name, cls in SECTIONS.items():
        section = getattr(cfg, name)
        if not isinstance(section, cls):
            out.append(f"{name}: must be a {cls.__name__}, got {_show(section)}")
            continue
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            check_value(getattr(section, f.name), hints[f.name], f"{name}.{f.name}", out)
    return out


def problems(cfg: RunConfig) -> list[str]:
    """Every problem in the config, each naming the key to change: wrong types first (nothing else
    is checked then), else ranges, choices and consistency."""
    out = type_problems(cfg)
    if out:
        return out
    out = list(cfg.model.problems())
    for key in {**RANGES, **CHOICES}:
        found = _value_problem(key, _get(cfg, key))
        if found:
            out.append(found)
    t, s, lo, m = cfg.train, cfg.step, cfg.lora, cfg.model
    if t.seq_len > m.max_seq_len > 0:
        out.append(f"train.seq_len: must be at most model.max_seq_len ({m.max_seq_len}), got {t.seq_len}")
    if cfg.sft.model is None and 0 < t.eval_tokens < t.seq_len:  # validation scores whole windows (SFT has none)
        out.append(f"train.eval_tokens: must be at least one window of train.seq_len ({t.seq_len}) tokens, "
                   f"got {t.eval_tokens}")
    ranks = {"lora.rank": lo.rank, "galore.rank": cfg.galore.rank, "apollo.rank": cfg.apollo.rank}
    for key in ("lora.rank", f"{cfg.method}.rank"):  # the projected methods' own rank, when they run
        rank = ranks.get(key)
        if rank is not None and rank > m.d_model > 0:  # past the full rank saves nothing (APOLLO's costs more)
            out.append(f"{key}: must be at most model.d_model ({m.d_model}), got {rank}")
    tok = cfg.data.tokenizer
    if tok.startswith("bpe:"):  # what data.load_tokenizer would refuse, found before training (plan too)
        n = tok[4:]
        if not n.isdigit():
            out.append(f"data.tokenizer: 'bpe:N' needs an integer N, got {tok!r}")
        elif int(n) < 300:
            out.append(f"data.tokenizer: bpe vocabulary must be at least 300 (256 bytes + merges), got {int(n)}")
        elif int(n) > m.vocab_size > 0 and not m.init_from:  # else found only after the whole corpus is tokenized
            out.append(f"model.vocab_size: {m.vocab_size} is below the {int(n)} tokens data.tokenizer {tok} trains; "
                       f"raise model.vocab_size or lower N")
    prec = Precision(t.optimizer_states, t.master_weights)
    if prec.optimizer_states in OPTIMIZER_STATES and prec.master_weights in MASTER_WEIGHTS:
        out += prec.problems()
    L = m.n_layers
    if s.n_stages > L > 0:
        out.append(f"step.n_stages: must be at most model.n_layers ({L}), got {s.n_stages}")
    if s.layers_per_stage is not None:
        lps = s.layers_per_stage
        if not all(n >= 1 for n in lps):
            out.append(f"step.layers_per_stage: must be a list of positive integers, got {lps!r}")
        else:
            if len(lps) != s.n_stages:
                out.append(f"step.layers_per_stage: needs step.n_stages ({s.n_stages}) entries, got {len(lps)}")
            if L > 0 and sum(lps) != L:
                out.append(f"step.layers_per_stage: must sum to model.n_layers ({L}), got {sum(lps)}")
    if cfg.method in _METHODS:
        out += _METHODS[cfg.method].problems(cfg)
    if m.init_from:
        # A config built in code must agree with the checkpoint on every architecture key.
        mine = init_from_conflicts(cfg, {f.name for f in dataclasses.fields(ModelConfig)}, True,
                                   _checkpoint_config(cfg, "model.init_from"))
        depth = init_depth(cfg)
        if not mine and isinstance(L, int) and L < depth:
            mine.append(f"model.n_layers: the final depth must be at least model.init_from {m.init_from}'s "
                        f"({depth}), got {L}")
        if not mine and not out and cfg.method in _METHODS:
            mine += _METHODS[cfg.method].init_problems(cfg, depth)
        out = mine + out
    return out


def validate(cfg: RunConfig):
    """Raise one UserError listing every problem (joined with '; ')."""
    found = problems(cfg)
    if found:
        raise UserError("; ".join(found))
