"""Same config, same machine, same weights: a run repeated in fresh processes ends with one
weights_sha256, and importing steplm puts Intel MKL in its reproducible (CNR) mode without
overriding a user's own MKL_CBWR (src/steplm/_reproducible.py; docs/reliability.md, Reproducibility)."""
import ctypes
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, tiny_overrides

# oneMKL's named constants for CNR control (mkl_service.h): what mkl_cbwr_get(MKL_CBWR_ALL) returns
MKL_CBWR_ALL, MKL_CBWR_BRANCH_OFF, MKL_CBWR_AUTO, MKL_CBWR_COMPATIBLE = -1, 1, 2, 3
PROCESSES = 8
THREADS = 2  # intra-op threads per process: the runs share the cores, so MKL's scheduling has room to vary

CNR_PROBE = """
import ctypes, os, sys
import steplm, torch
torch.randn(64, 64) @ torch.randn(64, 64)  # MKL reads MKL_CBWR at its first call
lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
print(repr(os.environ.get("MKL_CBWR")), lib.mkl_serv_cbwr_get(-1))
"""


def env(**extra) -> dict:
    e = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS=str(THREADS), **extra)
    for key in ("STEPLM_FAULT", "MKL_CBWR"):
        if key not in extra:
            e.pop(key, None)
    return e


def mkl_cnr_query_available() -> bool:
    """Whether this torch carries MKL with its CNR query exported (Linux x86 wheels do)."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        return hasattr(ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")), "mkl_serv_cbwr_get")
    except OSError:
        return False


@pytest.mark.skipif(not mkl_cnr_query_available(), reason="torch without MKL's CNR query")
@pytest.mark.parametrize("user_value, expected_env, expected_mode", [
    (None, "AUTO", MKL_CBWR_AUTO),                          # unset: steplm pins MKL's own branch
    ("COMPATIBLE", "COMPATIBLE", MKL_CBWR_COMPATIBLE),      # the user's choice stands
    ("", "", MKL_CBWR_BRANCH_OFF),                          # set but empty: CNR off, the way to turn it off
    ("NOT_A_BRANCH", "NOT_A_BRANCH", MKL_CBWR_AUTO),         # a value MKL does not know means AUTO, not off
])
def test_importing_steplm_puts_mkl_in_cnr_mode_and_keeps_the_users_setting(user_value, expected_env, expected_mode):
    extra = {} if user_value is None else {"MKL_CBWR": user_value}
    res = subprocess.run([sys.executable, "-c", CNR_PROBE], capture_output=True, text=True, env=env(**extra),
                         timeout=120)
    assert res.returncode == 0, res.stderr
    value, mode = res.stdout.split()
    assert (value, int(mode)) == (repr(expected_env), expected_mode)


@pytest.mark.skipif(not mkl_cnr_query_available(), reason="torch without MKL's CNR query")
def test_without_steplm_mkl_is_not_in_cnr_mode():
    """The probe can tell the modes apart: torch alone leaves CNR off."""
    probe = CNR_PROBE.replace("import steplm, torch", "import torch")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env(), timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [repr(None), str(MKL_CBWR_BRANCH_OFF)]


def train_args(tmp: Path, out: Path) -> list[str]:
    """A 2-stage STEP run (growth, frozen bf16 layers with LoRA) in the CPU's default dtype: bf16 on a
    CPU with native bf16 matmuls, where attention's backward takes an fp32 (MKL) score matmul."""
    sets = tiny_overrides(tmp, **{"method": "step", "step.n_stages": 2, "step.layers_per_stage": "[2,2]",
                                  "train.dtype": "auto", "train.max_steps": 10})
    return [sys.executable, "-m", "steplm", "train", "--out", str(out), "--quiet",
            *[x for kv in sets for x in ("--set", kv)]]


