"""Staged trainer: planned == measured state bytes per stage, freed optimizer state, FLOPs matching."""
import gc
import json
import math
import os
import subprocess
import sys
import weakref

import pytest
import torch

from steplm import config
from steplm.train.loop import Trainer
from steplm.train.optimizer import clip_in_step
from steplm.plan import memory
from steplm.plan import solve

from conftest import ROOT, tiny_overrides


def make(tmp_path, name="run", **extra):
    cfg = config.load(None, tiny_overrides(tmp_path, **extra))
    return Trainer(cfg, tmp_path / name, progress=False)


def eq2_layers(split, cfg, rank):
    """Eq. 2 from the model's real linears, written out here rather than taken from the planner."""
    d, f = cfg.d_model, cfg.ffn_hidden
    P = 4 * d * d + 3 * d * f + 2 * d
    E = rank * (4 * 2 * d + 3 * (d + f))
    out, before = [], 0
    for n in split:
        out.append(16 * n * P + 2 * before * P + 16 * before * E)
        before += n
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("staged")
    common = {"train.max_steps": 16}
    out = {}
    for name, extra in {
        "vanilla": {},
        "step2": {"method": "step", "step.n_stages": 2, "step.layers_per_stage": "[2,2]"},
        "step3": {"method": "step", "step.n_stages": 3, "step.layers_per_stage": "[2,1,1]"},
    }.items():
        tr = make(tmp, name, **common, **extra)
        out[name] = (tr, tr.fit())
    return out


@pytest.mark.parametrize("name,split", [("vanilla", [4]), ("step2", [2, 2]), ("step3", [2, 1, 1])])
def test_measured_state_equals_planned(runs, name, split):
    tr, summary = runs[name]
    m = tr.cfg.model
    rank = 0 if name == "vanilla" else tr.cfg.lora.rank
    by_hand = eq2_layers(split, m, rank)
    head = 16 * (2 * m.vocab_size * m.d_model + m.d_model)
    assert len(summary["stages"]) == len(split)
    for stage, expected in zip(summary["stages"], by_hand):
        assert stage["planned_state_bytes"]["layers"] == expected
        assert stage["measured_state_bytes"]["layers"] == expected
        assert stage["measured_state_bytes"]["total"] == stage["planned_state_bytes"]["total"] == expected + head
        assert stage["peak_bytes"] and stage["peak_bytes"] >= stage["measured_state_bytes"]["total"]
        for key in ("layers", "trainable_params", "frozen_params", "lora_params", "steps", "tokens", "flops",
                    "val_loss"):
            assert key in stage


def test_step_peak_below_vanilla(runs):
    van = runs["vanilla"][1]["stages"][0]["measured_state_bytes"]["layers"]
    for name in ("step2", "step3"):
        peak = max(s["measured_state_bytes"]["layers"] for s in runs[name][1]["stages"])
        assert peak < van
    assert max(s["measured_state_bytes"]["layers"] for s in runs["step3"][1]["stages"]) < \
        max(s["measured_state_bytes"]["layers"] for s in runs["step2"][1]["stages"])


def test_final_model_same_depth_and_shape(runs):
    for name in ("step2", "step3"):
        tr, summary = runs[name]
        assert len(tr.model.model.layers) == 4
        frozen = [any(not p.requires_grad for p in b.parameters()) for b in tr.model.model.layers]
        assert frozen.count(False) == tr.layers_per_stage[-1]
        assert summary["params"]["non_embedding"] == runs["vanilla"][1]["params"]["non_embedding"] + \
            summary["params"]["lora"]


def test_flops_match_vanilla_budget(runs):
    van = runs["vanilla"][1]["flops_by_convention"]["paper"]
    for name in ("step2", "step3"):
        tr, s = runs[name]
        per_step_last = s["stages"][-1]["flops"]["paper"] - s["stages"][-2]["flops"]["paper"]
        assert abs(s["flops_by_convention"]["paper"] - van) <= per_step_last / s["stages"][-1]["steps"]
        assert s["tokens_seen"] > runs["vanilla"][1]["tokens_seen"]  # cheaper stages buy more tokens
        # the corrected count charges frozen layers 4N, so it exceeds the paper's
        assert s["flops_by_convention"]["corrected"] > s["flops_by_convention"]["paper"]


