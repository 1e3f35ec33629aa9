"""`steplm plan`: the stage plan of a run config, or the Eq. 1-3 planner on a shape."""
from __future__ import annotations


from steplm.cli.args import SHORT_FLAGS, add_config_flags, int_up_to, positive_float
from steplm.cli.train_cmd import load_config
from steplm.config.load import presets
from steplm.errors import UserError
from steplm.io.files import dumps
from steplm.plan import memory, solve


def _plan_config(a):
    """`steplm plan CONFIG.yaml [--set ...]`: the whole StagePlan of a run config, before training."""
    from steplm.plan.stages import format_plan, plan_run

    shape_flags = [f for f in ("preset", "hidden", "layers", "stages", "lora_rank", "layers_per_stage", "ffn_hidden",
                               "n_heads", "n_kv_heads", "budget_gb", "optimizer_states", "master_weights", "cap_growth",
                               "extended", "vocab_size", "seq_len", "micro_batch", "checkpointing")
                   if getattr(a, f)]
    if shape_flags:
        flag = "--" + shape_flags[0].replace("_", "-")
        raise UserError(f"{flag}: not used with a CONFIG; change the config with --set (e.g. --set model.n_layers=24)")
    cfg = load_config(a)  # the config train would run, from the same flags
    try:
        plan = plan_run(cfg)
    except ValueError as e:
        raise UserError(f"step.layers_per_stage: {e}")
    print(dumps(plan.to_dict()) if a.json else format_plan(plan))


