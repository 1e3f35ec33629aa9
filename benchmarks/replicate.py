"""Small-scale replication of the STEP paper's Tables 2, 4, 5, 9 and 10 on CPU, every method at
vanilla's FLOPs (paper convention), plus the plots.

    python benchmarks/replicate.py                 # everything (main table + the four ablations)
    python benchmarks/replicate.py --suite table4  # one ablation

Scale, and why: d 256, 8 layers, 4 heads, seq 256, 8 sequences per step, a 8192-token BPE trained
on the training text (with GPT-2's 50257 tokens the embedding and head would hold 80 % of the
parameters and dominate time and memory), 100 vanilla steps (~0.2M tokens). That keeps the whole
suite under an hour on 2 CPU cores; the models are far from converged, so read trends, not
absolute perplexities. Adapter and projection ranks are the paper's 128 at d 2048 scaled to
d 256 (r = 16); ReLoRA's reset interval, restart warmup and warm start, and GaLore's projection
gap, are scaled to the run length (see RELORA / GALORE below).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from steplm import config, planner  # noqa: E402
from steplm.evaluate import perplexity  # noqa: E402
from steplm.report import plot_loss_vs_flops, plot_memory  # noqa: E402
from steplm.train import Trainer, layer_shape  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
STEPS = 100
BASE = {
    "data.path": str(DATA / "gutenberg" / "train.jsonl.gz"), "data.val_path": str(DATA / "gutenberg" / "valid.jsonl.gz"),
    "data.tokenizer": "bpe:8192", "data.max_train_tokens": 6_000_000, "data.cache_dir": str(ROOT / ".cache" / "steplm"),
    "model.vocab_size": 8192, "model.d_model": 256, "model.n_layers": 8, "model.n_heads": 4, "model.max_seq_len": 256,
    "train.seq_len": 256, "train.micro_batch": 8, "train.max_steps": STEPS, "train.lr": 3e-3, "train.warmup_steps": 10,
    "train.eval_every": 20, "train.eval_tokens": 32768, "train.log_every": 5, "train.dtype": "bf16",
    "lora.rank": 16, "lora.alpha": 32, "step.n_stages": 2,
}
# ReLoRA (paper: r 128, reset every 5000 steps, restart warmup 500): warm start 25 % of the steps,
# then a reset every quarter of the vanilla step count, with a restart warmup of 10 % of that.
RELORA = {"method": "relora", "lora.warm_start_fraction": 0.25, "lora.relora_interval": STEPS // 4,
          "lora.relora_warmup": max(1, STEPS // 40)}
# GaLore (paper: r 128, update_proj_gap 200, scale 0.25, lr 1e-2): projection refreshed 4 times a run.
GALORE = {"method": "galore", "galore.rank": 16, "galore.update_proj_gap": STEPS // 4, "galore.scale": 0.25,
          "train.lr": 1e-2}
STEP = {"method": "step"}
SEEDS = (0, 1, 2)
WIKI_TOKENS = 65536


def budget_bytes() -> int:
    """The named memory budget for the planner row: vanilla's layer states at 8 layers (Eq. 1)."""
    cfg = config.load(None, [f"{k}={v}" for k, v in BASE.items()])
    return planner.vanilla_bytes(8, planner.params_per_layer(layer_shape(cfg.model)))


def budget_row() -> dict:
    """STEP-2stages sized by the budget planner: the deepest model whose peak fits budget_bytes()."""
    cfg = config.load(None, [f"{k}={v}" for k, v in BASE.items()])
    plan = planner.deepest_within(budget_bytes(), 2, layer_shape(cfg.model), BASE["lora.rank"])
    L = sum(plan.layers_per_stage)
    # train.max_steps is a vanilla-equivalent budget for the model's own depth: scale it so the
    # FLOPs equal the 8-layer vanilla's (6·N·T with N proportional to the layer count).
    return {**STEP, "model.n_layers": L, "step.layers_per_stage": json.dumps(plan.layers_per_stage),
            "train.max_steps": round(STEPS * 8 / L)}