def test_metrics_rows_have_step_and_stage(runs):
    """Stages are numbered from 1 in metrics.jsonl and summary.json, as `steplm plan` numbers them."""
    tr, summary = runs["step3"]
    rows = [json.loads(x) for x in (tr.out / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {1, 2, 3}
    assert all(isinstance(r["step"], int) for r in rows)
    bounds = [sum(summary["stage_steps"][:i]) for i in range(len(summary["stage_steps"]) + 1)]
    for r in rows:  # a row of step k belongs to the stage whose steps hold k (the end-of-stage val row too)
        first = bounds[r["stage"] - 1] + ("merge_kept_share" not in r)  # growth's merge: at the stage's step 0
        assert first <= r["step"] <= bounds[r["stage"]], r
    assert [s["stage"] for s in summary["stages"]] == [1, 2, 3]
    # `steplm plan --json` of the same config numbers them the same way, with the same layers
    out = subprocess.run([sys.executable, "-m", "steplm", "plan", str(tr.out / "config.yaml"), "--json"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")), timeout=120)
    assert out.returncode == 0, out.stderr
    planned = json.loads(out.stdout)["stages"]
    assert [(s["stage"], s["layers"]) for s in planned] == [(s["stage"], s["layers"]) for s in summary["stages"]]
    assert all("index" not in s for s in planned)


def test_growth_frees_old_optimizer_state(tmp_path):
    tr = make(tmp_path, **{"method": "step", "step.n_stages": 2, "step.layers_per_stage": "[2,2]",
                           "train.max_steps": 4})
    for _ in range(2):
        tr.train_step()
        tr.optimizer.zero_grad()
    old_layer_params = [p for b in tr.model.model.layers for p in b.parameters()]
    emb = tr.model.model.embed_tokens.weight
    emb_state = tr.optimizer.state[emb]["exp_avg"].clone()
    ref = weakref.ref(tr.optimizer)
    moments = [weakref.ref(tr.optimizer.state[p]["exp_avg"]) for p in old_layer_params]
    tr.next_stage()
    gc.collect()
    assert ref() is None and all(m() is None for m in moments)  # the tensors are gone, not just unreachable
    trainable = {id(p) for p in tr.model.parameters() if p.requires_grad}
    assert all(id(p) in trainable for p in tr.optimizer.param_groups[0]["params"] + tr.optimizer.param_groups[1]["params"])
    for name, p in tr.model.named_parameters():
        if not p.requires_grad:
            assert p not in tr.optimizer.state and p.dtype == torch.bfloat16 and p.grad is None, name
    assert torch.equal(tr.optimizer.state[emb]["exp_avg"], emb_state)  # embeddings keep their moments
    tr.train_step()
    assert all(p in tr.optimizer.state for g in tr.optimizer.param_groups for p in g["params"])


def test_lr_rewarms_each_stage(tmp_path):
    tr = make(tmp_path, **{"method": "step", "step.n_stages": 2, "step.layers_per_stage": "[2,2]",
                           "train.max_steps": 40, "train.warmup_steps": 4})
    peak = tr.cfg.train.lr
    n1 = tr.plan.stages[0].schedule_steps
    end_of_stage1 = tr.lr_at(tr.stage_steps[0] - 1)
    assert end_of_stage1 < peak
    tr.stage = 1
    assert tr.lr_at(0) == pytest.approx(peak / 4) and tr.lr_at(3) == pytest.approx(peak)
    # stage 1 is cut at 75 % of its nominal cosine, which runs from the peak (step 3) to the floor
    # (step n1 - 1): LR there is between floor and peak
    tr.stage = 0
    expect = peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (tr.stage_steps[0] - 1 - 3) / (n1 - 1 - 3))))
    assert end_of_stage1 == pytest.approx(expect)


@pytest.mark.parametrize("over", [
    {"method": "step", "step.n_stages": 2, "step.layers_per_stage": "[2,2]", "train.max_steps": 6},
    {"method": "vanilla", "train.max_steps": 5},
])
def test_trainer_warns_once_of_a_schedule_no_longer_than_its_warmup(tmp_path, capsys, over):
    """At start, rank 0 prints the plan's warning on stderr, one line, and keeps train.warmup_steps;
    with a warmup one step shorter than the shortest schedule, nothing."""
    first = make(tmp_path, "probe", **over).plan
    shortest = min(first.steps) if first.stages[0].schedule_restarts else first.total_steps
    capsys.readouterr()
    tr = make(tmp_path, "long", **over, **{"train.warmup_steps": shortest})
    err = [ln for ln in capsys.readouterr().err.splitlines() if "warmup" in ln]
    assert err == [f"steplm: warning: {tr.plan.warnings[0]}"] and "train.warmup_steps" in err[0]
    tr.step = shortest - 1  # the warmup's last step (of the stage, or the run), at the peak as given
    assert tr.cfg.train.warmup_steps == shortest and tr.lr_at(shortest - 1) == pytest.approx(tr.cfg.train.lr)
    make(tmp_path, "short", **over, **{"train.warmup_steps": shortest - 1})
    assert "warmup" not in capsys.readouterr().err


def test_step_no_pet_has_no_adapters(tmp_path):
    tr = make(tmp_path, **{"method": "step-no-pet", "step.n_stages": 2, "step.layers_per_stage": "[2,2]",
                           "train.max_steps": 6})
    s = tr.fit()
    assert s["params"]["lora"] == 0
    st = s["stages"][1]
    assert st["measured_state_bytes"]["layers"] == eq2_layers([2, 2], tr.cfg.model, 0)[1]


def test_planned_split_is_used_when_unset(tmp_path):
    tr = make(tmp_path, **{"method": "step", "step.n_stages": 2, "train.max_steps": 4})
    shape = memory.LayerShape(tr.cfg.model.d_model, tr.cfg.model.ffn_hidden)
    assert tr.layers_per_stage == solve.optimize(4, 2, shape, tr.cfg.lora.rank).layers_per_stage


def relora_overrides(**extra):
    base = {"method": "relora", "lora.relora_interval": 3, "lora.relora_warmup": 2, "lora.warm_start_fraction": 0.25,
            "train.max_steps": 12}
    base.update(extra)
    return base


def test_relora_phases_memory_and_resets(tmp_path):
    tr = make(tmp_path, **relora_overrides())
    assert tr.stage_steps[0] == 3 and tr.stage_steps[1] > 9  # the LoRA phase is cheaper: more steps, same FLOPs
    resets = []
    import steplm.passes.lora as train_mod  # where merge_adapters finds it
    orig = train_mod.merge_and_reinit
    train_mod.merge_and_reinit = lambda *a, **k: resets.append(tr.step) or orig(*a, **k)
    try:
        s = tr.fit()
    finally:
        train_mod.merge_and_reinit = orig
    assert resets == list(range(6, sum(tr.stage_steps) + 1, 3))  # every 3 steps of the LoRA phase (3 + 3k)
    m, r = tr.cfg.model, tr.cfg.lora.rank
    d, f = m.d_model, m.ffn_hidden
    P, E, L = 4 * d * d + 3 * d * f + 2 * d, r * (8 * d + 3 * (d + f)), m.n_layers
    warm, lora = s["stages"]
    assert warm["measured_state_bytes"]["layers"] == warm["planned_state_bytes"]["layers"] == 16 * L * P
    expected = 2 * L * (P - 2 * d) + 16 * L * (2 * d + E)  # norms stay trainable in ReLoRA
    assert lora["measured_state_bytes"]["layers"] == lora["planned_state_bytes"]["layers"] == expected
    tokens_per_step = tr.cfg.train.micro_batch * tr.cfg.train.seq_len
    budget = 6 * L * P * tokens_per_step * tr.cfg.train.max_steps  # vanilla, paper convention
    lora_step = (6 * L * (2 * d + E) + 2 * L * (P - 2 * d)) * tokens_per_step
    assert abs(s["flops_by_convention"]["paper"] - budget) <= lora_step
    norms = [p for n, p in tr.model.named_parameters() if n.endswith("layernorm.weight")]
    assert norms and all(p.requires_grad and p.dtype == torch.float32 for p in norms)


def test_relora_jagged_schedule(tmp_path):
    tr = make(tmp_path, **relora_overrides(**{"train.max_steps": 40, "lora.relora_interval": 10,
                                              "lora.relora_warmup": 5, "train.warmup_steps": 2}))
    tr.next_stage()  # switch to LoRA at global step 10
    tr.step = 10 + 12
    total = sum(tr.stage_steps)  # one cosine over the whole run

    def cosine(s):  # from the peak on the warmup's last step (1) to the floor on the run's last (total - 1)
        return tr.cfg.train.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 1) / (total - 1 - 1))))
    assert tr.lr_at(12) == pytest.approx(cosine(22) * 3 / 5)  # 2 steps after the reset at 10 in-phase steps
    assert tr.lr_at(15) == pytest.approx(cosine(22))  # ramp finished


