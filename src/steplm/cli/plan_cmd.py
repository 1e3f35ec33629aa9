"""`steplm plan`: the stage plan of a run config, or the Eq. 1-3 planner on a shape."""
from __future__ import annotations


import os
import sys
from pathlib import Path

from steplm.cli.args import (SHORT_FLAGS, add_config_flags, first_missing, flag_dest, int_up_to, path_arg, split_arg,
                             positive_float, remove_created)
from steplm.cli.train_cmd import load_config
from steplm.config.load import presets
from steplm.config.presets import preset_names
from steplm.config.schema import TrainConfig
from steplm.config.validate import config_error
from steplm.errors import UserError
from steplm.io.files import dumps
from steplm.plan import memory, solve

# the config key each of the calculator's flags sets, for the config's messages (model.max_seq_len and
# data.tokenizer follow --seq-len and --vocab-size)
CALCULATOR_FLAGS = {"model.d_model": "--hidden", "model.n_layers": "--layers", "step.n_stages": "--stages",
                    "lora.rank": "--lora-rank", "step.layers_per_stage": "--layers-per-stage",
                    "model.ffn_hidden": "--ffn-hidden", "model.n_heads": "--n-heads", "model.head_dim": "--head-dim",
                    "model.n_kv_heads": "--n-kv-heads", "step.cap_growth": "--cap-growth",
                    "model.vocab_size": "--vocab-size", "data.tokenizer": "--vocab-size", "train.seq_len": "--seq-len",
                    "model.max_seq_len": "--seq-len", "train.micro_batch": "--micro-batch",
                    "train.optimizer_states": "--optimizer-states", "train.master_weights": "--master-weights"}
# plan's own flags that, with a CONFIG, set the config key of the same meaning
CONFIG_KEY_FLAGS = {"--micro-batch": ("train.micro_batch", {}), "--seq-len": ("train.seq_len", {}),
                    "--vocab-size": ("model.vocab_size", {})}


def _plan_config(a):
    """`steplm plan CONFIG.yaml [--set ...]`: the whole StagePlan of a run config, before training."""
    from steplm.plan.stages import format_plan, plan_run

    shape_flags = [f for f in ("preset", "hidden", "layers", "stages", "lora_rank", "layers_per_stage", "ffn_hidden",
                               "n_heads", "n_kv_heads", "head_dim", "budget_gb", "optimizer_states", "master_weights", "cap_growth",
                               "extended", "states_only", "checkpointing", "write_config", "force")
                   if getattr(a, f)]
    if shape_flags:
        flag = "--" + shape_flags[0].replace("_", "-")
        raise UserError("not used with a CONFIG; change the config with --set (e.g. --set model.n_layers=24)",
                        key=flag)
    # the flags that describe a step set the config's keys, as train's --micro-batch does
    for flag in CONFIG_KEY_FLAGS:
        setattr(a, flag_dest(flag), getattr(a, flag.lstrip("-").replace("-", "_")))
    cfg = load_config(a, CONFIG_KEY_FLAGS)  # the config train would run, from the same flags
    try:
        plan = plan_run(cfg)
    except ValueError as e:
        raise UserError(f"step.layers_per_stage: {e}")
    data = None
    if cfg.data.path:  # what train would read, as far as it is known without tokenizing
        from steplm.data.report import describe_planned
        from steplm.data.shards import default_cache_dir
        data = describe_planned(cfg.data, Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir())
    if a.json:  # the data line under "data" (null without data.path), as the table prints it
        print(dumps({**plan.to_dict(), "data": data.removeprefix("data: ") if data else None}))
        return
    print(format_plan(plan, [data] if data else []))