SUITES = {
    "main": {
        "vanilla": [{"train.seed": s} for s in SEEDS],
        "relora": [RELORA],
        "galore": [GALORE],
        "step-2stages": [{**STEP, "train.seed": s} for s in SEEDS],
        "step-3stages": [{**STEP, "step.n_stages": 3}],
        "step-2stages-budget": [None],  # filled by budget_row()
    },
    "table4": {f"position={p}": [{**STEP, "step.position": p}] for p in ("upper", "intermediate", "lower", "random")},
    "table5": {"with PET": [STEP], "without PET": [{"method": "step-no-pet"}]},
    "table9": {f"{i}{' + FPI' if f else ''}": [{**STEP, "step.init": i, "step.fpi": f}]
               for i in ("copy", "mean") for f in (False, True)},
    "table10": {f"grow at {int(g * 100)} %": [{**STEP, "step.growth_fraction": g}] for g in (0.25, 0.5, 0.75, 1.0)},
}
PAPER_TRENDS = {
    "table4": "paper: Upper best (lowest perplexity)",
    "table5": "paper: with PET better than without",
    "table9": "paper: Mean without FPI best",
    "table10": "paper: growing at 75 % best",
}


def cached(cfg, out_root: Path) -> Path | None:
    """A finished run directory trained with exactly this config, if there is one."""
    for d in sorted((out_root / "runs").glob("*")):
        if (d / "summary.json").is_file() and (d / "wikitext.json").is_file() and (d / "config.yaml").is_file():
            if config.load(d / "config.yaml").to_dict() == cfg.to_dict():
                return d
    return None


def run(overrides: dict, out_root: Path) -> dict:
    """Train (or reuse an identical finished run) and add WikiText perplexity."""
    items = {**BASE, **overrides}
    cfg = config.load(None, [f"{k}={v}" for k, v in items.items()])
    # Rows shared by several tables train once: reuse any finished run whose saved config, read
    # with today's schema (new keys take their defaults), equals this one.
    key = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    d = cached(cfg, out_root) or out_root / "runs" / key
    if (d / "summary.json").is_file() and (d / "wikitext.json").is_file():
        s = json.loads((d / "summary.json").read_text())
    else:
        t0 = time.perf_counter()
        s = Trainer(cfg, d, progress=False).fit()
        s["wall_seconds"] = time.perf_counter() - t0
        (d / "summary.json").write_text(json.dumps(s, indent=2))
        wiki = perplexity(str(d), str(DATA / "wikitext2" / "test.txt"), WIKI_TOKENS, seq_len=256)
        (d / "wikitext.json").write_text(json.dumps(wiki))
    s["wikitext_ppl"] = json.loads((d / "wikitext.json").read_text())["ppl"]
    s["run_dir"] = str(d)
    return s


def spread(xs):
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def row(method: str, summaries: list[dict]) -> dict:
    peak_planned = max(st["planned_state_bytes"]["total"] for st in summaries[0]["stages"])
    peak_measured = max(st["measured_state_bytes"]["total"] for st in summaries[0]["stages"])
    peak_tracked = max((st["peak_bytes"] or 0) for st in summaries[0]["stages"])
    val = [s["final_val_ppl"] for s in summaries]
    wiki = [s["wikitext_ppl"] for s in summaries]
    last = summaries[0]["stages"][-1]
    first = summaries[0]["stages"][0]
    return {"method": method, "val_ppl": statistics.mean(val), "val_ppl_spread": spread(val),
            "wikitext_ppl": statistics.mean(wiki), "wikitext_ppl_spread": spread(wiki),
            "planned_peak_bytes": peak_planned, "measured_peak_bytes": peak_measured,
            "tracked_peak_bytes": peak_tracked, "layers_per_stage": summaries[0]["layers_per_stage"],
            "tokens": summaries[0]["tokens_seen"], "flops": summaries[0]["flops"],
            "wall_seconds": statistics.mean(s["wall_seconds"] for s in summaries),
            "tokens_per_second": statistics.mean(s["tokens_per_second"] for s in summaries),
            "first_stage_step_seconds": first["step_seconds"] / max(1, first["steps"] - 1),
            "last_stage_step_seconds": last["step_seconds"] / max(1, last["steps"] - 1),
            "seeds": [s.get("seed", i) for i, s in enumerate(summaries)], "n_seeds": len(summaries),
            "run_dirs": [s["run_dir"] for s in summaries]}