def test_galore_memory_matches_formula(tmp_path):
    pytest.importorskip("galore_torch")
    tr = make(tmp_path, **{"method": "galore", "galore.rank": 4, "galore.update_proj_gap": 3, "train.max_steps": 7})
    s = tr.fit()
    m = tr.cfg.model
    d, f, r = m.d_model, m.ffn_hidden, 4
    per = 16 * 2 * d
    for n_in, n_out in [(d, d)] * 4 + [(d, f), (d, f), (f, d)]:
        per += 8 * n_in * n_out + 8 * r * max(n_in, n_out) + 4 * r * min(n_in, n_out)
    st = s["stages"][0]
    assert st["measured_state_bytes"]["layers"] == st["planned_state_bytes"]["layers"] == m.n_layers * per
    assert st["measured_state_bytes"]["layers"] < 16 * m.n_layers * (4 * d * d + 3 * d * f + 2 * d)
    from galore_torch import GaLoreAdamW
    assert isinstance(tr.optimizer, GaLoreAdamW) and tr.optimizer.param_groups[0]["rank"] == 4
    assert len(tr.optimizer.param_groups[0]["params"]) == 7 * m.n_layers


def test_gradient_accumulation_equals_larger_batch(tmp_path):
    """Same global batch as 2 micro-batches x 2 accumulation steps: same data, same weights up to
    summation order, and the CPU peak is measured with accumulation too."""
    a = make(tmp_path, "a", **{"train.max_steps": 4, "train.micro_batch": 4}).fit()
    tr = make(tmp_path, "b", **{"train.max_steps": 4, "train.micro_batch": 2, "train.grad_accum": 2})
    b = tr.fit()
    assert b["tokens_seen"] == a["tokens_seen"]
    assert abs(b["final_val_loss"] - a["final_val_loss"]) < 1e-3
    assert b["stages"][0]["peak_bytes"] > 0