def _check_plan_flags(a) -> None:
    """Refuse flags that the plan they are given with would not read, or that contradict each other;
    warn about one that only repeats the default (--extended in budget mode, --states-only outside it)."""
    if a.budget_gb is not None:  # budget mode finds the depth and split itself
        for flag, value in (("--layers", a.layers), ("--layers-per-stage", a.layers_per_stage)):
            if value:
                raise UserError("not used with --budget-gb, which finds the deepest model that fits", key=flag)
    if a.states_only and a.extended:
        raise UserError("--states-only: counts the layer states alone, and --extended adds the rest; give one of them")
    if a.states_only and a.budget_gb is None:
        print("steplm: warning: --states-only: a plan without --budget-gb counts the layer states alone anyway; "
              "drop it", file=sys.stderr)
    if a.extended and a.budget_gb is not None:
        print("steplm: warning: --extended: --budget-gb counts the whole training step by default; drop it",
              file=sys.stderr)
    if not _whole_step(a) and not (a.write_config and not a.states_only):  # a written config takes them too
        why = "which --states-only leaves out" if a.states_only else "which only --extended (or --budget-gb) adds"
        for flag, value in (("--vocab-size", a.vocab_size), ("--seq-len", a.seq_len), ("--micro-batch", a.micro_batch),
                            ("--checkpointing", a.checkpointing)):
            if value:
                raise UserError(f"describes the embeddings, head and activations, {why}"
                                + ("" if a.states_only else "; give --extended too"), key=flag)


def _whole_step(a) -> bool:
    """Whether the plan counts the whole training step (layer states, embeddings, head and norm
    states, activations): with --extended, and in budget mode unless --states-only."""
    return bool(a.extended or (a.budget_gb is not None and not a.states_only))


def _paper_shape(size: str) -> dict:
    """The shape keys of the preset ``paper-SIZE`` (configs/paper-*.yaml, the paper's Table 1 rows):
    d, L, K, r and the heads; the presets are the YAML files, read here without torch. Its
    ffn_hidden is not read: the calculator's SwiGLU width is exactly 8/3·d (Eq. 4) unless given."""
    import yaml

    from steplm.config.presets import resolve_config

    c = yaml.safe_load(resolve_config(f"paper-{size}").read_text())
    m = c["model"]
    return {"hidden": m["d_model"], "layers": m["n_layers"], "stages": c["step"]["n_stages"],
            "lora_rank": c["lora"]["rank"], "n_heads": m.get("n_heads"), "n_kv_heads": m.get("n_kv_heads")}


