"""The replication at the paper's regime: about 20 training tokens per non-embedding parameter, STEP
run as the paper runs it (ReLoRA resets), an equal-tokens control, and the STEP/vanilla perplexity
ratio across the token budget.

    python benchmarks/regime.py                    # everything, in order; resumes where it stopped
    python benchmarks/regime.py --suite sweep      # lr, then embedding-lr scale, per method (tuning split)
    python benchmarks/regime.py --suite main       # the rows at 20 tokens/parameter -> regime.json
    python benchmarks/regime.py --suite curve      # STEP-2stages / vanilla at 0.5, 2, 5, 20 -> budget_curve.json
    python benchmarks/regime.py --suite ablations  # Tables 4, 5, 9, 10 and the ReLoRA table at the regime
    python benchmarks/regime.py --smoke            # every row kind on a tiny shape (CI; with --suite: one suite)

The shape, and why. d 96, 6 layers, 3 heads of 32, SwiGLU 256, a 2048-token BPE trained on the
training text, seq 256, 16 sequences (4096 tokens) a step: 664,704 non-embedding parameters, so
20 tokens per parameter is 13.3M tokens, 3,245 vanilla steps. Six layers is the least depth at
which 3 stages still mean something (2 layers a stage); 2048 BPE tokens keep the embedding and head
(393K parameters) below the layers (665K), where GPT-2's 50,257 would make them 93 % of the model.
On a 2-core Xeon with AMX (native bf16) a compiled vanilla step takes about 0.118 s (34,700
tokens/s), so one vanilla run at 20 tokens per parameter trains in about 6.5 minutes, and the whole
suite (about 110 runs) in about 6 hours; d 128 with a 4096 vocabulary would take 2.5 times as long
per run.

Data. Training text: ../shared/data/gutenberg-large/train.jsonl.gz (766 books, no book by a
validation author), of which 2 % of the books (chosen by a hash of their position, data.val_fraction)
are held out as the *tuning split*: every run evaluates on it during training, and the sweeps rank
on it (the run's final in-training validation loss, on TUNE_TOKENS tokens). The reported perplexity
is measured afterwards, in fp32, on all of ../shared/data/gutenberg/valid.jsonl.gz (8 books by 3
authors with no book in training): selection and report never share data. About 30M training tokens
are tokenized, more than any run draws, so no run repeats its data on purpose (windows are sampled
at random, with replacement).

Tuning. Vanilla and STEP-2stages get 5 peak lrs (factor 2 apart), then, at the chosen lr, 5 scales
of the embedding/head/norm lr (train.embedding_lr_scale, 1 to 100); the other rows 3 or 4 lrs around
vanilla's choice (GaLore's an octave higher) and scales 1, 3 and 10, to save CPU hours; a choice at
a grid's edge adds the next point beyond it until the choice is inside. Sweeps train at 5 tokens per
parameter (a quarter of the budget; the budget curve's 5-tokens point reuses those runs), one seed.

STEP as the paper runs it. PET is ReLoRA (Appendix C): adapters merge into the frozen bf16 bases
and restart every 5000 of the 368M STEP-2stages run's 33K steps (Table 6/7), so here every 15.2 %
of the run's own total steps, with a restart warmup of a tenth of that (500 of 5000). The LoRA-only
variant (no resets) is an ablation row. ReLoRA the method resets every 5000 of its 40K steps
(12.5 %); GaLore refreshes its projection every 200 of 20K steps (1 %).

Every run lives in the run cache and goes to the ledger (benchmarks/results/ledger), sweeps
included; a new machine rebuilds every table from the ledger and trains only what is missing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import replicate as R  # noqa: E402  (the run cache, the ledger, the statistics)

from steplm.errors import TrainingStopped  # noqa: E402
from steplm.passes.growth import insertion_gaps  # noqa: E402
from steplm.plan.stages import layer_shape, plan_run  # noqa: E402
from steplm.plan import memory

ROOT, DATA = R.ROOT, R.DATA
RESULTS = ROOT / "benchmarks" / "results"
TOKENS_PER_STEP = 16 * 256
BASE = {
    "data.path": str(DATA / "gutenberg-large" / "train.jsonl.gz"), "data.val_fraction": 0.02,
    "data.tokenizer": "bpe:2048", "data.max_train_tokens": 30_000_000,
    "model.vocab_size": 2048, "model.d_model": 96, "model.n_layers": 6, "model.n_heads": 3, "model.max_seq_len": 256,
    "train.seq_len": 256, "train.micro_batch": 16, "train.lr": 4e-3, "train.eval_tokens": 262_144,
    "train.log_every": 25, "train.dtype": "auto", "train.compile": True, "train.keep_checkpoints": 1,
    "lora.rank": 8, "lora.alpha": 16, "step.n_stages": 2, "step.flops_convention": "corrected",
}
REPORT_VAL = DATA / "gutenberg" / "valid.jsonl.gz"
TOKENS_PER_PARAM = 20.0        # the paper's regime (7B tokens into 368M, 24B into 1.2B)
SWEEP_TPP = 5.0                # the sweeps' budget, tokens per parameter
CURVE_TPP = (0.5, 2.0, 5.0, 20.0)
SEEDS = (0, 1, 2)
WARMUP_FRACTION = 0.05         # 1000 of the paper's 20K vanilla steps
STEP_RESET_FRACTION = 5000 / 33_000   # ReLoRA resets in STEP: 5000 of the 368M STEP-2stages run's 33K steps
RELORA_RESET_FRACTION = 5000 / 40_000  # ReLoRA the method: 5000 of its 40K steps
GALORE_GAP_FRACTION = 200 / 20_000     # GaLore's projection gap: 200 of 20K steps
# vanilla and STEP-2stages, the comparison the regime is for, get 5-point grids; the other rows 4 or 3
# points around vanilla's choice (GaLore's an octave higher, its usual lr), each widened past an edge
# that wins, so every choice is inside its grid.
LR_GRID = {"vanilla": (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2), "step-2stages": (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2),
           "step-3stages": (1e-3, 2e-3, 4e-3, 8e-3), "relora": (1e-3, 2e-3, 4e-3),
           "galore": (8e-3, 1.6e-2, 3.2e-2)}
LR_STEP = 2.0                  # the factor between lr grid points (and of an extension past an edge)
SCALE_GRID = (1.0, 3.0, 10.0, 30.0, 100.0)
SCALE_GRID_OTHERS = (1.0, 3.0, 10.0)  # the rows other than vanilla and STEP-2stages
SCALE_STEP = 3.0
MAX_EXTENSIONS = 3
# Rows of the main table; the STEP-2stages variants take STEP-2stages' tuned settings.
TUNED_AS = {"step-2stages-tokens": "step-2stages", "step-2stages-paper-flops": "step-2stages",
            "step-2stages-lora": "step-2stages"}
MAIN = ("vanilla", "step-2stages", "step-3stages", "step-2stages-tokens", "step-2stages-paper-flops",
        "step-2stages-lora", "relora", "galore")
SEEDED = ("vanilla", "step-2stages", "step-3stages", "step-2stages-tokens")
BUDGET_MATCH = {"step-2stages-tokens": "tokens", "step-2stages-paper-flops": "flops-paper"}
RELORA_TABLE = {"interval": (STEP_RESET_FRACTION / 2, STEP_RESET_FRACTION, 2 * STEP_RESET_FRACTION),
                "rank": (4, 8, 16)}  # intervals as a share of the run's steps
CACHED_ONLY = False            # --cached: tables from finished runs only, nothing trained
CACHE = Path(".")              # the run cache (set in main)
SEED_LIMIT: set[int] | None = None  # --seeds: train and tabulate only these seeds (a partial table says so)
PENDING: list[str] = []        # what a suite could not build yet (a missing sweep), for the summary


# ---------------------------------------------------------------------------- the shape and budgets
def non_embedding_params(n_layers: int | None = None) -> int:
    """Non-embedding parameters of the final model (all its decoder blocks), from the planner."""
    cfg = R.resolve({} if n_layers is None else {"model.n_layers": n_layers})
    return cfg.model.n_layers * memory.params_per_layer(layer_shape(cfg.model))


def budget(tpp: float, n_layers: int | None = None) -> dict:
    """Overrides for a vanilla budget of ``tpp`` training tokens per non-embedding parameter: steps,
    warmup (5 %), in-run evaluations (8 a run, on the tuning split) and checkpoints (6 a run)."""
    steps = max(2, round(tpp * non_embedding_params(n_layers) / TOKENS_PER_STEP))
    return {"train.max_steps": steps, "train.warmup_steps": max(1, round(WARMUP_FRACTION * steps)),
            "train.eval_every": max(1, steps // 8), "train.checkpoint_every": max(1, steps // 6)}


def with_resets(overrides: dict, fraction: float = STEP_RESET_FRACTION) -> dict:
    """STEP overrides with ReLoRA resets every ``fraction`` of the run's own planned total steps, and
    a restart warmup of a tenth of the interval (Table 6: 500 of 5000)."""
    total = plan_run(R.resolve(overrides)).total_steps
    k = max(1, round(fraction * total))
    return {**overrides, "lora.relora_interval": k, "lora.relora_warmup": max(1, round(k / 10))}


def method_overrides(method: str, tpp: float | None = None) -> dict:
    """The overrides of a named row at a budget (default TOKENS_PER_PARAM; lr and embedding-lr scale
    not included)."""
    b = budget(TOKENS_PER_PARAM if tpp is None else tpp)
    steps = b["train.max_steps"]
    step2 = {**b, "method": "step", "step.n_stages": 2}
    if method == "vanilla":
        return b
    if method == "step-2stages":
        return with_resets(step2)
    if method == "step-3stages":
        return with_resets({**step2, "step.n_stages": 3})
    if method == "step-2stages-tokens":
        return with_resets({**step2, "step.budget_match": "steps"})
    if method == "step-2stages-paper-flops":
        return with_resets({**step2, "step.flops_convention": "paper"})
    if method == "step-2stages-lora":
        return {**step2, "lora.relora_interval": 0}
    if method == "relora":
        k = max(1, round(RELORA_RESET_FRACTION * steps))
        return {**b, "method": "relora", "lora.warm_start_fraction": 0.25, "lora.relora_interval": k,
                "lora.relora_warmup": max(1, round(k / 10))}
    if method == "galore":
        return {**b, "method": "galore", "galore.rank": int(BASE["lora.rank"]),
                "galore.update_proj_gap": max(1, round(GALORE_GAP_FRACTION * steps)), "galore.scale": 0.25}
    raise KeyError(method)


# ---------------------------------------------------------------------------- runs
def train(overrides: dict, cache: Path, report: bool = True) -> dict:
    """One run through the run cache and the ledger (R.run); a diverged run comes back with
    ``diverged`` and infinite perplexities. ``report``: also measure the reported validation (fp32,
    all of REPORT_VAL) and WikiText perplexity."""
    try:
        s = R.run(overrides, cache, report=report)
    except TrainingStopped as e:
        c = R.canonical(overrides)
        print(f"[regime] diverged: {e}", file=sys.stderr, flush=True)
        return {"diverged": str(e), "tune_ppl": math.inf, "eval": {"val": {"ppl": math.inf}},
                "command": R.command(c, cache / "runs" / R.run_key(R.resolve(c)))}
    s["tune_ppl"] = math.exp(s["final_val_loss"])  # the last in-run evaluation: TUNE_TOKENS of the tuning split
    return s


# ---------------------------------------------------------------------------- sweeps
def sweep_grid(method: str, base: dict, name: str, grid: tuple, step: float, cache: Path, rows: list[dict]) -> float:
    """Train ``base`` at every value of ``grid`` for override ``name`` (seed 0, SWEEP_TPP) and return
    the value with the lowest tuning-split perplexity, extending the grid by one point (×``step``)
    past an edge that wins, at most MAX_EXTENSIONS times. Appends one row per point to ``rows``."""
    values, mine = list(grid), []
    for _ in range(MAX_EXTENSIONS + 1):
        for v in values:
            if any(r[name] == v for r in mine):
                continue
            over = {**base, **({name: v} if not (name == "train.embedding_lr_scale" and v == 1.0) else {})}
            s = train(over, cache, report=False)
            mine.append({"method": method, name: v, "tune_ppl": s["tune_ppl"], "command": s["command"],
                         **({"diverged": s["diverged"]} if "diverged" in s else
                            {"tokens": s["tokens_seen"], "wall_seconds": s["wall_seconds"]})})
        best = min(mine, key=lambda r: r["tune_ppl"])
        lo, hi = min(values), max(values)
        if best[name] == hi:
            values.append(hi * step)
        elif best[name] == lo:
            values.insert(0, lo / step)
        else:
            break
    for r in sorted(mine, key=lambda r: r[name]):
        r["chosen"] = r is best
        r["at_grid_edge"] = r is best and r[name] in (min(values), max(values))
        rows.append(r)
    return best[name]


def suite_sweep(cache: Path, out: Path) -> list[dict]:
    """Per method: the lr grid at embedding-lr scale 1, then the scale grid at the chosen lr."""
    rows = []
    for m, grid in LR_GRID.items():
        if ONLY and m not in ONLY:
            continue
        base = method_overrides(m, SWEEP_TPP)
        lr = sweep_grid(m, base, "train.lr", grid, LR_STEP, cache, lr_rows := [])
        scale = sweep_grid(m, {**base, "train.lr": lr}, "train.embedding_lr_scale",
                             SCALE_GRID if m in ("vanilla", "step-2stages") else SCALE_GRID_OTHERS, SCALE_STEP, cache,
                           scale_rows := [])
        for r in lr_rows:
            r["grid"] = "lr"
        for r in scale_rows:
            r["grid"], r["train.lr"] = "embedding_lr_scale", lr
        rows += lr_rows + scale_rows
        print(f"[sweep] {m}: lr {lr:g}, embedding_lr_scale {scale:g}", file=sys.stderr, flush=True)
        # after each method, so that a worker on the other core can start the main rows of the swept ones;
        # a worker (--only) keeps the other methods an earlier worker swept into <cache>/partial
        f = out / "regime_sweep.json"
        kept = [r for r in json.loads(f.read_text()) if r["method"] not in ONLY] if ONLY and f.is_file() else []
        write(out, "regime_sweep", "Sweeps at the regime's shape (5 tokens/parameter, seed 0, ranked on the tuning "
              "split)", sweep_table(kept + rows), kept + rows)
    return rows


def tuned(method: str, out: Path) -> dict | None:
    """The swept lr and embedding-lr scale of a row (its TUNED_AS relative's), None if not swept yet."""
    src = TUNED_AS.get(method, method)
    # a worker (--only) reads the results folder's sweep, then its own partial one: a method swept by
    # `--suite sweep --only M` is in <cache>/partial until the full suite writes the results folder
    files = [READ_FROM / "regime_sweep.json", CACHE / "partial" / "regime_sweep.json"] if ONLY else [out / "regime_sweep.json"]
    rows = []
    for f in files:
        if f.is_file() and not rows:
            rows = [r for r in json.loads(f.read_text()) if r["method"] == src and r["chosen"]]
    lr = [r["train.lr"] for r in rows if r["grid"] == "lr"]
    scale = [r["train.embedding_lr_scale"] for r in rows if r["grid"] == "embedding_lr_scale"]
    if not lr or not scale:
        return None
    return {"train.lr": lr[0], **({"train.embedding_lr_scale": scale[0]} if scale[0] != 1.0 else {})}


def sweep_table(rows: list[dict]) -> str:
    lines = ["| method | grid | lr | embedding lr scale | tuning ppl | chosen | at grid edge |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['grid']} | {r['train.lr']:g} | {r.get('train.embedding_lr_scale', 1.0):g} | "
                     f"{r['tune_ppl']:.2f} | {'yes' if r['chosen'] else ''} | {'yes' if r['at_grid_edge'] else ''} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- rows and tables
def write(out: Path, stem: str, title: str, md: str, data) -> None:
    (out / f"{stem}.md").write_text(f"### {title}\n\n{md}\n")
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2))
    print(f"\n### {title}\n\n{md}\n", flush=True)