def test_every_merge_logs_the_kept_share_and_warns_once(tmp_path, capsys):
    """A learning rate so small that each ReLoRA merge is a tiny update against its bf16 weights: every
    merge writes a metrics row with the share the rounding kept, and one warning names the knobs."""
    tr = make(tmp_path, **relora_overrides(**{"train.lr": 1e-6}))
    tr.fit()
    rows = [json.loads(x) for x in (tr.out / "metrics.jsonl").read_text().splitlines()]
    merges = [r for r in rows if "merge_kept_share" in r]
    assert [r["step"] for r in merges] == list(range(6, sum(tr.stage_steps) + 1, 3))  # every reset
    assert all(0 <= r["merge_kept_share"] < 0.9 and r["merge_rounding"] == "nearest" and r["merged_adapters"] == 28
               for r in merges)
    err = capsys.readouterr().err.splitlines()  # lr 1e-6 also learns nothing, which has its own warning
    warnings = [ln for ln in err if "warning" in ln and "merged adapters" in ln]
    assert len(warnings) == 1 and "lora.relora_interval" in warnings[0] and "train.lr" in warnings[0]
    assert "lora.merge_rounding=stochastic" in warnings[0]


@pytest.mark.slow
def test_stochastic_merges_are_logged_and_reproducible(tmp_path):
    extra = relora_overrides(**{"lora.merge_rounding": "stochastic", "train.max_steps": 6, "train.eval_tokens": 256})
    a, b = make(tmp_path, "a", **extra).fit(), make(tmp_path, "b", **extra).fit()
    assert a["weights_sha256"] == b["weights_sha256"]  # the rounding noise comes from the run's generator
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert {r["merge_rounding"] for r in rows if "merge_kept_share" in r} == {"stochastic"}


