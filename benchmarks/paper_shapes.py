"""The paper's own shapes on this machine (issue #35): per stage of STEP and vanilla at 368M, 680M
and 1.2B, the planned and measured model-state bytes, the peak of a real training step next to the
planner's extended prediction, and STEP's step time against vanilla's at the same depth next to
the ratio the corrected FLOPs count predicts.

    python benchmarks/paper_shapes.py                     # every size; resumable
    python benchmarks/paper_shapes.py --sizes 368m,680m   # some sizes
    python benchmarks/paper_shapes.py --smoke --out DIR   # tiny shapes, same code path, seconds (the test)
    python benchmarks/paper_shapes.py --profile           # also torch.profiler's tables of the timed stages

Runs: configs/paper-368m.yaml (STEP-2stages and vanilla), paper-680m.yaml (the same),
paper-1.2b.yaml and paper-1.2b-3stage.yaml (STEP-2stages and STEP-3stages, each with the
presets' split from the Eq. 3 planner and with the paper's Table 1 split, 14→24 and 11→19→24;
vanilla 1.2B where it fits), loaded by steplm's config loader with these changes: random token ids
(memory and time do not depend on the text; a generated text sets up the trainer's data),
grad_accum 1 (a step's peak is the same with 144 micro-batches; so is its time per micro-batch,
less the optimizer step, which here counts once per micro-batch instead of once per 144), eager
(train.compile false, so that MemTracker sees every tensor), train.dtype auto (bf16 autocast
where the CPU has native bf16 matmuls, else fp32), activation checkpointing on, the presets'
micro-batch (8) and seq len (1024), or the largest micro-batch that the memory check passes
(stated in the row).

Every stage is one row of benchmarks/results/paper_shapes.json (a list), measured in a child
process forked for it (a fresh heap), which builds the run's Trainer and moves it to the stage with
Trainer.next_stage() (growth, freezing and adapters as in a real run; the weights need no
training to be measured), takes one step (the optimizer states now exist) and one step under the
peak tracker (measure.peak_step: MemTracker on CPU, max_memory_allocated on CUDA), and asserts that
the planned model-state bytes equal the live ones. A STEP stage after the first is then timed
against vanilla at the same depth, in the same process: interleaved rounds of one step each (the
order alternates), after one warm-up step each, median over the rounds; where the two do not fit
in memory together, STEP's steps in that process and then vanilla's in a fresh one forked for it
(one warm-up step, then the same number of rounds), so that no heap the STEP run left behind is
counted against vanilla (``timing`` says which). Stage 1 trains every layer, so it is vanilla at
n_1 layers (FLOPs ratio 1): it is timed only with --time-stage1.

Row fields: size, method, split, layers_per_stage, stage (1-based), layers, micro_batch, seq_len,
planned_state_bytes, measured_state_bytes (model states: weights, gradients, Adam moments, with
embeddings and head; the ``*_layer_state_bytes`` fields count the transformer layers alone, as
the paper does), tracked_peak_bytes, predicted_peak_bytes (as `steplm plan --extended` predicts
a step's peak), rss_peak_bytes (the child process's peak resident set); for STEP stages
flops_ratio (corrected FLOPs per token of the stage over vanilla's at the same depth, from the
plan), step_time_ratio, step_seconds, vanilla_step_seconds and timing. A run that cannot take a step
says why in ``note``: the memory check (its predicted peak above the memory the machine has free),
steplm's own refusal, or an out-of-memory error (a child's allocations are capped at that free
memory with RLIMIT_DATA, so the kernel never has to kill it).

Resumable: each row is written to the JSON as soon as it is measured, and a rerun measures only the
rows that are missing (delete a row to measure it again); the .md table and the PNG (Figure 2's
style: memory per stage for each size, the paper's printed numbers marked) are redrawn from the JSON.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import multiprocessing
import os
import resource
import shlex
import statistics
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from measure import data_overrides, peak_source, peak_step, step, trainer  # noqa: E402
from throughput import interleaved  # noqa: E402
from steplm import config  # noqa: E402
from steplm.allocator import available_bytes  # noqa: E402 (MemAvailable, or less under a cgroup limit)
from steplm.devices import cpu_name  # noqa: E402
from steplm.errors import UserError  # noqa: E402
from steplm.methods.base import layer_shape, precision  # noqa: E402
from steplm.plan import memory  # noqa: E402
from steplm.plan.stages import plan_run  # noqa: E402

GB = 1e9
CONFIGS = ROOT / "configs"
# (size, method, preset, split, overrides)
RUNS = [
    ("368m", "step-2stages", "paper-368m", "preset", {}),
    ("368m", "vanilla", "paper-368m", "", {"method": "vanilla"}),
    ("680m", "step-2stages", "paper-680m", "preset", {}),
    ("680m", "vanilla", "paper-680m", "", {"method": "vanilla"}),
    # 1.2B: first what answers "does STEP train where vanilla cannot" (vanilla, then STEP-3stages)
    ("1.2b", "vanilla", "paper-1.2b", "", {"method": "vanilla"}),
    ("1.2b", "step-3stages", "paper-1.2b-3stage", "preset", {}),
    ("1.2b", "step-2stages", "paper-1.2b", "preset", {}),
    ("1.2b", "step-3stages", "paper-1.2b-3stage", "paper Table 1", {"step.layers_per_stage": "[11,8,5]"}),
    ("1.2b", "step-2stages", "paper-1.2b", "paper Table 1", {"step.layers_per_stage": "[14,10]"}),
]
# glibc's own allocator (train.host_allocator=system): a retained heap fragments to 1.5-1.8x a step's
# tensors at these shapes, memory the allocator keeps, not memory the method needs
COMMON = {"train.grad_accum": 1, "train.compile": False, "train.dtype": "auto", "train.activation_checkpointing": True,
          "train.eval_every": 0, "train.checkpoint_every": 0, "train.host_allocator": "system"}
# --smoke: the same runs at tiny widths (the 1.2b the widest, so that its vanilla is the largest run)
SMOKE = {"model.vocab_size": 512, "model.n_heads": 2, "model.max_seq_len": 64, "train.seq_len": 64,
         "train.micro_batch": 2, "lora.rank": 4, "lora.alpha": 8}
SMOKE_WIDTH = {"368m": 16, "680m": 32, "1.2b": 48}
# The paper's Table 1 splits, and the memory it prints (GB, model states of the transformer layers:
# weights, gradients and Adam moments, no embeddings or head) for the runs this repository has a
# source for: vanilla 5.9 / 10.9 / 19.3 and STEP-2stages 368M 3.4 (Table 2's memory column, as
# gpu.py and issue #32 quote it), STEP-3stages 1.2B 8.9 (the abstract's "up to 53.9 %" of 19.3).
PAPER_SPLIT = {"368m": [7, 5], "680m": [14, 10], "1.2b": [14, 10], "1.2b-3": [11, 8, 5]}
PAPER_GB = {("368m", "vanilla"): 5.9, ("368m", "step-2stages"): 3.4, ("680m", "vanilla"): 10.9,
            ("1.2b", "vanilla"): 19.3, ("1.2b", "step-3stages"): 8.9}
# imported by the parent before it forks (no torch op runs), so that each child does not import them again
PRELOAD = ("torch._dynamo", "torch.distributed._tools.mem_tracker", "torch.distributed.fsdp", "steplm.passes.growth",
           "tokenizers")
HEADROOM = 10**9  # kept free for the allocator's slack, oneDNN's scratch and the rest of the machine
ROUNDS = 3
PENDING = "vanilla pending"  # a row whose STEP steps are timed and whose vanilla's are not yet


# ---------------------------------------------------------------------------- configs and plans
def overrides(run: tuple, a, **extra) -> dict:
    """The --set items of one run (its own, the common ones, --smoke's, --micro-batch), plus ``extra``."""
    size, _, _, _, own = run
    o = {**COMMON, **own}
    if extra.get("method") == "vanilla":  # vanilla at some depth: no split to check against it
        o.pop("step.layers_per_stage", None)
    if a.smoke:
        o.update(SMOKE, **{"model.d_model": SMOKE_WIDTH[size]})
    if a.micro_batch:
        o["train.micro_batch"] = a.micro_batch
    return {**o, **a.data, **extra}


def load(run: tuple, a, **extra):
    cfg = config.load(CONFIGS / f"{run[2]}.yaml", [f"{k}={v}" for k, v in overrides(run, a, **extra).items()])
    config.validate(cfg)
    return cfg


def predicted_peak_bytes(cfg, stage) -> int:
    """The planner's prediction of one training step's peak at ``stage`` (bytes), composed from the
    planner's functions as `steplm plan --extended` composes it for its largest stage (cli.main.cmd_plan;
    tests/test_paper_shapes.py checks that the two agree): the larger of the model states with every
    gradient (at the optimizer step) and, at the start of the backward pass, the states without the
    gradients not formed yet (all but the head's) plus memory.activation_bytes (memory.step_peak_bytes)."""
    m, t = cfg.model, cfg.train
    shape = layer_shape(m)
    grad = 2 if precision(cfg).master_weights == "bf16" else 4  # bytes of one gradient element
    acts = memory.activation_bytes(stage.layers, m.d_model, m.n_heads, t.seq_len, t.micro_batch, m.vocab_size,
                                    t.activation_checkpointing, ffn_hidden=shape.ffn_hidden, q_dim=shape.q_dim,
                                    kv_dim=shape.kv_dim)
    head_params = 2 * m.vocab_size * m.d_model + m.d_model
    return memory.step_peak_bytes(stage.planned_state_bytes["total"], grad * (stage.trainable_params + head_params),
                                  grad * m.vocab_size * m.d_model, acts)


def fitting_micro_batch(run: tuple, a, index: int, budget: int) -> int:
    """The preset's micro-batch, halved until the stage's predicted step peak fits ``budget`` bytes
    (at least 1)."""
    mb = load(run, a).train.micro_batch
    while mb > 1:
        cfg = load(run, a, **{"train.micro_batch": mb})
        if predicted_peak_bytes(cfg, plan_run(cfg).stages[index]) <= budget:
            break
        mb //= 2
    return mb


def key(row: dict) -> tuple:
    return row["size"], row["method"], tuple(row["layers_per_stage"]), row["stage"]


def todo(a) -> list[tuple[tuple, int, dict]]:
    """(run, stage index, row key fields) of every row of the chosen sizes."""
    out = []
    for run in RUNS:
        if run[0] not in a.sizes:
            continue
        plan = plan_run(load(run, a))
        for i in range(len(plan.stages)):
            out.append((run, i, {"size": run[0], "method": run[1], "layers_per_stage": plan.layers_per_stage,
                                 "stage": i + 1}))
    return out


# ---------------------------------------------------------------------------- memory of this machine
def cap_allocations(limit: int) -> None:
    """Cap this process's further allocations at ``limit`` bytes (RLIMIT_DATA over what it maps now),
    so that running out of memory is an allocation error it can report, not the kernel's OOM kill."""
    status = Path("/proc/self/status").read_text()
    data = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmData:"))
    resource.setrlimit(resource.RLIMIT_DATA, (data + limit, data + limit))


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure (torch's CPU allocator past RLIMIT_DATA, or CUDA's)."""
    return (isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "DefaultCPUAllocator" in str(e)
            or "out of memory" in str(e).lower())


# ---------------------------------------------------------------------------- one row (in a child)
def measure_row(run: tuple, index: int, a, tmp: Path) -> dict:
    """Measure stage ``index`` of ``run`` in this process (see the module docstring); the row."""
    size, method, preset, split, _ = run
    if a.smoke:  # tiny ops: one thread is faster than two, and much faster on a busy machine
        torch.set_num_threads(1)
    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    budget = (int(a.memory_gb * GB) if a.memory_gb else
              (torch.cuda.mem_get_info()[0] if cuda else available_bytes()) - HEADROOM)
    preset_mb = load(run, a).train.micro_batch
    mb = fitting_micro_batch(run, a, index, budget)
    dev = {"train.micro_batch": mb, "train.device": "cuda" if cuda else "cpu"}
    cfg = load(run, a, **dev)
    plan = plan_run(cfg)
    st = plan.stages[index]
    row = {"size": size, "method": method, "split": split, "layers_per_stage": plan.layers_per_stage,
           "host_allocator": cfg.train.host_allocator, "command": getattr(a, "command", None),
           "stage": index + 1, "layers": st.layers, "micro_batch": mb, "seq_len": cfg.train.seq_len,
           "planned_state_bytes": st.planned_state_bytes["total"],
           "planned_layer_state_bytes": st.planned_state_bytes["layers"],
           "measured_state_bytes": None, "tracked_peak_bytes": None,
           "predicted_peak_bytes": predicted_peak_bytes(cfg, st), "budget_bytes": budget}
    staged = len(plan.stages) > 1
    if staged:  # the corrected FLOPs count's prediction of STEP's step time over vanilla's at this depth
        van = plan_run(load(run, a, method="vanilla", **{"model.n_layers": st.layers}, **dev)).stages[0]
        row.update(flops_ratio=st.flops_per_token["corrected"] / van.flops_per_token["corrected"],
                   step_time_ratio=None, step_seconds=None, vanilla_step_seconds=None)
    if row["predicted_peak_bytes"] > budget:
        return {**row, "note": f"not run: its predicted step peak, {row['predicted_peak_bytes'] / GB:.2f} GB even at "
                               f"micro-batch {mb}, is more than the {budget / GB:.2f} GB free for it"}
    if mb < preset_mb:
        row["micro_batch_note"] = f"micro-batch {mb}, not {preset_mb}: the largest that fits {budget / GB:.2f} GB"
    if not cuda:
        cap_allocations(budget + HEADROOM // 2)
    try:
        t = trainer(CONFIGS / f"{preset}.yaml", overrides(run, a, **dev), tmp / "run")
        row["host_allocator"] = getattr(t, "host_allocator", None)  # what it chose (None: not on CPU)
        while t.stage < index:
            t.next_stage()
        step(t)  # warm-up: the optimizer states exist from here on
        peak, live = peak_step(t)
    except UserError as e:
        return {**row, "note": f"refused by steplm: {e}"}
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e):
            raise
        return {**row, "note": f"out of memory: {str(e).splitlines()[0]}"}
    if (live["total"], live["layers"]) != (st.planned_state_bytes["total"], st.planned_state_bytes["layers"]):
        raise AssertionError(f"{size} {method} {plan.layers_per_stage} stage {index + 1}: planned "
                             f"{st.planned_state_bytes} != measured {live}")
    row.update(measured_state_bytes=live["total"], measured_layer_state_bytes=live["layers"], tracked_peak_bytes=peak,
               peak_source=peak_source(t.device), dtype=str(t.dtype).replace("torch.", ""),
               device=torch.cuda.get_device_name() if cuda else f"{cpu_name()}, {torch.get_num_threads()} threads")
    if staged and (index > 0 or a.time_stage1):
        van_sets = overrides(run, a, method="vanilla", **{"model.n_layers": st.layers}, **dev)
        try:
            prof = (a.out / "paper_shapes_profile" / f"{size}_{method}_{'-'.join(map(str, plan.layers_per_stage))}"
                    f"_stage{index + 1}.txt") if a.profile else None
            if prof:
                prof.parent.mkdir(exist_ok=True)
                row["profile"] = str(prof.relative_to(a.out))
            row.update(time_against_vanilla(t, CONFIGS / f"{preset}.yaml", van_sets, a.rounds, budget, tmp, prof))
        except (RuntimeError, MemoryError) as e:
            if not out_of_memory(e):
                raise
            row["timing"] = f"out of memory: {str(e).splitlines()[0]}"
    elif staged:
        row["timing"] = (f"not timed: stage 1 trains every layer, the step of vanilla at {st.layers} layers "
                         f"(--time-stage1 times it)")
    row["rss_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return row


def profile_table(t, rows: int = 20) -> str:
    """torch.profiler's operators of one step of ``t``, by self CPU time (one more step, untimed)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if t.device.type == "cuda" else [])]) as p:
        step(t)
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def time_against_vanilla(t, path: Path, van_sets: dict, rounds: int, budget: int, tmp: Path,
                         profile: Path | None = None) -> dict:
    """Median seconds of ``t``'s step and of vanilla's at the same depth (config ``path`` with
    ``van_sets``), after one warm-up step of vanilla's, over ``rounds`` rounds of one step each:
    interleaved (the order alternates) when the two fit in ``budget`` bytes together; else (or when
    building vanilla beside it runs out of memory after all) STEP's steps here, with the row marked
    ``PENDING`` for the parent to time vanilla's in a fresh process. With ``profile`` (a file), the profiler's
    table of one step of each is written there (where the time of a ratio above its FLOPs goes)."""
    van = config.load(path, [f"{k}={v}" for k, v in van_sets.items()])
    alone = predicted_peak_bytes(van, plan_run(van).stages[0])
    need = predicted_peak_bytes(t.cfg, t.current_stage) + alone
    if alone > budget:
        return {"timing": f"not timed: vanilla at {van.model.n_layers} layers does not fit ({alone / GB:.2f} GB "
                          f"predicted, {budget / GB:.2f} GB free)"}
    tables = [f"== STEP stage {t.stage + 1} ({t.current_stage.layers} layers)\n{profile_table(t)}"] if profile else []
    v = None
    if need <= budget:  # predicted to fit beside it; the process's heap may still not (then as below)
        try:
            v = trainer(path, van_sets, tmp / "vanilla")
            step(v)
        except (RuntimeError, MemoryError) as e:
            if not out_of_memory(e):
                raise
            v = None
            gc.collect()
    if v is None:  # vanilla's rounds in a process of its own, forked by the parent (``complete_timing``)
        if profile:
            profile.write_text("\n\n".join(tables) + "\n")
        return {"step_seconds_per_round": [step(t) for _ in range(rounds)], "timing": PENDING,
                "vanilla_sets": van_sets, "vanilla_config": str(path),
                "vanilla_profile": str(profile) if profile else None, "pair_bytes": need}
    times = interleaved({"step": lambda: step(t), "vanilla": lambda: step(v)}, rounds, 1)
    mode = "interleaved"
    if profile:
        tables.append(f"== vanilla at {van.model.n_layers} layers\n{profile_table(v)}")
        profile.write_text("\n\n".join(tables) + "\n")
    s, v_s = statistics.median(times["step"]), statistics.median(times["vanilla"])
    return {"step_seconds": s, "vanilla_step_seconds": v_s, "step_time_ratio": s / v_s, "timing": mode,
            "step_time_ratio_per_round": [x / y for x, y in zip(times["step"], times["vanilla"])]}


def vanilla_times(path: Path, van_sets: dict, rounds: int, budget: int, profile: Path | None) -> list[float]:
    """Seconds of ``rounds`` steps of vanilla (config ``path`` with ``van_sets``) after one warm-up
    step, in this process (a child of its own); with ``profile``, its table is appended there."""
    if van_sets.get("train.device") != "cuda":
        cap_allocations(budget + HEADROOM // 2)
    with tempfile.TemporaryDirectory() as tmp:
        v = trainer(path, van_sets, Path(tmp) / "vanilla")
        step(v)
        times = [step(v) for _ in range(rounds)]
        if profile:
            with profile.open("a") as fh:
                fh.write(f"\n\n== vanilla at {v.cfg.model.n_layers} layers (its own process)\n{profile_table(v)}\n")
    return times


def complete_timing(row: dict, ctx) -> dict:
    """A row whose STEP steps were timed without vanilla beside it (``PENDING``): time vanilla's
    steps in a fresh child and fill the ratio, or say why it could not be."""
    step_times = row.pop("step_seconds_per_round")
    sets, path, prof, need = (row.pop(k) for k in ("vanilla_sets", "vanilla_config", "vanilla_profile", "pair_bytes"))
    kind, payload = forked(ctx, vanilla_times, Path(path), sets, len(step_times), row["budget_bytes"],
                           Path(prof) if prof else None)
    if kind == "died":
        return {**row, "timing": f"vanilla not timed: {payload}"}
    if kind == "error":
        if not out_of_memory(Exception(payload)):
            sys.exit(f"paper_shapes: timing vanilla for {row['size']} {row['method']} stage {row['stage']} failed:\n"
                     f"{payload}")
        return {**row, "timing": f"out of memory timing vanilla: {payload.strip().splitlines()[-1]}"}
    s, v_s = statistics.median(step_times), statistics.median(payload)
    return {**row, "step_seconds": s, "vanilla_step_seconds": v_s, "step_time_ratio": s / v_s,
            "step_time_ratio_per_round": [x / y for x, y in zip(step_times, payload)],
            "timing": f"sequential, one process each: the two do not fit together ({need / GB:.2f} GB predicted, "
                      f"{row['budget_bytes'] / GB:.2f} GB free)"}


def forked(ctx, fn, *args):
    """Run ``fn(*args)`` in a forked child (a fresh heap); ("row", its result), ("error", the
    traceback) or ("died", why) when it was killed before it could answer."""
    recv, send = ctx.Pipe(duplex=False)

    def target():
        try:
            send.send(("row", fn(*args)))
        except BaseException:  # noqa: BLE001 (reported to the parent)
            send.send(("error", traceback.format_exc()))
        finally:
            send.close()

    p = ctx.Process(target=target)
    p.start()
    send.close()
    try:
        out = recv.recv()
    except EOFError:  # killed before it could answer (a signal: the kernel's OOM killer, a crash)
        p.join()
        return "died", f"the measuring process died (exit {p.exitcode})"
    p.join()
    return out


def measure_in_tmp(run, index, a) -> dict:
    """measure_row with a temporary folder for the run (a forked child's whole work)."""
    with tempfile.TemporaryDirectory() as tmp:
        return measure_row(run, index, a, Path(tmp))


# ---------------------------------------------------------------------------- results
def read_rows(f: Path) -> list[dict]:
    return json.loads(f.read_text()) if f.is_file() else []


def write_rows(f: Path, rows: list[dict]) -> None:
    order = {k: i for i, k in enumerate((r[0], r[1]) for r in RUNS)}
    rows = sorted(rows, key=lambda r: (order.get((r["size"], r["method"]), 99), r["layers_per_stage"], r["stage"]))
    tmp = f.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    os.replace(tmp, f)


def gb(x) -> str:
    return "–" if x is None else f"{x / GB:.3f}"


def table(rows: list[dict]) -> str:
    head = ("| size | run | stage | layers | micro-batch × seq | planned model states (GB) | measured (GB) | "
            "layer states, measured (GB) | tracked peak of a step (GB) | predicted peak (GB) | predicted / tracked | "
            "resident peak (GB) | host heap | step time / vanilla's | FLOPs ratio | note |")
    lines = [head, "|" + "---|" * 16]
    for r in rows:
        run = f"{r['method']} {'→'.join(str(n) for n in memory.cumulative(r['layers_per_stage']))}"
        ratio = (f"{r['predicted_peak_bytes'] / r['tracked_peak_bytes']:.3f}" if r.get("tracked_peak_bytes") else "–")
        time_ratio = f"{r['step_time_ratio']:.3f}" if r.get("step_time_ratio") else "–"
        flops = f"{r['flops_ratio']:.3f}" if "flops_ratio" in r else ""
        note = "; ".join(x for x in (r.get("note"), r.get("micro_batch_note"), r.get("timing")) if x)
        lines.append(f"| {r['size']} | {run} | {r['stage']} | {r['layers']} | {r['micro_batch']} × {r['seq_len']} | "
                     f"{gb(r['planned_state_bytes'])} | {gb(r['measured_state_bytes'])} | "
                     f"{gb(r.get('measured_layer_state_bytes'))} | {gb(r['tracked_peak_bytes'])} | "
                     f"{gb(r['predicted_peak_bytes'])} | {ratio} | {gb(r.get('rss_peak_bytes'))} | "
                     f"{HEAPS.get(r.get('host_allocator'), '–')} | {time_ratio} | {flops} | {note} |")
    return "\n".join(lines)


HEAPS = {"system": "glibc's", "retain": "retained"}


def write_md(f: Path, rows: list[dict], command: str) -> None:
    devices = sorted({r["device"] for r in rows if r.get("device")})
    dtypes = sorted({r["dtype"] for r in rows if r.get("dtype")})
    commands = list(dict.fromkeys(r["command"] for r in rows if r.get("command"))) or [command]
    f.write_text(
        f"### The paper's shapes, per stage ({datetime.date.today().isoformat()})\n\n"
        f"Rows from {', '.join(f'`{c}`' for c in commands)}, on {', '.join(devices) or 'no device yet'} ({', '.join(dtypes) or '–'}, eager, activation "
        f"checkpointing, random token ids, one micro-batch per step). Model states are weights, gradients and Adam "
        f"moments with the embeddings and head; the paper's memory figures count the transformer layers' states "
        f"only (its Eq. 1-2), which is what its percentages compare, so they leave out the embeddings and head "
        f"that STEP does not shrink (the layer-states column). The tracked peak is every tensor byte of one "
        f"step; the predicted peak is `steplm plan --extended`'s. Step time / vanilla's is the median over "
        f"rounds of STEP's step against vanilla's at the same depth, in one process; the FLOPs ratio is the "
        f"corrected count's prediction of it, which does not charge activation checkpointing's recomputed forward "
        f"pass (2 FLOPs per parameter and token in every layer, frozen or not): that moves the ratio a step can "
        f"reach a few per cent closer to 1. The resident peak is the row's process's (ru_maxrss); the host heap is "
        f"glibc's allocator as it runs (train.host_allocator=system) or retained (retain, the old CPU default), "
        f"which fragments to 1.5-1.8x a step's tensors.\n\n{table(rows)}\n")


def plot(f: Path, rows: list[dict], paper: bool = True) -> None:
    """Figure 2's style: model-state memory per stage (layers, then embeddings and head, stacked) of
    every run, one panel per size, with the tracked and predicted peaks and (``paper``) the paper's
    printed numbers (layer states) marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r["size"] for r in rows))
    width = [sum(r["size"] == s for r in rows) + 2 for s in sizes]
    fig, axes = plt.subplots(1, len(sizes), figsize=(0.75 * sum(width) + 2, 4.8), squeeze=False,
                             gridspec_kw={"width_ratios": width})
    for ax, size in zip(axes[0], sizes):
        x, ticks, labels, marked = 0, [], [], set()
        runs = list(dict.fromkeys((r["method"], tuple(r["layers_per_stage"])) for r in rows if r["size"] == size))
        for method, split in runs:
            stage_rows = [r for r in rows if r["size"] == size and (r["method"], tuple(r["layers_per_stage"])) == (method, split)]
            xs = []
            for r in stage_rows:
                measured = r["measured_state_bytes"] is not None
                layers = (r.get("measured_layer_state_bytes") or r["planned_layer_state_bytes"]) / GB
                total = (r["measured_state_bytes"] or r["planned_state_bytes"]) / GB
                style = {} if measured else {"fill": False, "hatch": "//", "edgecolor": "grey"}
                ax.bar(x, layers, color="tab:blue", **style, label=None if "l" in marked else "layer states")
                ax.bar(x, total - layers, bottom=layers, color="tab:cyan", **style,
                       label=None if "e" in marked else "embeddings + head")
                marked |= {"l", "e"}
                if r["tracked_peak_bytes"]:
                    ax.plot(x, r["tracked_peak_bytes"] / GB, "ko", label=None if "p" in marked else "tracked peak")
                    marked.add("p")
                ax.plot(x, r["predicted_peak_bytes"] / GB, "x", color="tab:orange",
                        label=None if "x" in marked else "predicted peak")
                marked.add("x")
                if not measured:
                    ax.text(x, total / 2, "did not run", ha="center", va="center", fontsize=7, rotation=90)
                xs.append(x)
                ticks.append(x)
                labels.append(f"{r['stage']}")
                x += 1
            printed = PAPER_GB.get((size, method)) if paper else None
            paper_split = PAPER_SPLIT.get(f"{size}-3" if method == "step-3stages" else size)
            if printed and (method == "vanilla" or list(split) == paper_split):
                ax.hlines(printed, xs[0] - 0.4, xs[-1] + 0.4, colors="tab:red", linestyles="--",
                          label=None if "r" in marked else "paper (layer states)")
                marked.add("r")
            name = "vanilla" if method == "vanilla" else \
                f"{method.split('-')[1][0]}-stage\n{'→'.join(str(n) for n in memory.cumulative(list(split)))}"
            ax.text((xs[0] + xs[-1]) / 2, -0.08, name, transform=ax.get_xaxis_transform(), ha="center", va="top",
                    fontsize=8)
            x += 0.5
        budget = max((r["budget_bytes"] for r in rows if r["size"] == size and "budget_bytes" in r), default=None)
        if budget:
            ax.axhline(budget / GB, color="grey", linestyle=":", label="memory free for a run")
        ax.set_xticks(ticks, labels, fontsize=7)
        ax.set_title(size)
        ax.set_ylabel("GB (10⁹ B)")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Memory per stage at the paper's shapes (stages numbered; runs below)")
    fig.tight_layout()
    fig.savefig(f, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- main
def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="368m,680m,1.2b", help="comma-separated: 368m, 680m, 1.2b")
    ap.add_argument("--rounds", type=int, default=None, help=f"timed rounds per STEP stage (default {ROUNDS}; smoke 2)")
    ap.add_argument("--micro-batch", type=int, help="instead of the presets' 8")
    ap.add_argument("--memory-gb", type=float, help="memory a row may use (default: the machine's free memory "
                                                    "less 1 GB; on CUDA the GPU's)")
    ap.add_argument("--time-stage1", action="store_true", help="also time stage 1 against vanilla (the same step)")
    ap.add_argument("--profile", action="store_true", help="write torch.profiler's table of one step of each timed "
                                                           "STEP stage and of its vanilla (paper_shapes_profile/)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, same code path (seconds)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    a.sizes = [s.strip() for s in a.sizes.split(",")]
    if unknown := set(a.sizes) - {r[0] for r in RUNS}:
        ap.error(f"--sizes: unknown {sorted(unknown)}")
    a.rounds = a.rounds or (2 if a.smoke else ROUNDS)
    a.command = "python benchmarks/paper_shapes.py" + (" " + shlex.join(argv) if argv else "")
    out = a.out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = tempfile.TemporaryDirectory(prefix="paper-shapes-")  # the generated text and its token cache
    a.data = data_overrides(Path(work.name))
    if a.smoke and a.memory_gb is None:  # as at full size on 24 GB: every run fits but vanilla 1.2b
        peaks = {(r[0], r[1], i): predicted_peak_bytes(c, s) for r in RUNS for c in [load(r, a)]
                 for i, s in enumerate(plan_run(c).stages)}
        a.memory_gb = max(p for k, p in peaks.items() if k[:2] != ("1.2b", "vanilla")) / GB
    f = out / "paper_shapes.json"
    rows = read_rows(f)
    done = {key(r) for r in rows}
    measured = 0
    for name in PRELOAD:
        importlib.import_module(name)
    ctx = multiprocessing.get_context("fork")  # the parent has run no torch op: fork is safe, and cheap
    for run, i, k in todo(a):
        if key(k) in done:
            continue
        print(f"[paper_shapes] {run[0]} {run[1]} {k['layers_per_stage']} stage {i + 1}", file=sys.stderr, flush=True)
        kind, payload = forked(ctx, measure_in_tmp, run, i, a)
        if kind == "died":
            kind, payload = "row", {**k, "note": payload}
        if kind == "error":
            sys.exit(f"paper_shapes: {run[0]} {run[1]} stage {i + 1} failed:\n{payload}")
        if payload.get("timing") == PENDING:
            payload = complete_timing(payload, ctx)
        rows.append(payload)
        done.add(key(payload))
        write_rows(f, rows)
        measured += 1
    work.cleanup()
    rows = read_rows(f)
    write_md(out / "paper_shapes.md", rows, a.command)
    plot(out / "paper_shapes.png", rows, paper=not a.smoke)
    print(f"[paper_shapes] {measured} rows measured, {len(rows) - measured} kept; {f}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
