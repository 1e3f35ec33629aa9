"""The paper presets carry Table 6 and Table 7 of Yano et al. (2025) as written there; every preset is
named by its name alone and ships in the wheel."""
from pathlib import Path

import pytest

from conftest import ROOT
from steplm.config import load

# Table 7: peak lr and batch size in tokens (K = 1000) for vanilla / STEP; Table 6: warmup, seq.
TABLE7 = {"paper-368m": (5e-4, 360_000), "paper-680m": (4e-4, 688_000), "paper-1.2b": (3e-4, 1_179_000),
          "paper-1.2b-3stage": (3e-4, 1_179_000)}


@pytest.mark.parametrize("name", sorted(TABLE7))
def test_preset_matches_tables_6_and_7(name):
    cfg = load(ROOT / "configs" / f"{name}.yaml")
    lr, batch_tokens = TABLE7[name]
    t = cfg.train
    assert t.lr == lr and t.warmup_steps == 1000 and t.seq_len == 1024 and t.max_steps == 20_000
    assert (t.beta1, t.beta2, t.weight_decay) == (0.9, 0.95, 0.1)
    tokens = t.micro_batch * t.grad_accum * t.seq_len
    assert abs(tokens - batch_tokens) <= t.micro_batch * t.seq_len / 2  # nearest whole micro-batch
    assert cfg.lora.rank == 128 and cfg.lora.relora_warmup == 500 and cfg.lora.relora_interval == 5000  # PET is ReLoRA
    assert (cfg.galore.rank, cfg.galore.update_proj_gap, cfg.galore.scale) == (128, 200, 0.25)
    assert cfg.step.n_stages == (3 if name.endswith("3stage") else 2)
    assert "assumed" not in (ROOT / "configs" / f"{name}.yaml").read_text()


def test_a_preset_name_is_its_packaged_file(tmp_path, monkeypatch):
    """`steplm train paper-368m` / `steplm plan tiny-step`: a bare name (with or without .yaml) that is
    no file here is the preset's file; a file that is here wins."""
    from steplm.config.presets import preset_dir, preset_names, resolve_config

    monkeypatch.chdir(tmp_path)
    assert preset_names() == sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    for spec in ("tiny-step", "tiny-step.yaml"):
        p = resolve_config(spec)
        assert p == preset_dir() / "tiny-step.yaml"
        assert p.read_text() == (ROOT / "configs" / "tiny-step.yaml").read_text()
    assert load("paper-368m") == load(ROOT / "configs" / "paper-368m.yaml")
    (tmp_path / "tiny-step").write_text("train:\n  max_steps: 7\n")
    assert resolve_config("tiny-step") == Path("tiny-step") and load("tiny-step").train.max_steps == 7


def test_an_unknown_name_lists_the_presets(tmp_path, monkeypatch, capsys):
    from steplm.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["plan", "tiny-stepp"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config file not found: tiny-stepp, and no preset has that name" in err
    assert "(presets: paper-1.2b, paper-1.2b-3stage, paper-368m, paper-680m, tiny, tiny-step, tiny-step3)" in err


def test_plan_of_a_preset_name_is_plan_of_its_file(tmp_path, monkeypatch, capsys):
    from steplm.cli import main

    assert main(["plan", str(ROOT / "configs" / "tiny-step.yaml")]) == 0
    by_path = capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "tiny-step"]) == 0
    assert capsys.readouterr().out == by_path and "layers per stage" in by_path


def test_the_wheel_ships_the_presets(tmp_path):
    """What `pip install` gets: the wheel built from this tree holds steplm/configs/*.yaml, the same
    files as configs/, and steplm run from the unpacked wheel finds them there."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "tree"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "configs", src / "configs")
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    code = "from setuptools import build_meta; print(build_meta.build_wheel('dist'))"
    res = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    wheel = src / "dist" / res.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as z:
        shipped = {n.split("/")[-1]: z.read(n) for n in z.namelist() if n.startswith("steplm/configs/")}
        z.extractall(tmp_path / "site")
    assert shipped == {p.name: p.read_bytes() for p in (ROOT / "configs").glob("*.yaml")}
    code = "from steplm.config.presets import resolve_config; print(resolve_config('paper-368m'))"
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": ""}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(tmp_path / "site" / "steplm" / "configs" / "paper-368m.yaml")