def test_one_compilation_per_stage(tmp_path, monkeypatch):
    """torch.compile traces the step once per stage (the model changes shape only at growth)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend=counter))
    tr = make(tmp_path, **{"method": "step", "step.n_stages": 3, "step.layers_per_stage": "[2,1,1]",
                           "train.compile": True, "train.max_steps": 12, "train.eval_every": 4})
    tr.fit()
    assert len(tr.stage_steps) == 3 and tr.step == sum(tr.stage_steps) > 3
    assert counter.frame_count == 3


def test_compiles_every_stage_of_every_run_in_one_process(tmp_path, monkeypatch):
    """Runs that follow each other in one process (a sweep, the replication suites) each compile every
    stage: no run reaches dynamo's recompile limit and silently falls back to eager."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend=counter))
    # dynamo's own patch, not monkeypatch: undoing a monkeypatch of this config entry left it deleted,
    # and a later test in the same process then failed reading it
    with torch._dynamo.config.patch(recompile_limit=2):  # 8 by default; 3 runs x 3 stages pass it
        for i in range(3):
            tr = make(tmp_path, f"run{i}", **{"method": "step", "step.n_stages": 3,
                                              "step.layers_per_stage": "[2,1,1]", "train.compile": True,
                                              "train.max_steps": 9, "train.eval_every": 0})
            tr.fit()
            assert counter.frame_count == 3 * (i + 1)
    assert torch._dynamo.config.recompile_limit >= 8


def test_fused_loss_equals_unfused_training(tmp_path):
    """The chunked head + cross-entropy trains the same model as logits + F.cross_entropy (fp32)."""
    a = make(tmp_path, "fused", **{"train.max_steps": 6}).fit()
    b = make(tmp_path, "unfused", **{"train.max_steps": 6, "train.fused_loss": False}).fit()
    assert a["final_val_loss"] == pytest.approx(b["final_val_loss"], rel=1e-5)
    from safetensors.torch import load_file
    wa, wb = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("fused", "unfused"))
    assert wa.keys() == wb.keys()
    for k in wa:  # 6 AdamW steps of lr 3e-3 move weights by ~1e-2; the two losses agree far closer
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5)


def _outer(tr) -> dict:
    return {n: p for n, p in tr.model.named_parameters() if p.requires_grad and not n.startswith("model.layers.")}


@pytest.mark.parametrize("method,extra", [
    ("vanilla", {}),
    ("step", {"step.n_stages": 2, "step.layers_per_stage": "[2,2]"}),
    # galore-torch decays after the update, p(1 - lr·wd) with p already moved: an lr² term, so no decay
    ("galore", {"galore.rank": 4, "galore.update_proj_gap": 3, "train.weight_decay": 0.0}),
])
@pytest.mark.parametrize("scale", [0.5, 10.0])
def test_embedding_lr_scale_multiplies_the_outer_update(tmp_path, method, extra, scale):
    """AdamW's first step moves each parameter by lr·(m̂/(√v̂+ε) + wd·p₀), linear in lr: from the same
    weights and batch, train.embedding_lr_scale = s moves the embedding, head and final norm s times
    as far as s = 1 does, and every block parameter exactly as far."""
    if method == "galore":
        pytest.importorskip("galore_torch")
    common = {"method": method, "train.max_steps": 8, **extra}
    ref, scaled = make(tmp_path, "ref", **common), make(tmp_path, "scaled", **common, **{"train.embedding_lr_scale": scale})
    before = {n: p.detach().clone() for n, p in ref.model.named_parameters()}
    for n, p in scaled.model.named_parameters():
        assert torch.equal(p, before[n]), n  # same init
    ref.train_step()
    scaled.train_step()
    a, b = dict(ref.model.named_parameters()), dict(scaled.model.named_parameters())
    outer = _outer(ref)
    assert outer and any(not n.startswith("model.layers.") for n in outer)
    for n, p0 in before.items():
        if not a[n].requires_grad:
            continue
        da, db = (a[n].detach() - p0).double(), (b[n].detach() - p0).double()
        if n in outer:
            assert da.abs().max() > 0, n
            # atol: fp32 rounding of p0 - δ (a few ulp of weights up to ~1); the updates are ~lr = 1.5e-3
            torch.testing.assert_close(db, scale * da, rtol=1e-3, atol=1e-6, msg=n)
        else:
            torch.testing.assert_close(db, da, rtol=1e-4, atol=1e-6, msg=n)
    lrs = {id(p): g["lr"] for g in scaled.optimizer.param_groups for p in g["params"]}
    base = scaled.lr_at(0)
    assert all(lrs[id(p)] == pytest.approx(base * scale) for p in _outer(scaled).values())
    assert sorted(len(g["params"]) > 0 for g in scaled.optimizer.param_groups) == [True] * len(scaled.optimizer.param_groups)