def default_heads(d: int) -> int:
    """The calculator's head count without --n-heads: the widest even head size of at most 128 that
    divides d (d / 128 heads where 128 divides d, as in LLaMA). Raises UserError for an odd d, which
    no head count splits into the even head sizes RoPE needs."""
    heads = next((d // size for size in range(min(128, d), 1, -1) if size % 2 == 0 and d % size == 0), None)
    if heads is None:
        raise UserError(f"must be even: RoPE needs attention heads of even size, and no head count splits an odd "
                        f"width into them; got {d}", key="--hidden")
    return heads


def _from_preset(a) -> None:
    """Fill the flags the user left out from ``--preset`` (its configs/paper-*.yaml), recording which
    in ``a.preset_filled``: d, the rank, L (not in budget mode, which finds it), K (unless
    --stages or --layers-per-stage says it), and the rank and heads only at the preset's own width."""
    p = _paper_shape(a.preset)
    fill = {"hidden": p["hidden"]}
    if a.budget_gb is None:
        fill["layers"] = p["layers"]
    if not a.layers_per_stage:
        fill["stages"] = p["stages"]
    if a.hidden in (None, p["hidden"]):  # what belongs to the preset's width
        fill.update(lora_rank=p["lora_rank"], n_heads=p["n_heads"], n_kv_heads=p["n_kv_heads"])
    a.preset_filled = {name for name, value in fill.items() if value and not getattr(a, name)}
    for name in a.preset_filled:
        setattr(a, name, fill[name])


def _keys(a, heads: int, prec: memory.Precision) -> dict[str, object]:
    """The config keys (dotted) that the calculator's flags describe: the shape, the split, the
    precision, and for the activations micro-batch and sequence length. In budget mode, which finds
    the depth itself, the depth is a placeholder that the stage count fits."""
    split = a.layers_per_stage  # a list (split_arg) or None
    stages = a.stages or (len(split) if split else 2)
    keys = {"method": "step" if stages > 1 else "vanilla", "model.vocab_size": a.vocab_size, "model.d_model": a.hidden,
            "model.n_layers": stages if a.budget_gb is not None else a.layers or stages, "model.n_heads": heads,
            "model.max_seq_len": a.seq_len, "train.micro_batch": a.micro_batch, "train.seq_len": a.seq_len,
            "train.activation_checkpointing": bool(a.checkpointing),
            "lora.rank": a.lora_rank, "step.n_stages": stages, "step.cap_growth": bool(a.cap_growth),
            "train.optimizer_states": prec.optimizer_states, "train.master_weights": prec.master_weights}
    if a.seq_len > TrainConfig.eval_tokens:  # validation must hold at least one window
        keys["train.eval_tokens"] = a.seq_len
    for key, value in (("model.ffn_hidden", a.ffn_hidden), ("model.n_kv_heads", a.n_kv_heads),
                       ("model.head_dim", a.head_dim), ("step.layers_per_stage", split)):
        if value:
            keys[key] = value
    if a.write_config:  # the tokenizer a written config trains; the calculator itself needs none
        keys["data.tokenizer"] = "gpt2" if a.vocab_size >= 50257 else f"bpe:{a.vocab_size}"
    return keys


def _nested(keys: dict[str, object]) -> dict:
    """{'model.d_model': 64} as {'model': {'d_model': 64}}, the form of a config file."""
    nested: dict = {}
    for key, value in keys.items():
        section, _, name = key.rpartition(".")
        (nested.setdefault(section, {}) if section else nested)[name] = value
    return nested


def _flag_names(a) -> dict[str, str]:
    """Each config key as the calculator's flag that set it, saying where a value the user did not
    type came from: ``--hidden (from --preset 368m)``, ``--stages (default 2)``, or the split's length."""
    names = dict(CALCULATOR_FLAGS)
    for key, flag in CALCULATOR_FLAGS.items():
        if flag.lstrip("-").replace("-", "_") in getattr(a, "preset_filled", ()):
            names[key] = f"{flag} (from --preset {a.preset})"
    if a.stages is None:
        names["step.n_stages"] = "the length of --layers-per-stage" if a.layers_per_stage else "--stages (default 2)"
    return names


def _check_as_config(a, keys: dict[str, object]) -> None:
    """Validate the calculator's shape as `train` validates a config: build the RunConfig the flags
    describe and raise the config's own problems, each key shown as the flag that set it."""
    from steplm.config.load import from_dict
    from steplm.config.validate import problems

    found = problems(from_dict(_nested(keys)))
    if found:
        names = _flag_names(a)
        if not a.head_dim and any(p.startswith("model.head_dim:") for p in found):  # d / heads, not a flag typed
            names["model.head_dim"] = "the head size --hidden / --n-heads"
        a.names = {**getattr(a, "names", {}), **names}
        raise config_error(found)


def _shape(a, prec: memory.Precision) -> tuple[memory.LayerShape, int, int | None, int | None]:
    """The planner's block shape from the flags (preset and defaults filled into ``a``), checked by
    the config's validation; the head count the activations use, and the query and key/value widths
    (None: d, as in the paper's block)."""
    from steplm.config.schema import default_ffn_hidden

    if a.preset:
        _from_preset(a)
    if not a.hidden:
        raise UserError("--hidden: give the hidden size d (or --preset)")
    if a.budget_gb is None and not a.layers:  # before the config check, whose depth would be a placeholder
        raise UserError("--layers: give the total layer count L (or --preset, or --budget-gb)")
    for flag, value, why in (("--n-kv-heads", a.n_kv_heads, "the key/value heads group the query heads"),
                             ("--head-dim", a.head_dim, "q is --n-heads x --head-dim wide")):
        if value and not a.n_heads:  # the calculator's default head count is a guess, not a shape to build on
            raise UserError(f"give --n-heads too ({why})", key=flag)
    a.lora_rank = a.lora_rank or min(128, a.hidden)
    heads = a.n_heads or default_heads(a.hidden)
    _check_as_config(a, _keys(a, heads, prec))
    head = a.head_dim or a.hidden // heads
    q = heads * a.head_dim if a.head_dim else None
    kv = a.n_kv_heads * head if a.n_kv_heads else q
    if a.write_config and not a.ffn_hidden:  # the written model's SwiGLU width, so its plan is this one
        a.ffn_hidden = default_ffn_hidden(a.hidden)
    shape = memory.LayerShape(a.hidden, a.ffn_hidden, kv, q)
    try:  # d and the FFN are bounded by their flags; only heads x --head-dim can pass the planner's bound
        solve.check_shape(shape)
    except ValueError:
        raise UserError(f"--n-heads x --head-dim ({q:,}) must be at most {solve.MAX_WIDTH:,} (the planner's "
                        f"bound on a width)", key="--head-dim")
    return shape, heads, q, kv


def _solve(a, shape, prec, extra, search: bool, search_stages: bool) -> solve.Plan:
    """The plan the flags ask for: the deepest fit of --budget-gb (over every precision and stage count
    when not given), the Eq. 3 optimum of --layers, or --layers-per-stage evaluated."""
    if a.budget_gb is not None and (search or search_stages):
        return solve.deepest_over(
            a.budget_gb * memory.GB, list(range(1, solve.MAX_SEARCH_STAGES + 1)) if search_stages else [a.stages],
            memory.PRECISIONS if search else [prec], shape, a.lora_rank, a.cap_growth, extra)
    if a.budget_gb is not None:
        return solve.deepest_within(a.budget_gb * memory.GB, a.stages, shape, a.lora_rank, a.cap_growth,
                                    lambda L: extra(L, prec), prec=prec)
    if not a.layers_per_stage:
        return solve.optimize(a.layers, a.stages, shape, a.lora_rank, a.cap_growth, prec)
    split = a.layers_per_stage  # its entries, count and sum are checked as the config's
    if len(split) > solve.MAX_STAGES:
        raise UserError(f"--layers-per-stage: at most {solve.MAX_STAGES} stages (the planner's bound), "
                        f"got {len(split)}")
    return solve.evaluate_split(split, shape, a.lora_rank, prec)


def _extend(plan: solve.Plan, a, prec: memory.Precision, activations) -> None:
    """Fill plan.extended: embeddings/head/norm states, activations at the final depth, and the peak of
    a training step at the largest stage (``memory.step_peak_bytes``)."""
    L = sum(plan.layers_per_stage)
    head = memory.head_state_bytes(a.vocab_size, a.hidden, prec=prec)
    plan.extended = {
        "embedding_head_norm_bytes": head,
        "activation_bytes": activations(L),
        "activation_formula": "steplm's graph, fp32: per token and layer (6d+3q+2kv+4f)*4 + (2+heads)*4 "
                              "(d*4 with checkpointing, plus one layer); head: d*4 per token + 4*V*d + "
                              "3 fp32 logits chunks (memory.activation_bytes)",
    }
    i = plan.stage_bytes.index(plan.peak_bytes)  # the largest stage
    depth, before = plan.cumulative_layers[i], plan.cumulative_layers[i] - plan.layers_per_stage[i]
    trainable = plan.layers_per_stage[i] * plan.params_per_layer + before * plan.lora_params_per_layer
    grad = 2 if prec.master_weights == "bf16" else 4  # bytes of one gradient element
    head_params = 2 * a.vocab_size * a.hidden + a.hidden
    plan.extended["peak_bytes"] = memory.step_peak_bytes(
        plan.peak_bytes + head, grad * (trainable + head_params), grad * a.vocab_size * a.hidden, activations(depth))


def _budget(plan: solve.Plan, a, search: bool, search_stages: bool) -> dict:
    """What budget mode counted against --budget-gb, and what it chose itself (bytes)."""
    layers, whole = plan.peak_bytes, _whole_step(a)
    head = plan.extended["embedding_head_norm_bytes"] if whole else 0
    acts = plan.extended["activation_bytes"] if whole else 0
    return {"budget_bytes": a.budget_gb * memory.GB, "counts": "layer states" if not whole else "whole training step",
            "layer_state_bytes": layers, "embedding_head_norm_bytes": head, "activation_bytes": acts,
            "counted_bytes": layers + head + acts, "precision_chosen": search, "stages_chosen": search_stages}


def cmd_plan(a):
    if a.config or any(v is not None for k, v in vars(a).items() if k.startswith(("cfg:", "short:")) or k == "set"):
        # like `train`, any config key alone starts from the default config
        return _plan_config(a)
    search = a.budget_gb is not None and not a.optimizer_states and not a.master_weights
    search_stages = a.budget_gb is not None and not a.stages and not a.preset
    _check_plan_flags(a)
    a.vocab_size, a.seq_len, a.micro_batch = a.vocab_size or 50257, a.seq_len or 1024, a.micro_batch or 1
    states = a.optimizer_states or ("bf16" if a.master_weights == "bf16" else "fp32")
    prec = memory.Precision(states, a.master_weights or "fp32")
    shape, heads, q, kv = _shape(a, prec)  # checked as the config train would run (precision included)
    a.stages = a.stages or 2

    def activations(L):
        return memory.activation_bytes(L, a.hidden, heads, a.seq_len, a.micro_batch, a.vocab_size, a.checkpointing,
                                        ffn_hidden=a.ffn_hidden, q_dim=q, kv_dim=kv)

    def extra(L, prec):
        """Bytes beyond the layers' model states that the budget must also fit (the whole step)."""
        return memory.head_state_bytes(a.vocab_size, a.hidden, prec=prec) + activations(L) if _whole_step(a) else 0

    if a.budget_gb is not None and _whole_step(a) and min(extra(1, p) for p in (memory.PRECISIONS if search else [prec])) \
            > a.budget_gb * memory.GB:
        raise UserError(f"--budget-gb: the embeddings, head and activations alone need more than {a.budget_gb:g} GB at "
                        f"--vocab-size {a.vocab_size}, --seq-len {a.seq_len}, --micro-batch {a.micro_batch}; lower "
                        f"them, or count the layer states alone with --states-only")
    try:
        plan = _solve(a, shape, prec, extra, search, search_stages)
    except ValueError as e:
        raise UserError(f"{'--budget-gb' if a.budget_gb is not None else '--layers-per-stage'}: {e}")
    prec = memory.Precision(plan.optimizer_states, plan.master_weights)
    if _whole_step(a):
        _extend(plan, a, prec, activations)
    if a.budget_gb is not None:
        plan.budget = _budget(plan, a, search, search_stages)
    written = _write_config(a, plan, heads) if a.write_config else None
    if a.json:
        print(dumps(plan.to_dict()))
    else:
        _print_plan(a, plan, written, heads, q, kv)


def _config_of(a, plan: solve.Plan, heads: int) -> dict[str, object]:
    """The config keys (dotted) of a run that trains this plan: the flags' keys (``_keys``, which
    `_shape` validated) with the plan's depth, split and precision; one stage trains as vanilla."""
    K = len(plan.layers_per_stage)
    keys = _keys(a, heads, memory.Precision(plan.optimizer_states, plan.master_weights))
    keys.update({"method": "step" if K > 1 else "vanilla", "model.n_layers": sum(plan.layers_per_stage),
                 "model.ffn_hidden": a.ffn_hidden, "step.n_stages": K, "step.layers_per_stage": list(plan.layers_per_stage)})
    return keys if K > 1 else {k: v for k, v in keys.items() if not k.startswith("step.")}


def _write_config(a, plan: solve.Plan, heads: int) -> Path:
    """Write the plan as a run config to --write-config (refusing an existing file without --force),
    checked by loading it back as `train` would: it validates and plans to the same split. Returns the path."""
    import yaml

    from steplm import config as config_mod

    path = Path(a.write_config)
    if path.is_dir():
        raise UserError(f"--write-config: {path} is a directory; give a file path")
    if path.exists() and not a.force:
        raise UserError(f"--write-config: {path} exists; give --force to overwrite it, or another path")
    nested = _nested(_config_of(a, plan, heads))
    created = first_missing(path.parent)  # made here, as train and export make their folders; undone on failure
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"--write-config: a part of {path.parent} is a file, not a folder")
    fit = (f", the deepest that fits {a.budget_gb:g} GB ({plan.budget['counts']})" if plan.budget else "")
    text = (f"# Written by steplm plan --write-config: layers per stage {plan.layers_per_stage}{fit}; optimizer "
            f"states {plan.optimizer_states}, master weights {plan.master_weights}.\n# Every key not here is the "
            f"default; train it with: steplm train {path} --data PATH --out DIR\n" + yaml.safe_dump(nested, sort_keys=False))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        cfg = config_mod.load(tmp)
        config_mod.validate(cfg)
        from steplm.plan.stages import plan_run
        if plan_run(cfg).layers_per_stage != plan.layers_per_stage:
            raise RuntimeError(f"the written config plans {plan_run(cfg).layers_per_stage}, not {plan.layers_per_stage}")
        os.replace(tmp, path)
    except BaseException:
        if created is not None:
            remove_created(path.parent, created)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _print_plan(a, plan: solve.Plan, written, heads: int, q: int | None, kv: int | None) -> None:
    """The plan as text: the shape (with the attention heads, and the query and key/value widths
    where they are not d), the precision (and whether budget mode chose it), one row per stage,
    vanilla, and the extended and budget lines."""
    gb, unit = (memory.GB, "GB") if plan.vanilla_bytes >= memory.GB else (1e6, "MB")
    b = plan.budget or {}
    chose_k = " (chosen: K = 1 to %d searched; --stages fixes it)" % solve.MAX_SEARCH_STAGES if b.get("stages_chosen") else ""
    ffn = f" f={a.ffn_hidden}" if a.ffn_hidden else ""
    attn = f" heads={heads}" + (f" q={q}" if q and q != a.hidden else "") + (f" kv={kv}" if kv and kv != a.hidden else "")
    print(f"d={a.hidden}{ffn}{attn} L={sum(plan.layers_per_stage)} K={len(plan.layers_per_stage)}{chose_k} "
          f"r={a.lora_rank}  P={plan.params_per_layer:,} E={plan.lora_params_per_layer:,}  solver: {plan.solver}")
    how = (" (chosen: the deepest fit over every supported precision, the most precise on a tie; "
           "--optimizer-states and --master-weights fix them)" if b.get("precision_chosen") else "")
    print(f"optimizer states {plan.optimizer_states}, master weights {plan.master_weights}{how}")
    print(f"{'stage':>5} {'new':>4} {'layers':>6} {unit + ' (Eq. 2)':>11}")
    for i, (n, N, sb) in enumerate(zip(plan.layers_per_stage, plan.cumulative_layers, plan.stage_bytes), 1):
        print(f"{i:>5} {n:>4} {N:>6} {sb / gb:>11.2f}")
    print(f"peak {plan.peak_bytes / gb:.2f} {unit} vs vanilla {plan.vanilla_bytes / gb:.2f} {unit} "
          f"(reduction {100 * plan.reduction:.1f} %)")
    if plan.tied_optima_truncated:
        print(f"tied optima: more than {len(plan.tied_optima)} (--json lists the first {len(plan.tied_optima)})")
    elif len(plan.tied_optima) > 1:
        print(f"tied optima: {plan.tied_optima}")
    if plan.capped_at_layers:
        print(f"capped: the budget fits at least {plan.capped_at_layers} layers, the planner's bound; "
              f"the plan stops there")
    if plan.extended:
        e = plan.extended
        print(f"extended: embeddings/head/norm states {e['embedding_head_norm_bytes'] / gb:.2f} {unit}, activations "
              f"{e['activation_bytes'] / gb:.2f} {unit} (micro-batch {a.micro_batch} x {a.seq_len} tokens, "
              f"V {a.vocab_size}{', checkpointing' if a.checkpointing else ''}); peak of a training step "
              f"{e['peak_bytes'] / gb:.2f} {unit}")
    if b:
        parts = f"layer states {b['layer_state_bytes'] / gb:.2f}"
        if b["counts"] != "layer states":
            parts += (f" + embeddings/head/norm {b['embedding_head_norm_bytes'] / gb:.2f} + activations "
                      f"{b['activation_bytes'] / gb:.2f}")
        other = ("--states-only counts the layer states alone" if b["counts"] != "layer states" else
                 "without --states-only the whole training step is counted")
        print(f"budget: {parts} = {b['counted_bytes'] / gb:.2f} {unit} counted against {a.budget_gb:g} GB "
              f"({b['counts']}; {other})")
    if written:
        print(f"config written to {written} (steplm train {written} --data PATH; steplm plan {written})")


def add_parsers(sub) -> None:
    pl = sub.add_parser("plan", help="STEP memory planner (paper Eq. 1-5, Eq. 3 ILP); with CONFIG, a run's stage plan")
    pl.add_argument("config", nargs="?", help=f"a run config (a YAML file, or a preset's name: {presets()}): print "
                    "its stage plan (a dry run of `train`)")
    pl.add_argument("--preset", choices=[n.removeprefix("paper-") for n in preset_names() if n.startswith("paper-")],
                    help="a model size of the paper's Table 1 (its d, L, K, rank and heads, from "
                    "configs/paper-SIZE.yaml; a flag given overrides its part)")
    width, big = int_up_to(solve.MAX_WIDTH), int_up_to(1 << 30, "a sanity bound")
    pl.add_argument("--hidden", type=width, help="d")
    pl.add_argument("--layers", type=int_up_to(solve.MAX_LAYERS), help="final layer count L")
    pl.add_argument("--stages", type=int_up_to(solve.MAX_STAGES), help="K (default 2)")
    pl.add_argument("--lora-rank", type=width, help="r (default min(128, d), the paper's rank)")
    pl.add_argument("--layers-per-stage", type=split_arg, help="evaluate this split instead of optimising, e.g. 7,5")
    pl.add_argument("--ffn-hidden", type=width, help="SwiGLU width (default: exactly 8/3·d, the paper's Eq. 4)")
    pl.add_argument("--n-heads", type=width, help="attention heads (for GQA and activations)")
    pl.add_argument("--n-kv-heads", type=width, help="key/value heads (GQA; needs --n-heads, or a preset's)")
    pl.add_argument("--head-dim", type=width, help="width of one head (default d / --n-heads; needs --n-heads, or a preset's), as "
                    "HF's head_dim: q is --n-heads x --head-dim wide")
    pl.add_argument("--cap-growth", action="store_true", help="require n_(i+1) <= N_i")
    pl.add_argument("--budget-gb", type=positive_float, help="deepest model whose training step fits this many GB "
                    "(1e9 B): the largest stage's layer states plus embeddings, head, norms and activations (see "
                    f"--states-only); stops at {solve.MAX_LAYERS} layers and says so")
    pl.add_argument("--extended", action="store_true", help="add embeddings, head, norms and activations (what "
                    "--budget-gb counts by default)")
    pl.add_argument("--states-only", action="store_true", help="with --budget-gb: count the layers' model states "
                    "alone (Eq. 1-3), not the whole training step")
    pl.add_argument("--write-config", type=path_arg, metavar="PATH", help="write the plan as a run config (YAML) "
                    "that `steplm train PATH --data ...` trains and `steplm plan PATH` plans the same")
    pl.add_argument("--force", action="store_true", help="let --write-config overwrite an existing file")
    pl.add_argument("--optimizer-states", choices=memory.OPTIMIZER_STATES,
                    help="AdamW moments (default fp32; with --budget-gb and no value: search every supported "
                         "precision, and every K from 1 to %d without --stages; the output says what it chose)"
                         % solve.MAX_SEARCH_STAGES)
    pl.add_argument("--master-weights", choices=memory.MASTER_WEIGHTS,
                    help="trainable weights and gradients (default fp32, or bf16 with --optimizer-states bf16)")
    pl.add_argument("--vocab-size", type=big, help="V, for embeddings and head (with --budget-gb or --extended; "
                    "default 50257, GPT-2's)")
    pl.add_argument("--seq-len", type=big, help="tokens per sequence (activations, with --budget-gb or --extended; "
                    "default 1024)")
    pl.add_argument("--micro-batch", type=big, help="sequences per forward (activations, with --budget-gb or "
                    "--extended; default 1)")
    pl.add_argument("--checkpointing", action="store_true", help="activation checkpointing (extended model)")
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    # with CONFIG (or any config key): every flag train takes, so that plan is train's dry run
    add_config_flags(pl, {f: v for f, v in SHORT_FLAGS.items() if f != "--micro-batch"})
    pl.set_defaults(fn=cmd_plan)