def variants(methods, tpp: float, out: Path, seeds=None) -> dict[str, list[dict]]:
    """Overrides per row (seeded rows: one per seed) at a budget, with their tuned settings; rows whose
    sweep has not run are left out and named in PENDING."""
    res = {}
    for m in methods:
        if ONLY and m not in ONLY:
            continue
        t = tuned(m, out)
        if t is None:
            PENDING.append(f"{m}: no sweep result yet (--suite sweep)")
            continue
        v = {**method_overrides(m, tpp), **t}
        chosen = seeds or (SEEDS if m in SEEDED else SEEDS[:1])
        runs = [{**v, "train.seed": s} for s in chosen if SEED_LIMIT is None or s in SEED_LIMIT]
        if CACHED_ONLY:
            done = [o for o in runs if finished(o)]
            if len(done) < len(runs):
                PENDING.append(f"{m}: {len(runs) - len(done)} of {len(runs)} runs not trained yet (--cached)")
            runs = done
        if runs:
            res[m] = runs
    return res


def finished(overrides: dict) -> bool:
    """Whether the run of these overrides is finished (or diverged) in the run cache or the ledger."""
    key = R.run_key(R.resolve(R.canonical(overrides)))
    d = CACHE / "runs" / key
    if (d / "summary.json").is_file() or (d / "stopped.txt").is_file():
        return True
    return R.ledger_entry(key, R.eval_keys(False)) is not None  # evaluated as the tables need it