def test_embedding_lr_scale_survives_growth_and_default_keeps_two_groups(tmp_path):
    """After growth the outer parameters stay in the scaled groups with their moments; at scale 1
    the optimizer has the paper's two groups (decay, no decay)."""
    over = {"method": "step", "step.n_stages": 2, "step.layers_per_stage": "[2,2]", "train.max_steps": 6}
    assert len(make(tmp_path, "one", **over).optimizer.param_groups) == 2
    tr = make(tmp_path, "ten", **over, **{"train.embedding_lr_scale": 10.0})
    tr.train_step()
    emb = tr.model.model.embed_tokens.weight
    m = tr.optimizer.state[emb]["exp_avg"].clone()
    tr.optimizer.zero_grad()
    tr.next_stage()
    groups = tr.optimizer.param_groups
    assert len(groups) == 4 and [g.get("lr_scale", 1.0) for g in groups] == [1.0, 1.0, 10.0, 10.0]
    assert {id(p) for g in groups[2:] for p in g["params"]} == {id(p) for p in _outer(tr).values()}
    assert torch.equal(tr.optimizer.state[emb]["exp_avg"], m)
    tr.train_step()
    assert groups[2]["lr"] == pytest.approx(10 * groups[0]["lr"])


def test_clipping_folded_into_the_fused_step_matches_clip_grad_norm(tmp_path):
    """With torch's fused AdamW the clip rides on the step's grad_scale (set for that step only);
    the weights after clipped steps match clip_grad_norm_ followed by the for-loop AdamW
    (fused=False on CPU) to fp32 rounding. The clip is active (grad_clip far below the norm); a step that
    ignored grad_scale ends 3e-3 away (Adam undoes a constant scale, not one that varies by step)."""
    def run(fused):
        cfg = config.load(None, tiny_overrides(tmp_path, **{"train.grad_clip": 0.05, "train.fused_optimizer": fused}))
        t = Trainer(cfg, tmp_path / f"run{fused}", progress=False)
        assert clip_in_step(t.cfg, t.optimizer, t.fsdp) == fused
        scales, step = [], t.optimizer.step

        def spy(*args, **kwargs):  # the scale the fused step reads
            scales.append(t.optimizer.grad_scale)
            return step(*args, **kwargs)
        t.optimizer.step = spy
        for _ in range(4):
            t.train_step()
            assert not hasattr(t.optimizer, "grad_scale")  # no stale scale for another caller's step
            t.optimizer.zero_grad(set_to_none=True)
        if fused:
            assert len(scales) == 4 and min(float(x) for x in scales) > 2  # clipping was active at every step
        else:
            assert scales == [None] * 4  # clip_grad_norm_ clipped: the step scales nothing
        return torch.cat([p.detach().flatten() for p in t.model.parameters()])

    folded, reference = run(True), run(False)
    floor = (folded - reference).abs().max().item()
    assert floor < 1e-6, floor
    t0 = config.load(None, tiny_overrides(tmp_path))
    start = torch.cat([p.detach().flatten() for p in Trainer(t0, tmp_path / "init", progress=False).model.parameters()])
    assert (reference - start).abs().max().item() > 1e3 * floor  # the steps moved the weights


@pytest.mark.parametrize("method,extra,accum", [
    ("vanilla", {}, 1), ("step", {"step.n_stages": 2, "step.layers_per_stage": "[2,2]"}, 1),
    ("relora", {"lora.relora_interval": 3, "lora.warm_start_fraction": 0.25}, 2)])
