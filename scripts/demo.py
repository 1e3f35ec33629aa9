"""`make demo`: plan, then pre-train tiny vanilla and tiny STEP (2 stages) at equal FLOPs on the
Python standard library's own sources, and report memory and perplexity side by side.

Works offline on any machine: the corpus is this interpreter's stdlib (tests and site-packages
excluded; about 5 % of modules, chosen by a hash of their path, are held out for validation), and
the tokenizer is a 4096-token byte-level BPE trained on it.
"""
from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from steplm import config  # noqa: E402
from steplm.plots import plot_loss_vs_flops, plot_memory  # noqa: E402
from steplm.plan.stages import layer_shape  # noqa: E402
from steplm.train.loop import Trainer  # noqa: E402
from steplm.plan import solve

# The stdlib's own test suites (test, idle_test: most of its text, and code that reads unlike the rest)
# and installed packages are not the corpus: skipped by directory name (data.exclude).
STDLIB_EXCLUDE = "[test, tests, idle_test, site-packages]"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "demo"))
    ap.add_argument("--max-steps", type=int, default=None, help="vanilla step budget (default: the preset's)")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    stdlib = sysconfig.get_paths()["stdlib"]
    common = [f"data.path={stdlib}", f"data.exclude={STDLIB_EXCLUDE}", "data.max_train_tokens=3000000",
              f"data.cache_dir={ROOT / '.cache' / 'steplm'}"]
    if a.max_steps:
        common.append(f"train.max_steps={a.max_steps}")

    step_cfg = config.load(ROOT / "configs" / "tiny-step.yaml", common)
    shape = layer_shape(step_cfg.model)
    plan = solve.optimize(step_cfg.model.n_layers, step_cfg.step.n_stages, shape, step_cfg.lora.rank)
    print(f"corpus: Python {sys.version.split()[0]} standard library at {stdlib}")
    print(f"plan (Eq. 3, d={step_cfg.model.d_model}, L={step_cfg.model.n_layers}, r={step_cfg.lora.rank}): "
          f"layers per stage {plan.layers_per_stage}, layer states {plan.peak_bytes / 2**20:.2f} MiB vs "
          f"vanilla {plan.vanilla_bytes / 2**20:.2f} MiB (-{100 * plan.reduction:.1f} %)")

    results = {}
    for name, preset in (("vanilla", "tiny.yaml"), ("step-2stages", "tiny-step.yaml")):
        print(f"\n== {name} ({preset})")
        cfg = config.load(ROOT / "configs" / preset, common)
        t0 = time.perf_counter()
        results[name] = Trainer(cfg, out / name, progress=not a.quiet).fit()
        results[name]["wall_seconds"] = time.perf_counter() - t0

    mib = 2**20
    print("\n| method | layers per stage | val ppl | peak layer states (MiB) | peak model states (MiB) "
          "| peak tracked (MiB) | tokens | FLOPs (paper) | wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, s in results.items():
        st = s["stages"]
        layers = max(x["measured_state_bytes"]["layers"] for x in st) / mib
        total = max(x["measured_state_bytes"]["total"] for x in st) / mib
        peak = max((x["peak_bytes"] or 0) for x in st) / mib
        print(f"| {name} | {'→'.join(map(str, s['layers_per_stage']))} | {s['final_val_ppl']:.2f} | {layers:.2f} | "
              f"{total:.2f} | {peak:.2f} | {s['tokens_seen']:,} | {s['flops']:.3g} | {s['wall_seconds']:.0f} |")
    van, step = results["vanilla"], results["step-2stages"]
    v_layers = van["stages"][0]["measured_state_bytes"]["layers"]
    s_layers = max(x["measured_state_bytes"]["layers"] for x in step["stages"])
    print(f"\nSTEP peak layer-state memory is {100 * (1 - s_layers / v_layers):.1f} % below vanilla; "
          f"val ppl {step['final_val_ppl']:.2f} vs {van['final_val_ppl']:.2f} at "
          f"{step['flops'] / van['flops']:.3f}x vanilla's FLOPs.")
    fig2 = plot_memory(out / "step-2stages", out / "memory.png", vanilla_dir=out / "vanilla")
    curve = plot_loss_vs_flops({k: out / k for k in results}, out / "loss_vs_flops.png")
    (out / "demo.json").write_text(json.dumps({k: {kk: v[kk] for kk in ("final_val_ppl", "tokens_seen", "flops",
                                                                        "layers_per_stage", "stages")}
                                               for k, v in results.items()}, indent=2))
    print(f"plots: {fig2} (Figure 2, memory per stage), {curve} (val loss vs FLOPs)")
    print(f"summaries: {out / 'vanilla' / 'summary.json'}, {out / 'step-2stages' / 'summary.json'}")


if __name__ == "__main__":
    from steplm.errors import UserError
    try:
        main()
    except UserError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        sys.exit(2)
