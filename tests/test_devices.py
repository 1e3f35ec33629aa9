"""--device/--dtype on the model-reading commands: bf16 autocast against the fp32 reference, device errors."""
import ctypes
import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from steplm.eval import tasks
from steplm.cli import main
from steplm.devices import autocast, pick_device, pick_dtype
from steplm.errors import UserError
from steplm.io.run_dir import load_model
from steplm.eval.perplexity import perplexity

from conftest import ROOT, shared, tiny_overrides

BF16 = torch.bfloat16


def test_pick_device_and_dtype():
    assert pick_device("cpu", "--device") == torch.device("cpu")
    assert pick_device("auto", "--device").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_dtype("fp32", torch.device("cpu")) == torch.float32
    assert pick_dtype("bf16", torch.device("cpu")) == BF16
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert pick_dtype("auto", torch.device("cpu")) == (BF16 if native else torch.float32)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="^--device: cuda requested"):
            pick_device("cuda", "--device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("cmd", [
    ["eval", "{run}", "--data", "{wiki}"],
    ["eval", "{run}", "--tasks", "piqa"],
    ["generate", "{run}", "--prompt", "x"],
    ["sft", "{run}", "--data", "{alpaca}", "--out", "{tmp}/o"],
    ["mt-bench", "{run}", "--questions", "{mt}", "--out", "{tmp}/a.jsonl"],
])
def test_cuda_without_gpu_is_one_line_exit_2(tiny_run, tmp_path, capsys, cmd):
    paths = {"run": tiny_run, "tmp": tmp_path, "wiki": shared("wikitext2/valid.txt"),
             "alpaca": shared("alpaca/seed_tasks.jsonl"), "mt": shared("eval/mt_bench/question.jsonl")}
    assert main([a.format(**paths) for a in cmd] + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("steplm: error: --device: cuda") and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "a.jsonl").exists()


def test_every_model_reading_command_takes_device_and_dtype(capsys):
    for cmd in ("eval", "generate", "sft", "mt-bench"):
        assert main([cmd, "x", "--dtype", "fp16"]) == 2
        assert "--dtype" in capsys.readouterr().err
        assert main([cmd, "x", "--device", "tpu"]) == 2
        assert "--device" in capsys.readouterr().err


def test_bf16_perplexity_within_one_percent_of_fp32(tiny_run):
    wiki = str(shared("wikitext2/valid.txt"))
    fp32 = perplexity(str(tiny_run), wiki, max_tokens=512, seq_len=64)
    bf16 = perplexity(str(tiny_run), wiki, max_tokens=512, seq_len=64, dtype=BF16)
    assert fp32["tokens"] == bf16["tokens"] == 512
    assert fp32["loss"] != bf16["loss"]  # bf16 really ran
    assert abs(bf16["loss"] - fp32["loss"]) / fp32["loss"] < 0.01


def test_bf16_task_choices_agree_with_fp32_where_the_margin_allows(tiny_run):
    """Items whose fp32 margin between the best and second-best choice exceeds twice the largest bf16
    log-likelihood error cannot change their answer; the test derives that bound and checks those items.
    Items inside it may flip, and must be the only ones that do."""
    model, tok = load_model(tiny_run)
    docs = tasks.load_task("piqa", shared("eval"), limit=12) + tasks.load_task("arc_easy", shared("eval"), limit=12)
    reqs = [r for d in docs for r in d.requests]

    def enc(s):
        return tok.encode(s, add_special_tokens=False).ids
    ll32 = [ll for ll, _ in tasks.loglikelihoods(model, enc, 0, reqs, batch_size=8)]
    with autocast(torch.device("cpu"), BF16):
        ll16 = [ll for ll, _ in tasks.loglikelihoods(model, enc, 0, reqs, batch_size=8)]
    err = max(abs(a - b) for a, b in zip(ll32, ll16))
    assert 0 < err < 0.05 * max(abs(a) for a in ll32)  # bf16 really ran, and stays close
    pos, checked = 0, 0
    for d in docs:
        k = len(d.requests)
        a, b = ll32[pos:pos + k], ll16[pos:pos + k]
        pos += k
        top = sorted(a, reverse=True)
        if top[0] - top[1] > 2 * err:
            checked += 1
            assert max(range(k), key=a.__getitem__) == max(range(k), key=b.__getitem__)
    assert checked >= len(docs) // 2  # the bound is tight enough to test most items