def _split(text: str) -> list[int]:
    """--layers-per-stage '7,5' as [7, 5]."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--layers-per-stage: expected comma-separated integers, got {text!r}")


def _check_plan_flags(a) -> None:
    """Refuse flags that the plan they are given with would not read: each would change nothing."""
    if a.budget_gb is not None:  # budget mode finds the depth and split itself
        for flag, value in (("--layers", a.layers), ("--layers-per-stage", a.layers_per_stage)):
            if value:
                raise UserError(f"{flag}: not used with --budget-gb, which finds the deepest model that fits")
    if not a.extended:
        for flag, value in (("--vocab-size", a.vocab_size), ("--seq-len", a.seq_len), ("--micro-batch", a.micro_batch),
                            ("--checkpointing", a.checkpointing)):
            if value:
                raise UserError(f"{flag}: describes the embeddings, head and activations, which only --extended "
                                f"adds; give --extended too")
    if a.layers_per_stage:
        split = _split(a.layers_per_stage)
        if a.stages and len(split) != a.stages:
            raise UserError(f"--stages: {a.stages} stages, but --layers-per-stage lists {len(split)}")
        if a.cap_growth:
            grown = [i for i in range(1, len(split)) if split[i] > sum(split[:i])]
            if grown:
                raise UserError(f"--layers-per-stage: stage {grown[0] + 1} adds {split[grown[0]]} layers to "
                                f"{sum(split[:grown[0]])}, more than --cap-growth allows (n_(i+1) <= N_i)")


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
    if prec.problems():
        flag = "--" + prec.problems()[0].split(":")[0].split(".")[1].replace("_", "-")
        raise UserError(f"{flag}: {prec.problems()[0].split(': ', 1)[1]}")
    if a.preset:
        p = memory.PRESETS[a.preset]
        a.hidden = a.hidden or p["d_model"]
        a.layers = a.layers or p["n_layers"]
        a.stages = a.stages or p["n_stages"]
        a.lora_rank = a.lora_rank or p["lora_rank"]
    a.stages = a.stages or 2
    if not a.hidden:
        raise UserError("--hidden: give the hidden size d (or --preset)")
    a.lora_rank = a.lora_rank or min(128, a.hidden)
    if a.lora_rank > a.hidden:
        raise UserError(f"--lora-rank: must be at most --hidden ({a.hidden}), got {a.lora_rank}")
    if a.n_heads and a.hidden % a.n_heads:  # the same shapes `train` takes (model.d_model, model.head_dim)
        raise UserError(f"--n-heads: must divide --hidden ({a.hidden}), got {a.n_heads}")
    if a.n_heads and (a.hidden // a.n_heads) % 2:
        raise UserError(f"--n-heads: the head size --hidden / --n-heads = {a.hidden // a.n_heads} must be even for "
                        f"RoPE, got {a.n_heads} heads")
    kv = None
    if a.n_kv_heads:
        if not a.n_heads or a.hidden % a.n_heads or a.n_heads % a.n_kv_heads:
            raise UserError("--n-kv-heads: needs --n-heads dividing --hidden and divisible by --n-kv-heads")
        kv = a.n_kv_heads * (a.hidden // a.n_heads)
    shape = memory.LayerShape(a.hidden, a.ffn_hidden, kv)
    heads = a.n_heads or max(1, a.hidden // 128)

    def extra(L, prec=prec):
        """Bytes beyond the layers' model states that --budget-gb must also fit (--extended)."""
        if not a.extended:
            return 0
        return memory.head_state_bytes(a.vocab_size, a.hidden, prec=prec) + activations(L)

    def activations(L):
        return memory.activation_bytes(L, a.hidden, heads, a.seq_len, a.micro_batch, a.vocab_size, a.checkpointing,
                                        ffn_hidden=a.ffn_hidden, kv_dim=kv)
    try:
        if a.budget_gb is not None and (search or search_stages):
            plan = solve.deepest_over(
                a.budget_gb * memory.GB,
                list(range(1, solve.MAX_SEARCH_STAGES + 1)) if search_stages else [a.stages],
                memory.PRECISIONS if search else [prec], shape, a.lora_rank, a.cap_growth, extra)
            prec = memory.Precision(plan.optimizer_states, plan.master_weights)
        elif a.budget_gb is not None:
            plan = solve.deepest_within(a.budget_gb * memory.GB, a.stages, shape, a.lora_rank, a.cap_growth, extra,
                                          prec=prec)
        else:
            if not a.layers:
                raise UserError("--layers: give the total layer count L (or --preset, or --budget-gb)")
            if a.stages > a.layers:
                raise UserError(f"--stages: must be at most --layers ({a.layers}), got {a.stages}")
            if a.layers_per_stage:
                split = _split(a.layers_per_stage)
                if len(split) > solve.MAX_STAGES:
                    raise UserError(f"--layers-per-stage: at most {solve.MAX_STAGES} stages (the planner's bound), "
                                    f"got {len(split)}")
                if any(n < 1 for n in split):
                    raise UserError("--layers-per-stage: every stage needs at least one layer")
                if sum(split) != a.layers:
                    raise UserError(f"--layers-per-stage: must sum to --layers ({a.layers}), got {sum(split)}")
                plan = solve.evaluate_split(split, shape, a.lora_rank, prec)
            else:
                plan = solve.optimize(a.layers, a.stages, shape, a.lora_rank, a.cap_growth, prec)
    except ValueError as e:
        flag = "--budget-gb" if a.budget_gb is not None else "--layers-per-stage"
        raise UserError(f"{flag}: {e}")
    if a.extended:
        L = sum(plan.layers_per_stage)
        plan.extended = {
            "embedding_head_norm_bytes": memory.head_state_bytes(a.vocab_size, a.hidden, prec=prec),
            "activation_bytes": activations(L),
            "activation_formula": "steplm's graph, fp32: per token and layer (6d+3q+2kv+4f)*4 + (2+heads)*4 "
                                  "(d*4 with checkpointing, plus one layer); head: d*4 per token + 4*V*d + "
                                  "3 fp32 logits chunks (memory.activation_bytes)",
        }
        i = plan.stage_bytes.index(plan.peak_bytes)  # the largest stage
        depth, before = plan.cumulative_layers[i], plan.cumulative_layers[i] - plan.layers_per_stage[i]
        trainable = plan.layers_per_stage[i] * plan.params_per_layer + before * plan.lora_params_per_layer
        head = plan.extended["embedding_head_norm_bytes"]
        plan.extended["activation_bytes"] = activations(depth)
        grad = 2 if prec.master_weights == "bf16" else 4  # bytes of one gradient element
        head_params = 2 * a.vocab_size * a.hidden + a.hidden
        plan.extended["peak_bytes"] = memory.step_peak_bytes(
            plan.peak_bytes + head, grad * (trainable + head_params), grad * a.vocab_size * a.hidden,
            activations(depth))
    if a.json:
        print(dumps(plan.to_dict()))
        return
    gb, unit = (memory.GB, "GB") if plan.vanilla_bytes >= memory.GB else (1e6, "MB")
    print(f"d={a.hidden} L={sum(plan.layers_per_stage)} K={len(plan.layers_per_stage)} r={a.lora_rank}  "
          f"P={plan.params_per_layer:,} E={plan.lora_params_per_layer:,}  solver: {plan.solver}")
    print(f"optimizer states {plan.optimizer_states}, master weights {plan.master_weights}")
    print(f"{'stage':>5} {'new':>4} {'layers':>6} {unit + ' (Eq. 2)':>11}")
    for i, (n, N, b) in enumerate(zip(plan.layers_per_stage, plan.cumulative_layers, plan.stage_bytes), 1):
        print(f"{i:>5} {n:>4} {N:>6} {b / gb:>11.2f}")
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
              f"{e['activation_bytes'] / gb:.2f} {unit}; peak of a training step {e['peak_bytes'] / gb:.2f} {unit}")