def rows_for(name: str, vs: dict[str, list[dict]], cache: Path, tpp: float) -> list[dict]:
    """Train every variant and make its row (R.train_rows: seed statistics, memory per stage, ratio to
    'vanilla' if present), with the regime's own fields added."""
    by_conv = {"corrected": {m: v for m, v in vs.items() if m != "step-2stages-paper-flops"},
               "paper": {m: v for m, v in vs.items() if m in ("vanilla", "step-2stages-paper-flops")}}
    rows = []
    for conv, group in by_conv.items():
        if not group or (conv == "paper" and len(group) == 1 and not ONLY):
            continue
        for r in R.train_rows(name, {m: [{k: x for k, x in o.items() if k != "step.flops_convention"} for o in v]
                                     for m, v in group.items()}, cache, conv, False):
            if conv == "paper" and r["method"] == "vanilla":
                continue
            rows.append(r)
    params = non_embedding_params()
    for r in rows:
        o = vs[r["method"]][0]
        r["budget_match"] = BUDGET_MATCH.get(r["method"], "flops-corrected")
        r["tokens_per_param"] = r["tokens"] / params
        r["vanilla_tokens_per_param"] = tpp
        r["relora_interval"] = int(o.get("lora.relora_interval", 0))
        r["lora_rank"] = int(BASE["lora.rank"]) if r["method"].startswith(("step", "relora")) else 0
    order = list(vs)
    return sorted(rows, key=lambda r: order.index(r["method"]))