def test_peak_tracker_equals_torchs_memtracker(tmp_path, method, extra, accum):
    """The trainer's faster tracker (no per-module peaks) reports the peak that torch's MemTracker
    itself reports for the same step: in a frozen-and-adapted stage too, and with accumulation."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from steplm.train.metrics import cpu_peak_step

    class Reference(MemTracker):  # only the frozen-weight workaround, torch's own peak bookkeeping
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    t = make(tmp_path, method=method, **{"train.grad_accum": accum}, **extra)
    if method != "vanilla":
        t.train_step()
        t.optimizer.zero_grad(set_to_none=True)
        t.next_stage()
    peaks = []
    for fast in (True, False, True):
        t.train_step()  # both measure a step that starts with the optimizer state already there
        t.optimizer.zero_grad(set_to_none=True)
        if fast:
            peaks.append(cpu_peak_step(t.train_step, t.model, t.optimizer, t))
        else:
            ref = Reference()
            ref.track_external(t.model, t.optimizer)
            hook = lambda _: ref.reset_mod_stats()  # noqa: E731
            t.hooks["micro_batch_end"].append(hook)
            with ref:
                t.train_step()
            t.hooks["micro_batch_end"].remove(hook)
            peaks.append(int(next(iter(ref.get_tracker_snapshot("peak").values()))["Total"]))
        t.optimizer.zero_grad(set_to_none=True)
    assert peaks[0] > 0 and peaks == [peaks[1]] * 3


@pytest.mark.parametrize("extra", [
    {},  # states dominate the tiny model
    {"train.micro_batch": 16, "train.seq_len": 128, "model.max_seq_len": 128},  # activations dominate
    {"train.micro_batch": 16, "train.seq_len": 128, "model.max_seq_len": 128, "train.activation_checkpointing": True},
    {"method": "step", "step.n_stages": 2, "step.layers_per_stage": "[2,2]"},
])
def test_minimum_peak_bytes_is_below_the_tracked_peak(tmp_path, extra):
    """The bound that refuses a run too large for the device (Trainer._check_fits) is a lower bound:
    at most the MemTracker peak of a real eager step (plus the RoPE tables, which the tracker does
    not count as the model's), in every stage; and not a loose one (at least a tenth of it)."""
    from steplm.plan.stages import minimum_peak_bytes
    from steplm.train.metrics import cpu_peak_step

    t = make(tmp_path, **extra)
    need = minimum_peak_bytes(t.cfg, t.plan)
    rope = t.model.rope_cos.nbytes + t.model.rope_sin.nbytes
    assert need["rope"] == rope
    peaks = []
    while True:
        t.train_step()
        t.optimizer.zero_grad(set_to_none=True)
        peaks.append(cpu_peak_step(t.train_step, t.model, t.optimizer, t))
        t.optimizer.zero_grad(set_to_none=True)
        if t.stage == len(t.stage_steps) - 1:
            break
        t.next_stage()
    assert need["total"] <= max(peaks) + rope
    assert need["total"] >= max(peaks) / 10


@pytest.mark.parametrize("method,extra", [("step", {"step.n_stages": 2}), ("relora", {"lora.relora_interval": 3})])
def test_a_stage_whose_every_step_fails_names_the_adapter_scale(tmp_path, capsys, method, extra):
    """lora.alpha = 1e30 makes every adapter step overflow: the run stops (exit 3) naming the stage as
    `plan` numbers it and the two knobs, lr and lora.alpha with the scale it gave, not only the lr."""
    from steplm.cli import main
    from steplm.errors import EXIT_TRAINING_STOPPED
    sets = tiny_overrides(tmp_path, **{"method": method, "lora.alpha": 1e30, "train.max_steps": 8, **extra})
    argv = ["train", "--out", str(tmp_path / "run"), "--quiet", *[x for kv in sets for x in ("--set", kv)]]
    assert main(argv) == EXIT_TRAINING_STOPPED
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "stage 2 of 2, step" in err and "4 steps in a row were skipped as bad batches" in err, err
    assert "lower train.lr, or lora.alpha" in err and f"{1e30 / 4:.3g}" in err, err  # tiny_overrides: lora.rank 4


def test_a_stop_without_a_checkpoint_says_so_and_names_init_std(tmp_path, capsys):
    """model.init_std = 30 starts with logits so large that training goes nowhere: the stop names
    model.init_std beside the lr, and says there is no checkpoint (checkpoint_every 0), not that "the
    last good checkpoint is kept"."""
    from steplm.cli import main
    from steplm.errors import EXIT_TRAINING_STOPPED
    sets = tiny_overrides(tmp_path, **{"model.init_std": 30, "train.lr": 1e-30, "train.checkpoint_every": 0})
    argv = ["train", "--out", str(tmp_path / "run"), "--quiet", *[x for kv in sets for x in ("--set", kv)]]
    assert main(argv) == EXIT_TRAINING_STOPPED
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "there is no checkpoint to resume from" in err and "is kept" not in err, err
    assert "lower train.lr" in err and "model.init_std (30" in err, err
    run = tmp_path / "run"  # a run that trained and stopped keeps what it wrote, checkpoint or not
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").read_text().count('"loss"') == 12
    assert not (run / "checkpoints").exists() and not (run / "model.safetensors").exists()