def add_parsers(sub) -> None:
    pl = sub.add_parser("plan", help="STEP memory planner (paper Eq. 1-5, Eq. 3 ILP); with CONFIG, a run's stage plan")
    pl.add_argument("config", nargs="?", help=f"a run config (a YAML file, or a preset's name: {presets()}): print "
                    "its stage plan (a dry run of `train`)")
    pl.add_argument("--preset", choices=["368m", "680m", "1.2b", "1.2b-3stage"],
                    help="a model size of the paper's Table 1 (its d, L, K and rank)")
    width, big = int_up_to(solve.MAX_WIDTH), int_up_to(1 << 30, "a sanity bound")
    pl.add_argument("--hidden", type=width, help="d")
    pl.add_argument("--layers", type=int_up_to(solve.MAX_LAYERS), help="final layer count L")
    pl.add_argument("--stages", type=int_up_to(solve.MAX_STAGES), help="K (default 2)")
    pl.add_argument("--lora-rank", type=width, help="r (default min(128, d), the paper's rank)")
    pl.add_argument("--layers-per-stage", help="evaluate this split instead of optimising, e.g. 7,5")
    pl.add_argument("--ffn-hidden", type=width, help="SwiGLU width (default: exactly 8/3·d, the paper's Eq. 4)")
    pl.add_argument("--n-heads", type=width, help="attention heads (for GQA and activations)")
    pl.add_argument("--n-kv-heads", type=width, help="key/value heads (GQA)")
    pl.add_argument("--cap-growth", action="store_true", help="require n_(i+1) <= N_i")
    pl.add_argument("--budget-gb", type=positive_float, help="deepest model whose peak fits this many GB (1e9 B); "
                    f"stops at {solve.MAX_LAYERS} layers and says so")
    pl.add_argument("--extended", action="store_true", help="add embeddings, head, norms and activations")
    pl.add_argument("--optimizer-states", choices=memory.OPTIMIZER_STATES,
                    help="AdamW moments (default fp32; with --budget-gb and no value: search every supported "
                         "precision, and every K from 1 to %d without --stages)" % solve.MAX_SEARCH_STAGES)
    pl.add_argument("--master-weights", choices=memory.MASTER_WEIGHTS,
                    help="trainable weights and gradients (default fp32, or bf16 with --optimizer-states bf16)")
    pl.add_argument("--vocab-size", type=big, help="V, for embeddings and head (with --extended; "
                    "default 50257, GPT-2's)")
    pl.add_argument("--seq-len", type=big, help="tokens per sequence (activations, with --extended; default 1024)")
    pl.add_argument("--micro-batch", type=big, help="sequences per forward (activations, with --extended; "
                    "default 1)")
    pl.add_argument("--checkpointing", action="store_true", help="activation checkpointing (extended model)")
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    # with CONFIG (or any config key): every flag train takes, so that plan is train's dry run
    add_config_flags(pl, {f: v for f, v in SHORT_FLAGS.items() if f != "--micro-batch"})
    pl.set_defaults(fn=cmd_plan)