def fmt(r: dict) -> str:
    return R.fmt_ppl(r)


def ratio_text(r: dict) -> str:
    if "val_ppl_ratio" not in r:
        return "–"
    ci = r["val_ppl_ratio_ci95"]
    return f"{r['val_ppl_ratio']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else " (1 seed)")


def main_table(rows: list[dict]) -> str:
    lines = ["| row | budget | layers/stage | ReLoRA reset | lr | tokens | tokens/param | val ppl | / vanilla [95 % CI] | "
             "WikiText ppl | planned peak (MiB) | measured peak (MiB) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lr = f"{r['lr']:g}" + (f", outer ×{r['embedding_lr_scale']:g}" if r.get("embedding_lr_scale", 1.0) != 1.0 else "")
        lines.append(f"| {r['method']} | {r['budget_match']} | {'→'.join(map(str, r['layers_per_stage']))} | "
                     f"{r['relora_interval'] or '–'} | {lr} | {r['tokens']:,} | {r['tokens_per_param']:.3g} | {fmt(r)} | "
                     f"{ratio_text(r)} | {R.fmt_ppl(r, 'wikitext_ppl')} | {r['planned_peak_bytes'] / R.MIB:.2f} | "
                     f"{r['measured_peak_bytes'] / R.MIB:.2f} |")
    return "\n".join(lines)


def suite_main(cache: Path, out: Path) -> list[dict] | None:
    vs = variants(MAIN, TOKENS_PER_PARAM, out)
    if ONLY:  # a worker: train, no table
        rows_for("regime/main", vs, cache, TOKENS_PER_PARAM)
        return None
    if "vanilla" not in vs:
        return None
    rows = rows_for("regime/main", vs, cache, TOKENS_PER_PARAM)
    van = rows[0]
    cv = van["val_ppl_spread"] / van["val_ppl"]
    sd = (f"Vanilla's seed SD: {100 * cv:.2f} % of its mean ({van['n_seeds']} seeds; target ≤ 3 %)."
          if van["n_seeds"] > 1 else "One seed a row so far: no seed spread, no confidence interval.")
    md = main_table(rows) + (
        f"\n\n{sd} Budgets: "
        "flops-corrected = vanilla's FLOPs under the corrected count; flops-paper = under the paper's count; "
        "tokens = vanilla's token count (the equal-tokens control). Perplexity: fp32, all of gutenberg/valid.")
    write(out, "regime", f"STEP at the paper's regime: {TOKENS_PER_PARAM:g} tokens per non-embedding parameter", md, rows)
    return rows


# ---------------------------------------------------------------------------- the budget curve
def suite_curve(cache: Path, out: Path) -> list[dict] | None:
    points = []
    for tpp in (CURVE_TPP if not ONLY else sorted(CURVE_TPP)):
        vs = variants(("vanilla", "step-2stages"), tpp, out, seeds=SEEDS)
        if ONLY:  # a worker: train, no table
            rows_for(f"regime/curve {tpp:g}", vs, cache, tpp)
            continue
        if len(vs) < 2:  # a point not trained yet (--cached names it): the others still make a curve
            continue
        van, step = rows_for(f"regime/curve {tpp:g}", vs, cache, tpp)
        points.append({"tokens_per_param": tpp, "seeds": step["seeds"], "val_ppl_ratio": step["val_ppl_ratio"],
                       "val_ppl_ratio_ci95": step["val_ppl_ratio_ci95"], "vanilla_val_ppl": van["val_ppl"],
                       "vanilla_val_ppl_spread": van["val_ppl_spread"], "step_val_ppl": step["val_ppl"],
                       "step_val_ppl_spread": step["val_ppl_spread"], "vanilla_tokens": van["tokens"],
                       "step_tokens": step["tokens"], "flops": van["flops"], "step_flops": step["flops"],
                       "vanilla_commands": van["commands"], "step_commands": step["commands"],
                       "vanilla_seeds": van["seeds"]})
    if not points:
        return None
    curve_plot(points, out / "budget_curve.png")
    lines = ["| tokens/param (vanilla) | seeds (vanilla, STEP) | vanilla ppl | STEP-2stages ppl | STEP / vanilla [95 % CI] | "
             "STEP tokens / vanilla's |", "|---|---|---|---|---|---|"]
    for p in points:
        ci = p["val_ppl_ratio_ci95"]
        ci = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "(no interval: one seed)"
        lines.append(f"| {p['tokens_per_param']:g} | {len(p['vanilla_seeds'])}, {len(p['seeds'])} | "
                     f"{p['vanilla_val_ppl']:.2f} ± {p['vanilla_val_ppl_spread']:.2f} | "
                     f"{p['step_val_ppl']:.2f} ± {p['step_val_ppl_spread']:.2f} | {p['val_ppl_ratio']:.3f} "
                     f"{ci} | {p['step_tokens'] / p['vanilla_tokens']:.2f} |")
    write(out, "budget_curve", "STEP-2stages / vanilla across the token budget (equal corrected FLOPs; seeds per point "
          "in the table, 3 planned)",
          "\n".join(lines) + "\n\n![budget curve](budget_curve.png)", points)
    return points


def curve_plot(points: list[dict], path: Path) -> Path:
    """The STEP/vanilla ratio against tokens per parameter (log axis), its 95 % interval as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = [p["tokens_per_param"] for p in points]
    y = [p["val_ppl_ratio"] for p in points]
    ci = [p["val_ppl_ratio_ci95"] or [p["val_ppl_ratio"]] * 2 for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.fill_between(x, [c[0] for c in ci], [c[1] for c in ci], color="#1f5fa8", alpha=0.2, label="95 % interval")
    ax.plot(x, y, "o-", color="#1f5fa8", label="STEP-2stages / vanilla")
    ax.axhline(1.0, color="#c0392b", lw=1, ls="--", label="equal perplexity")
    ax.set_xscale("log")
    ax.set_xlabel("vanilla's training tokens per non-embedding parameter")
    ax.set_ylabel("validation perplexity ratio")
    ax.set_title("STEP-2stages against vanilla at equal FLOPs (corrected count)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- ablations
POSITIONS = ("upper", "top", "intermediate", "lower", "random")


def position_groups(split: list[int], seed: int) -> dict[str, str]:
    """Table 4's rows at a 2-stage split: one per distinct placement, named by the positions that give
    it ("lower = intermediate" where they coincide: at 6 layers there are few gaps), each mapped to
    the position that is run. Growth into stage 2 seeds 'random' with ``seed``."""
    groups: dict[tuple, list[str]] = {}
    for p in POSITIONS:
        groups.setdefault(tuple(insertion_gaps(split[0], split[1], p, seed)), []).append(p)
    return {" = ".join(ps): ps[0] for ps in groups.values()}


def ablation_variants(name: str, out: Path) -> dict[str, list[dict]]:
    if name.endswith(FP32):  # the same variants in fp32 compute, beside an fp32 control of the paper's row
        vs = ablation_variants(name[:-len(FP32)], out)
        if name.startswith("relora"):  # the adapter ranks at the paper's interval (rank 8 is Table 4's upper run)
            vs = {m: v for m, v in vs.items() if m.startswith(f"reset every {100 * STEP_RESET_FRACTION:.1f} %")}
        return {m: [{**o, "train.dtype": "fp32"} for o in v] for m, v in vs.items()}
    t = tuned("step-2stages", out)
    if t is None:
        PENDING.append(f"{name}: no sweep result yet")
        return {}
    base = {**method_overrides("step-2stages"), **t}
    step2 = {**budget(TOKENS_PER_PARAM), "method": "step", "step.n_stages": 2, **t}
    if name == "table4":  # at STEP-2stages' own split (the planner's); position upper is the main row
        split = plan_run(R.resolve(base)).layers_per_stage
        return {f"position={label}": [with_resets({**step2, **({"step.position": p} if p != "upper" else {})})]
                for label, p in position_groups(split, int(base.get("train.seed", 0)) + 1).items()}
    if name == "table5":
        return {"with PET (ReLoRA)": [base], "with PET (LoRA, no resets)": [{**step2, "lora.relora_interval": 0}],
                "without PET": [{**step2, "method": "step-no-pet"}]}
    if name == "table9":
        return {f"{i}{' + FPI' if f else ''}": [with_resets({**step2, "step.init": i, "step.fpi": f})]
                for i in ("copy", "mean") for f in (False, True)}
    if name == "table10":
        return {f"grow at {int(g * 100)} %": [with_resets({**step2, "step.growth_fraction": g})]
                for g in (0.25, 0.5, 0.75, 1.0)}
    if name == "relora":
        rows = {"no resets (LoRA)": [{**step2, "lora.relora_interval": 0}]}
        for f in RELORA_TABLE["interval"]:
            rows[f"reset every {100 * f:.1f} %, r {BASE['lora.rank']}"] = [with_resets(step2, f)]
        split = json.dumps(plan_run(R.resolve(base)).layers_per_stage)  # the planner's split depends on the rank
        for rank in RELORA_TABLE["rank"]:
            if rank != int(BASE["lora.rank"]):
                rows[f"reset every {100 * STEP_RESET_FRACTION:.1f} %, r {rank}"] = [
                    with_resets({**step2, "lora.rank": rank, "lora.alpha": 2 * rank, "step.layers_per_stage": split})]
        return rows
    raise KeyError(name)


FP32 = "-fp32"
# the tables' variants in fp32: those trained on a CPU without native bf16 (bf16 emulated there is
# about 16x slower), each table with its own fp32 control, so that no verdict compares across dtypes
ABLATIONS = {"table4": None, "table5": "with PET (ReLoRA)", "table9": "mean", "table10": "grow at 75 %",
             "relora": None, "table4-fp32": None, "relora-fp32": None}
ABLATION_TITLES = {"table4": "Table 4, insertion position — paper: Upper best",
                   "table5": "Table 5, with and without PET — paper: with PET better",
                   "table9": "Table 9, initialisation — paper: Interpolation-Mean without FPI best",
                   "table10": "Table 10, when to grow — paper: 75 % best",
                   "relora": "STEP-2stages with ReLoRA resets at several intervals and adapter ranks (not in the paper)",
                   "table4-fp32": "Table 4 in fp32 compute (position=upper is the fp32 control of the paper's row)",
                   "relora-fp32": "Adapter ranks in fp32 compute (r 8 is the fp32 control, the same run as Table 4's "
                                  "upper)"}


def suite_ablations(cache: Path, out: Path) -> dict | None:
    main = (READ_FROM if ONLY else out) / "regime.json"
    if not main.is_file():
        PENDING.append("ablations: regime.json missing (--suite main first: the verdicts need its seed spread)")
        return None
    noise = next(r for r in json.loads(main.read_text()) if r["method"] == "step-2stages")["val_ppl_spread"]
    result, md = {}, []
    for name, paper_best in ABLATIONS.items():
        if ONLY and name not in ONLY:
            continue
        vs = ablation_variants(name, READ_FROM if ONLY else out)
        missing = [m for m, v in vs.items() if CACHED_ONLY and not all(finished(o) for o in v)]
        if missing:
            PENDING.append(f"{name}: {len(missing)} of {len(vs)} variants not trained yet (--cached): "
                           + "; ".join(missing))  # names hold commas ("reset every 7.6 %, r 8")
            vs = {m: v for m, v in vs.items() if m not in missing}
        if not vs:
            continue
        rows = R.train_rows(f"regime/{name}", vs, cache, "corrected", False)
        if ONLY:  # a worker: train, no table
            continue
        for r in rows:
            r["relora_interval"] = int(vs[r["method"]][0].get("lora.relora_interval", 0))
        ppl = {r["method"]: r["val_ppl"] for r in rows}
        info = {"noise_sd": noise, "threshold": R.Z_VERDICT * math.sqrt(2) * noise, "best": min(ppl, key=ppl.get)}
        if name.startswith("table4"):
            paper_best = next((m for m in ppl if "upper" in m), None)  # the row that holds upper
        if paper_best in ppl and len(ppl) > 1:  # a verdict needs the paper's best and one other
            info["paper_best"], info["verdict"] = paper_best, R.verdict(paper_best, ppl, noise)
        lines = ["| variant | layers/stage | ReLoRA reset | val ppl | WikiText ppl | tokens |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['method']} | {'→'.join(map(str, r['layers_per_stage']))} | {r['relora_interval'] or '–'} | "
                         f"{r['val_ppl']:.2f} | {r['wikitext_ppl']:.2f} | {r['tokens']:,} |")
        so_far = " so far (of the variants trained)" if missing else ""  # a missing variant may still win
        lines.append(f"\nBest{so_far}: {info['best']}. STEP-2stages' seed SD at the regime: {noise:.2f} ppl; a "
                     f"difference between two single-seed runs counts beyond {info['threshold']:.2f}."
                     + (f" Verdict{so_far}: **{info['verdict']}**." if "verdict" in info else "")
                     + (f" Not trained yet: {'; '.join(missing)}" if missing else "")
                     + (" (see the fp32 table below)" if missing and name + FP32 in ABLATIONS else "")
                     + ("." if missing else ""))
        if name.endswith(FP32) and name[:-len(FP32)] in result and R.BASE["train.dtype"] != "fp32":
            # the dtype's own effect, on the rows run in both (the smoke trains in fp32 already)
            bf16 = {r["method"]: r["val_ppl"] for r in result[name[:-len(FP32)]]["rows"]}
            both = [m for m in ppl if m in bf16]
            info["bf16_val_ppl"] = {m: bf16[m] for m in both}
            lines.append("Against the same variant run in the regime's bf16 (autocast on a CPU with native bf16): "
                         + "; ".join(f"{m} {ppl[m]:.2f} in fp32, {bf16[m]:.2f} in bf16" for m in both)
                         + ". Compare variants within one dtype only.")
        result[name] = {"rows": rows, **info, **({"not_trained": missing} if missing else {})}
        md.append(f"#### {ABLATION_TITLES[name]}\n\n" + "\n".join(lines))
    if result:
        write(out, "regime_ablations", "Ablations at the regime (one seed each, 20 tokens per parameter)",
              "\n\n".join(md), result)
    return result


# ---------------------------------------------------------------------------- driver
ONLY: set[str] = set()  # --only: the rows this worker trains
READ_FROM = RESULTS     # the results folder (with --only: where the sweep's choices and regime.json are read)
SUITES = {"sweep": suite_sweep, "main": suite_main, "curve": suite_curve, "ablations": suite_ablations}


def configure(cache: Path, smoke: bool) -> None:
    """Point the run machinery (replicate.py's) at the regime, or at a tiny shape for --suite smoke."""
    global SEEDS, LR_GRID, SCALE_GRID, SCALE_GRID_OTHERS, CURVE_TPP, MAX_EXTENSIONS
    R.BASE.clear()
    R.BASE.update({**BASE, "data.cache_dir": str(cache / "tokens")})
    R.VAL_PATH = REPORT_VAL
    R.VAL_TOKENS, R.WIKI_TOKENS = None, 204_800
    if smoke:
        cache.mkdir(parents=True, exist_ok=True)
        text = (DATA / "shakespeare" / "input.txt").read_text()
        docs = [text[i:i + 8_000] for i in range(0, 240_000, 8_000)]  # 30 documents: a tuning split by document
        (cache / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        (cache / "val.txt").write_text(text[240_000:250_000])
        (cache / "wiki.txt").write_text(text[-12_000:])
        R.BASE.update({"data.path": str(cache / "train.jsonl"), "data.val_fraction": 0.2, "data.tokenizer": "bpe:512",
                       "data.max_train_tokens": 10**7, "model.vocab_size": 512, "model.d_model": 32,
                       "model.n_heads": 2, "model.max_seq_len": 32, "train.seq_len": 32, "train.micro_batch": 4,
                       "train.eval_tokens": 1024, "train.log_every": 4, "train.dtype": "fp32", "train.compile": False,
                       "lora.rank": 4, "lora.alpha": 8})
        BASE.update({k: R.BASE[k] for k in ("lora.rank", "model.n_layers")})
        R.VAL_PATH, R.WIKI_PATH, R.WIKI_TOKENS = cache / "val.txt", cache / "wiki.txt", 2048
        # ~100K non-embedding parameters, 128 tokens a step: 0.02 tokens/param is 15 steps
        SEEDS, CURVE_TPP, MAX_EXTENSIONS = (0, 1), (0.01, 0.02), 1
        LR_GRID = {m: (3e-3, 1e-2) for m in LR_GRID}
        SCALE_GRID = SCALE_GRID_OTHERS = (1.0, 3.0)
        global TOKENS_PER_STEP, TOKENS_PER_PARAM, SWEEP_TPP
        TOKENS_PER_STEP, TOKENS_PER_PARAM, SWEEP_TPP = 4 * 32, 0.02, 0.01
        import torch
        torch.set_num_threads(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="all", choices=["all", *SUITES])
    ap.add_argument("--smoke", action="store_true", help="a tiny shape on tiny Shakespeare, seconds a run (CI)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; --smoke: "
                    "<cache>/regime-smoke/results)")
    ap.add_argument("--cache", default=str(R.CACHE), help="run cache (default $STEPLM_REPLICATE_CACHE or "
                    "~/.cache/steplm/replicate)")
    ap.add_argument("--ledger", default=None, help="run ledger (default benchmarks/results/ledger; smoke: in the "
                    "cache; 'none': off)")
    ap.add_argument("--only", default=None, help="comma-separated rows or ablation tables: train only these (a second "
                    "worker on another core); it writes no table (<cache>/partial) and reads the sweep's choices from "
                    "--out")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds: only these of each row's seeds (for example 0 "
                    "first, on every row, then 1,2); the tables give each row's seed count")
    ap.add_argument("--cached", action="store_true", help="train nothing: build the tables from the finished runs in "
                    "the cache and the ledger, and name what is missing (--suite main, curve or ablations)")
    a = ap.parse_args()
    global ONLY, SEED_LIMIT, CACHED_ONLY, CACHE
    CACHED_ONLY = a.cached
    if CACHED_ONLY and a.suite not in ("main", "curve", "ablations"):
        ap.error("--cached builds the main, curve and ablation tables: add --suite main, curve or ablations")
    for flag, value in (("--cache", a.cache), ("--out", a.out), ("--ledger", a.ledger)):
        if value is not None and not value.strip():  # "" would read as not given (or as the working folder)
            ap.error(f"{flag}: expected a folder, got an empty string (leave the flag out for its default)")
    names = set(LR_GRID) | set(MAIN) | set(ABLATIONS)
    if a.only is not None:  # given: every item a known row or table ("," or a typo would train nothing, or all)
        ONLY = {x.strip() for x in a.only.split(",")}
        unknown = sorted(ONLY - names)
        if unknown:
            ap.error(f"--only: unknown row or table {', '.join(map(repr, unknown))}; choose from "
                     f"{', '.join(sorted(names))}")
        # a name the chosen suite does not train (--suite sweep --only table4) would train nothing, silently
        trains = {"sweep": set(LR_GRID), "main": set(MAIN), "curve": {"vanilla", "step-2stages"},
                  "ablations": set(ABLATIONS)}
        here = set().union(*trains.values()) if a.suite == "all" else trains[a.suite]
        idle = sorted(ONLY - here)
        if idle:
            ap.error(f"--only: --suite {a.suite} trains no {', '.join(map(repr, idle))}; its rows or tables: "
                     f"{', '.join(sorted(here))}")
    if a.seeds is not None:
        if not all(re.fullmatch(r"[0-9]+", x.strip()) for x in a.seeds.split(",")):
            ap.error(f"--seeds: comma-separated integers, got {a.seeds!r}")
        if a.suite in ("sweep", "ablations"):  # seed 0 only: --seeds would be ignored
            ap.error(f"--seeds: --suite {a.suite} trains seed 0 only; --seeds chooses the seeds of --suite main and "
                     f"curve")
        SEED_LIMIT = {int(x) for x in a.seeds.split(",")}
    cache = Path(a.cache).expanduser()
    smoke = a.smoke
    if smoke:
        cache = cache / "regime-smoke"
    elif not Path(BASE["data.path"]).is_file():
        sys.exit(f"regime: error: {BASE['data.path']} missing (the shared data)")
    configure(cache, smoke)
    if SEED_LIMIT is not None and not SEED_LIMIT <= set(SEEDS):  # after configure: the smoke has its own seeds
        ap.error(f"--seeds: {', '.join(map(str, sorted(SEED_LIMIT - set(SEEDS))))} not among the suite's seeds "
                 f"({', '.join(map(str, SEEDS))})")
    CACHE = cache
    global READ_FROM
    READ_FROM = Path(a.out or (cache / "results" if smoke else RESULTS))
    out = cache / "partial" if ONLY else READ_FROM
    out.mkdir(parents=True, exist_ok=True)
    R.LEDGER = (None if a.ledger == "none" else Path(a.ledger).expanduser() if a.ledger
                else cache / "ledger" if smoke else R.LEDGER)
    suites = list(SUITES) if a.suite == "all" else [a.suite]
    meta_f = out / "regime_meta.json"
    meta = json.loads(meta_f.read_text()) if meta_f.is_file() else {}
    for name in suites:
        t0 = time.perf_counter()
        R.RUN_SECONDS.clear()
        SUITES[name](cache, out)
        if R.RUN_SECONDS:
            meta.setdefault("run_minutes_per_suite", {})[name] = {"runs": len(R.RUN_SECONDS),
                                                                  "minutes": sum(R.RUN_SECONDS.values()) / 60}
        print(f"[regime {name}] {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr, flush=True)
    import torch
    from steplm.devices import cpu_name
    if not CACHED_ONLY:  # where the runs trained; a --cached build trains nothing, so it keeps that record
        meta.update({"date": time.strftime("%Y-%m-%d"), "machine": cpu_name(), "cpus": os.cpu_count(),
                     "torch_threads": torch.get_num_threads(), "torch": torch.__version__})
    meta.update({"scale": dict(R.BASE), "non_embedding_params": non_embedding_params(), "pending": PENDING})
    meta_f.write_text(json.dumps(meta, indent=2))
    if PENDING:
        print("not built yet: " + "; ".join(PENDING), file=sys.stderr)


if __name__ == "__main__":
    main()
