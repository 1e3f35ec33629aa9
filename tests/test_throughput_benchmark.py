"""benchmarks/throughput.py's loss-chunk sweep at a tiny shape: every chunk size runs the real fused
loss, and the tracked peak grows with the chunk (the memory side of the speed/memory trade)."""
import importlib.util

from conftest import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("throughput_bench", ROOT / "benchmarks" / "throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_interleaved_rounds_rotate_the_order_and_time_every_call():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = _bench().interleaved(fns, rounds=4, reps=2, before=lambda: calls.append("-"))
    runs = [c for c in calls if c != "-"]
    assert calls.count("-") == len(runs) == 4 * 3 * 2
    firsts = runs[::6]  # each round is 3 fns x 2 reps; round r starts at fn r mod 3
    assert firsts == ["a", "b", "c", "a"]
    assert all(len(v) == 4 and all(t >= 0 for t in v) for v in times.values())


def test_loss_chunk_sweep_peaks_grow_with_the_chunk():
    mod = _bench()
    shape = {"model.d_model": 32, "model.vocab_size": 1000, "train.micro_batch": 2, "train.seq_len": 128}
    chunks = (1 / 64, 1 / 16, 1 / 4)  # MiB of fp32 logits: 4, 16 and 65 rows of V = 1000, of 256
    res = mod.loss_chunk_sweep(shape, chunk_mib=chunks, rounds=1, reps=1)
    assert list(res) == [f"fused, {m} MiB chunks" for m in chunks] + ["unfused"]
    peaks = [res[f"fused, {m} MiB chunks"]["tracked_peak_bytes"] for m in chunks]
    assert peaks[0] < peaks[1] < peaks[2] < res["unfused"]["tracked_peak_bytes"]
    assert res["unfused"]["speed_vs_unfused"] == 1.0 and all(v["seconds_median"] > 0 for v in res.values())


def test_lora_linear_sweep_times_the_three_linears_of_each_block_shape(monkeypatch):
    """The sweep's rows are the block's three linear shapes, each with the trainable reference at
    ratio 1; the adapter row runs steplm's own LoRA function (a broken one fails the sweep)."""
    import pytest
    from steplm import lora
    mod = _bench()
    shape = {"model.d_model": 32, "train.micro_batch": 2, "train.seq_len": 16}
    res = mod.lora_linear_sweep(shape, rank=4, rounds=1, reps=1)
    f = mod.config.load(None, ["model.d_model=32"]).model.ffn_hidden
    assert list(res) == ["32->32", f"32->{f}", f"{f}->32"]
    for rows in res.values():
        assert list(rows) == ["trainable", "frozen, no adapter", "frozen + rank-4 adapter"]
        assert rows["trainable"]["vs_trainable"] == 1.0
        assert all(r["seconds_median"] > 0 for r in rows.values())
    monkeypatch.setattr(lora._LoRALinearFunction, "backward", staticmethod(lambda ctx, g: (None,) * 6))
    with pytest.raises(RuntimeError):  # wrong number of gradients: the adapter row really calls it
        mod.lora_linear_sweep(shape, rank=4, rounds=1, reps=1)