def test_cli_eval_and_generate_in_both_dtypes(tiny_run, capsys):
    wiki = str(shared("wikitext2/valid.txt"))
    res = {}
    for dt in ("fp32", "bf16"):
        assert main(["eval", str(tiny_run), "--data", wiki, "--max-tokens", "256", "--seq-len", "64", "--json",
                     "--device", "cpu", "--dtype", dt]) == 0
        res[dt] = json.loads(capsys.readouterr().out)
        assert main(["generate", str(tiny_run), "--prompt", "ROMEO:", "--max-new-tokens", "3",
                     "--device", "cpu", "--dtype", dt]) == 0
        capsys.readouterr()
    assert res["fp32"]["tokens"] == res["bf16"]["tokens"] == 256
    assert abs(res["bf16"]["loss"] - res["fp32"]["loss"]) / res["fp32"]["loss"] < 0.01


def test_sft_and_mt_bench_run_in_bf16(tiny_run, tmp_path, capsys):
    out = tmp_path / "sft"
    assert main(["sft", str(tiny_run), "--data", str(shared("alpaca/seed_tasks.jsonl")), "--out", str(out),
                 "--limit", "4", "--epochs", "1", "--batch-size", "2", "--quiet", "--dtype", "bf16"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["steps"] == 2
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.float32}  # fp32 weights
    ans = tmp_path / "a.jsonl"
    assert main(["mt-bench", str(out), "--questions", str(shared("eval/mt_bench/question.jsonl")), "--out", str(ans),
                 "--limit", "2", "--max-new-tokens", "2", "--dtype", "bf16", "--device", "cpu"]) == 0
    assert len(ans.read_text().splitlines()) == 2


def test_cpu_name_is_the_model_name_line(tmp_path, monkeypatch):
    import steplm.devices as devices
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Test CPU @ 2.0GHz\nflags\t: avx512_bf16\n")
    real = devices.Path
    monkeypatch.setattr(devices, "Path", lambda p: real(info) if p == "/proc/cpuinfo" else real(p))
    assert devices.cpu_name() == "Test CPU @ 2.0GHz"
    monkeypatch.setattr(devices, "Path", lambda p: real(tmp_path / "missing"))
    assert devices.cpu_name() == (devices.platform.processor() or devices.platform.machine())


_ALLOCATOR_PROBE = """
import ctypes, json, sys
import torch
from steplm import config
from steplm.allocator import retain_host_memory
from steplm.train.loop import Trainer

class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (2.33+): every field a size_t
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def maps_a_large_block():  # whether a 64 MiB tensor comes from a fresh mmap (glibc's mmapped bytes grow by it)
    before = libc.mallinfo2().hblkhd
    x = torch.ones(64 * 2**20, dtype=torch.uint8)
    grown = libc.mallinfo2().hblkhd - before
    del x
    return grown >= 64 * 2**20

sets, out = json.loads(sys.argv[1]), sys.argv[2]
seen = [maps_a_large_block()]  # a fresh process: glibc's defaults map it
Trainer(config.load(None, [*sets, "train.host_allocator=system"]), out + "/a", progress=False)
seen.append(maps_a_large_block())  # 'system' leaves the allocator alone
import steplm.allocator
real, steplm.allocator.available_bytes = steplm.allocator.available_bytes, lambda: 1  # no memory to spare
t = Trainer(config.load(None, sets), out + "/c", progress=False)  # the default, auto: system here
seen += [t.host_allocator, maps_a_large_block()]
steplm.allocator.available_bytes = real
t = Trainer(config.load(None, sets), out + "/b", progress=False)  # the default, auto: retain (a tiny run)
seen.append(t.host_allocator)
seen += [maps_a_large_block(), maps_a_large_block()]
seen.append(retain_host_memory(True))
print(json.dumps(seen))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                    reason="needs glibc 2.33+")
def test_host_allocator_retain_serves_large_blocks_from_the_heap(tmp_path):
    """In a fresh process (this one's heap depends on the tests before): a large block is mapped
    afresh under glibc's defaults, by a trainer set to 'system' and by the default ('auto') when twice
    the step's peak does not fit the memory available, which it says; and served from the heap once
    the default trainer has run where it fits (retain)."""
    sets = tiny_overrides(tmp_path, **{"train.device": "cpu", "train.max_steps": 1})
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    res = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE, json.dumps(sets), str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [True, True, "system", True, "retain", False, False, True]
    assert res.stderr.count("host allocator: system (train.host_allocator=auto)") == 1, res.stderr[-2000:]


@pytest.mark.parametrize("setting, peak, available, expected", [
    ("auto", 10, 20, "retain"),      # twice the peak fits exactly
    ("auto", 10, 19, "system"),      # one byte short
    ("auto", 10, None, "retain"),    # unknown (not Linux): the throughput default
    ("auto", 12_700_000_000, 21_880_000_000, "system"),  # a 1.2B STEP stage on a 24 GB machine
    ("retain", 10, 1, "retain"),     # an explicit choice stands, however tight
    ("system", 10, 10**12, "system"),
])
def test_auto_host_allocator_retains_only_where_twice_the_step_peak_fits(setting, peak, available, expected):
    from steplm.allocator import RETAIN_HEADROOM, choose_host_allocator

    chosen, why = choose_host_allocator(setting, peak, available)
    assert chosen == expected
    assert (why is not None) == (setting == "auto" and expected == "system")
    if why:
        assert "train.host_allocator=retain" in why and f"{RETAIN_HEADROOM:g} x" in why


def test_host_allocator_rejects_an_unknown_policy(tmp_path, capsys):
    rc = main(["train", "--out", str(tmp_path / "run"), "--set", "train.host_allocator=jemalloc",
               *[x for kv in tiny_overrides(tmp_path) for x in ("--set", kv)]])
    err = capsys.readouterr().err
    assert rc == 2 and "train.host_allocator" in err and "retain" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_available_memory_is_the_least_of_meminfo_and_the_cgroup_limit(tmp_path):
    """MemAvailable, or less under a cgroup limit (v2 memory.max - memory.current), which a container
    or a Slurm job sets below the node's memory; 'max' means no limit; nothing readable: None."""
    from steplm.allocator import available_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    cg = ((str(limit), str(usage)),)
    limit.write_text("max\n")
    usage.write_text("1000\n")
    assert available_bytes(str(meminfo), cg) == 20000000 * 1024  # no limit
    limit.write_text(f"{8 * 2**30}\n")
    usage.write_text(f"{2 * 2**30}\n")
    assert available_bytes(str(meminfo), cg) == 6 * 2**30  # the job's limit, below the node's
    limit.write_text(f"{64 * 2**30}\n")
    assert available_bytes(str(meminfo), cg) == 20000000 * 1024  # a limit above the node's memory
    assert available_bytes(str(tmp_path / "absent"), ((str(tmp_path / "x"), str(tmp_path / "y")),)) is None


@pytest.mark.parametrize("ranks, expected", [("1", "retain"), ("2", "retain"), ("3", "system")])
def test_auto_host_allocator_counts_every_rank_on_the_host(monkeypatch, ranks, expected):
    """torchrun's ranks on one host share its memory: twice the peak of each of LOCAL_WORLD_SIZE ranks
    must fit (10 bytes a rank, 45 available: 2 ranks need 40, 3 need 60)."""
    from steplm.allocator import choose_host_allocator

    monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
    assert choose_host_allocator("auto", 10, 45)[0] == expected