def fmt_ppl(mean, sd, n):
    return f"{mean:.1f} ± {sd:.1f}" if n > 1 else f"{mean:.1f}"


def table(rows: list[dict], ref_step_seconds: float | None = None) -> str:
    mib = 2**20
    lines = ["| method | layers/stage | planned peak (MiB) | measured peak (MiB) | tracked peak (MiB) | val ppl | "
             "WikiText ppl | tokens | FLOPs | wall (s) | last-stage step / vanilla step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{r['last_stage_step_seconds'] / ref_step_seconds:.2f}" if ref_step_seconds else "–"
        lines.append(f"| {r['method']} | {'→'.join(map(str, r['layers_per_stage']))} | "
                     f"{r['planned_peak_bytes'] / mib:.1f} | {r['measured_peak_bytes'] / mib:.1f} | "
                     f"{r['tracked_peak_bytes'] / mib:.1f} | {fmt_ppl(r['val_ppl'], r['val_ppl_spread'], r['n_seeds'])} | "
                     f"{fmt_ppl(r['wikitext_ppl'], r['wikitext_ppl_spread'], r['n_seeds'])} | {r['tokens']:,} | "
                     f"{r['flops']:.3g} | {r['wall_seconds']:.0f} | {rel} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="all", choices=["all", *SUITES])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    if not (DATA / "gutenberg" / "train.jsonl.gz").is_file():
        sys.exit(f"replicate: error: {DATA} lacks gutenberg/train.jsonl.gz (the shared data)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    SUITES["main"]["step-2stages-budget"] = [budget_row()]
    t_start = time.perf_counter()
    report = {}
    for suite in ([*SUITES] if a.suite == "all" else [a.suite]):
        rows = []
        for method, variants in SUITES[suite].items():
            print(f"[{suite}] {method}: {len(variants)} run(s)  ({(time.perf_counter() - t_start) / 60:.1f} min so far)",
                  file=sys.stderr, flush=True)
            summaries = []
            for v in variants:
                s = run(v, out)
                s["seed"] = v.get("train.seed", 0)
                summaries.append(s)
            rows.append(row(method, summaries))
        report[suite] = rows
        van = next((r for r in rows if r["method"] == "vanilla"), None)
        md = table(rows, van["first_stage_step_seconds"] if van else None)
        title = {"main": "Table 2 (main comparison)"}.get(suite, f"{suite} ablation — {PAPER_TRENDS.get(suite, '')}")
        (out / f"{'replication' if suite == 'main' else suite}.md").write_text(f"### {title}\n\n{md}\n")
        (out / f"{'replication' if suite == 'main' else suite}.json").write_text(json.dumps(rows, indent=2))
        print(f"\n### {title}\n\n{md}\n")
        if suite == "main":
            by = {r["method"]: r for r in rows}
            plot_loss_vs_flops({m: by[m]["run_dirs"][0] for m in by}, out / "loss_vs_flops.png")
            plot_memory(by["step-3stages"]["run_dirs"][0], out / "memory_step3.png",
                        vanilla_dir=by["vanilla"]["run_dirs"][0])
            print(f"memory budget for the planner row: {budget_bytes() / 2**20:.2f} MiB of layer states "
                  f"(vanilla's at 8 layers)")
    print(f"total wall time: {(time.perf_counter() - t_start) / 60:.1f} min", file=sys.stderr)


if __name__ == "__main__":
    main()
