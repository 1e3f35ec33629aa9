"""benchmarks/paper_shapes.py on tiny shapes (--smoke): the same code path as the full-size
measurement, every row's fields, planned == measured model states, the three ways a STEP stage is
timed, the run that does not fit, steplm's own refusal, and resuming (a rerun measures nothing)."""
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from argparse import Namespace

from conftest import ROOT

FIELDS = {"size", "method", "layers_per_stage", "stage", "planned_state_bytes", "measured_state_bytes",
          "tracked_peak_bytes", "predicted_peak_bytes", "micro_batch", "seq_len"}


def load_module():
    spec = importlib.util.spec_from_file_location("paper_shapes", ROOT / "benchmarks" / "paper_shapes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_smoke(out) -> str:
    """The script in a fresh interpreter, as a user runs it (it forks a child per row); its stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paper_shapes.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stderr


def test_smoke_rows_and_resume(tmp_path):
    err = run_smoke(tmp_path)
    f = tmp_path / "paper_shapes.json"
    rows = json.loads(f.read_text())
    # 368m: 2 + 1 rows, 680m: 2 + 1, 1.2b: the two 2-stage splits (one split at this width) + 3 + 3 + 1
    assert "15 rows measured, 0 kept" in err and len(rows) == 15
    assert {(r["size"], r["method"]) for r in rows} == {(s, m) for s, m, *_ in load_module().RUNS}
    for r in rows:
        assert FIELDS <= set(r) and r["stage"] >= 1 and r["seq_len"] == 64
        if r["method"] != "vanilla":
            assert {"step_time_ratio", "flops_ratio"} <= set(r) and r["flops_ratio"] > 0
        if "note" in r:
            continue
        assert r["measured_state_bytes"] == r["planned_state_bytes"] > 0
        assert r["measured_layer_state_bytes"] == r["planned_layer_state_bytes"]
        assert r["tracked_peak_bytes"] > r["measured_state_bytes"]  # activations on top of the states
        assert 0.85 < r["predicted_peak_bytes"] / r["tracked_peak_bytes"] < 1.15, r
        if r.get("step_time_ratio") is not None:
            assert r["step_time_ratio"] > 0 and r["step_seconds"] > 0 and r["vanilla_step_seconds"] > 0
    # stage 1 is vanilla at n_1 layers: its FLOPs ratio is 1, and it is not timed by default
    assert all(r["flops_ratio"] == 1.0 and r["step_time_ratio"] is None for r in rows
               if r["method"] != "vanilla" and r["stage"] == 1)
    timings = [r.get("timing", "") for r in rows if r["method"] != "vanilla" and r["stage"] > 1]
    assert any(t == "interleaved" for t in timings)
    # where the two do not fit together, vanilla's steps run in a fresh process of their own and the
    # row still gets its ratio, one per round
    sequential = [r for r in rows if r.get("timing", "").startswith("sequential, one process each")]
    assert sequential and all(r["step_time_ratio"] > 0 and len(r["step_time_ratio_per_round"]) == 2
                              and "vanilla_sets" not in r for r in sequential)
    assert any(t.startswith("not timed: vanilla at 24 layers does not fit") for t in timings)
    # as on 24 GB at full size: vanilla 1.2b does not fit, every STEP stage of 1.2b is measured
    van = next(r for r in rows if (r["size"], r["method"]) == ("1.2b", "vanilla"))
    assert van["note"].startswith("not run") and van["measured_state_bytes"] is None
    assert all(r["measured_state_bytes"] for r in rows if r["size"] == "1.2b" and r["method"] != "vanilla")
    assert (tmp_path / "paper_shapes.md").read_text().count("\n| 1.2b |") == 9
    assert (tmp_path / "paper_shapes.png").stat().st_size > 10_000

    before = f.read_text()
    err = run_smoke(tmp_path)  # resumable: every row is there, none is measured again
    assert "0 rows measured, 15 kept" in err and f.read_text() == before


def test_predicted_peak_is_plan_extended():
    """predicted_peak_bytes is what `steplm plan --extended` prints for the largest stage."""
    from steplm.cli.main import main as steplm_main
    from steplm.plan.stages import plan_run

    mod = load_module()
    a = Namespace(smoke=False, micro_batch=None, data={})
    cfg = mod.load(mod.RUNS[0], a)  # 368m, STEP-2stages
    plan = plan_run(cfg)
    m, t = cfg.model, cfg.train
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert steplm_main(["plan", "--hidden", str(m.d_model), "--layers", str(m.n_layers), "--layers-per-stage",
                            ",".join(map(str, plan.layers_per_stage)), "--lora-rank", str(cfg.lora.rank),
                            "--ffn-hidden", str(m.ffn_hidden), "--n-heads", str(m.n_heads), "--vocab-size",
                            str(m.vocab_size), "--seq-len", str(t.seq_len), "--micro-batch", str(t.micro_batch),
                            "--checkpointing", "--extended", "--json"]) in (0, None)
    cli = json.loads(out.getvalue())["extended"]["peak_bytes"]
    largest = max(plan.stages, key=lambda s: s.planned_state_bytes["layers"])
    assert mod.predicted_peak_bytes(cfg, largest) == cli


def test_refusal_by_steplm_is_a_note(tmp_path, monkeypatch):
    """A run that steplm's own memory check refuses gets a row whose note says so."""
    import steplm.devices

    mod = load_module()
    monkeypatch.setattr(steplm.devices, "memory_capacity_bytes", lambda device: 1)
    monkeypatch.setattr(mod, "cap_allocations", lambda limit: None)  # not in the test's own process
    a = Namespace(smoke=False, micro_batch=None, memory_gb=1000.0, time_stage1=False, device="cpu", rounds=1,
                  data=mod.data_overrides(tmp_path))  # the 368m preset: refused before anything is allocated
    row = mod.measure_row(mod.RUNS[0], 0, a, tmp_path)
    assert row["note"].startswith("refused by steplm: ") and "needs at least" in row["note"], row["note"]
    assert row["measured_state_bytes"] is None and row["planned_state_bytes"] > 6e9


def test_allocation_cap_turns_oom_into_an_error():
    """cap_allocations (RLIMIT_DATA) makes an allocation past the cap an error the row reports as
    out of memory, instead of the kernel's OOM kill (in a child process: the cap cannot be undone)."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import paper_shapes as ps, torch\n"
            "ps.cap_allocations(300_000_000)\n"
            "torch.ones(50_000_000)\n"  # 200 MB: under the cap
            "try:\n    torch.ones(100_000_000)\nexcept RuntimeError as e:\n    print('oom', ps.out_of_memory(e))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert p.stdout.strip() == "oom True", p.stderr


def test_vanilla_that_runs_out_of_memory_beside_step_is_timed_in_its_own_process(monkeypatch, tmp_path):
    """Predicted to fit beside the STEP run but out of memory when built there (the heap is larger
    than the tensors): STEP's rounds are still timed and the row is left for a fresh vanilla process
    (PENDING), where any other error is not swallowed."""
    from types import SimpleNamespace

    import pytest

    mod = load_module()
    monkeypatch.setattr(mod, "predicted_peak_bytes", lambda cfg, stage: 1)  # "fits together"
    monkeypatch.setattr(mod, "plan_run", lambda cfg: SimpleNamespace(stages=[None]))
    monkeypatch.setattr(mod, "step", lambda t: 0.25)
    t = SimpleNamespace(cfg=None, current_stage=None, stage=1)

    def out_of_memory(*args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 67108864 bytes")

    monkeypatch.setattr(mod, "trainer", out_of_memory)
    row = mod.time_against_vanilla(t, mod.CONFIGS / "tiny.yaml", {}, 3, 10**9, tmp_path)
    assert row["timing"] == mod.PENDING and row["step_seconds_per_round"] == [0.25] * 3
    assert row["vanilla_config"].endswith("tiny.yaml") and row["pair_bytes"] == 2

    def broken(*args):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(mod, "trainer", broken)
    with pytest.raises(RuntimeError, match="some other failure"):
        mod.time_against_vanilla(t, mod.CONFIGS / "tiny.yaml", {}, 3, 10**9, tmp_path)