@pytest.mark.slow  # 9 processes: about 50 s of CPU, minutes of wall time on 2 shared cores
def test_same_config_gives_the_same_weights_in_fresh_processes(tmp_path):
    """One run first (it fills the token cache), then PROCESSES more at once, all under the default host
    allocator (train.host_allocator=retain): every one ends with the same weights_sha256."""
    first = subprocess.run(train_args(tmp_path, tmp_path / "r0"), capture_output=True, text=True, env=env(),
                           timeout=300)
    assert first.returncode == 0, first.stderr
    procs = [subprocess.Popen(train_args(tmp_path, tmp_path / f"r{i}"), env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(1, PROCESSES + 1)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    hashes = {}
    for i in range(PROCESSES + 1):
        summary = json.loads((tmp_path / f"r{i}" / "summary.json").read_text())
        assert summary["method"] == "step" and len(summary["stage_steps"]) == 2
        hashes.setdefault(summary["weights_sha256"], []).append(i)
    assert len(hashes) == 1, f"{len(hashes)} different weights from {PROCESSES + 1} runs of one config: {hashes}"


@pytest.mark.skipif(not mkl_cnr_query_available(), reason="torch without MKL's CNR query")
def test_cnr_speed_benchmark_times_each_mode_in_its_own_process(tmp_path):
    """benchmarks/mkl_cnr.py --smoke: each child runs in the mode its row names (MKL says so), and the
    row's ratio is its own rounds' AUTO/off (no timing is judged here: the benchmark prints it)."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mkl_cnr.py"), "--smoke", "--out", str(tmp_path),
                          "--dtypes", "fp32", "--warmup", "0", "--steps", "1"],
                         capture_output=True, text=True, env={**env(), "OMP_NUM_THREADS": "1"}, timeout=600)
    assert res.returncode == 0, res.stderr
    (row,) = json.loads((tmp_path / "mkl_cnr.json").read_text())["rows"]
    assert row["mkl_cbwr_mode"] == {"AUTO": MKL_CBWR_AUTO, "off": MKL_CBWR_BRANCH_OFF}
    assert row["trained_dtype"] == "float32" and row["threads"] == 1
    assert row["round_ratios"] == [row["auto_step_seconds"] / row["off_step_seconds"]] == [row["ratio"]]
    assert "| fp32 | float32 | 1 |" in (tmp_path / "mkl_cnr.md").read_text()


@pytest.mark.parametrize("flag", [["--rounds", "0"], ["--steps", "0"], ["--dtypes", ""], ["--dtypes", "fp16"],
                                  ["--warmup", "-1"]])
def test_cnr_speed_benchmark_refuses_flags_that_would_time_nothing(tmp_path, capsys, flag):
    """--rounds 0 once read as the default, --steps 0 ended in a median of nothing, --dtypes '' wrote an
    empty table: each is refused at parsing, naming the flag, before any child runs or any file is written."""
    spec = importlib.util.spec_from_file_location("mkl_cnr", ROOT / "benchmarks" / "mkl_cnr.py")
    mkl_cnr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mkl_cnr)
    with pytest.raises(SystemExit) as e:
        mkl_cnr.main(["--out", str(tmp_path / "out"), *flag])
    assert e.value.code == 2 and f"argument {flag[0]}:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cnr_speed_benchmark_stops_if_any_child_ran_in_another_mode(monkeypatch):
    """Every child's MKL mode is checked, not only the last one's: one child in the wrong mode (an
    MKL_CBWR the environment overrode) would make its row time another mode."""
    spec = importlib.util.spec_from_file_location("mkl_cnr", ROOT / "benchmarks" / "mkl_cnr.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    calls = []

    def fake(setting, dtype, smoke, warmup, steps):
        calls.append(setting)
        wrong = len(calls) == 3  # the second round's first child
        mode = {"AUTO": MKL_CBWR_AUTO, "off": MKL_CBWR_BRANCH_OFF}[setting]
        return {"seconds": [1.0], "mkl_cbwr_mode": MKL_CBWR_COMPATIBLE if wrong else mode, "dtype": "float32",
                "threads": 1}

    monkeypatch.setattr(mod, "run_child", fake)
    with pytest.raises(SystemExit, match="ran in MKL mode 3, not"):
        mod.measure(["fp32"], 3, 0, 1, True)
    calls.clear()
    monkeypatch.setattr(mod, "run_child", lambda s, *a: {"seconds": [1.0], "dtype": "float32", "threads": 1,
                                                         "mkl_cbwr_mode": {"AUTO": 2, "off": 1}[s]})
    assert mod.measure(["fp32"], 3, 0, 1, True)[0]["ratio"] == 1.0
