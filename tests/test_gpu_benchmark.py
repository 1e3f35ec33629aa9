"""benchmarks/gpu.py's CPU dry-run path: every method moves through its stages and the record
holds the planner's prediction next to the live model-state bytes (the GPU run is by hand)."""
import importlib.util

from conftest import ROOT


def test_gpu_benchmark_dry_run(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--dry-run", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"vanilla", "step-2stages", "relora", "galore", "vanilla-8bit", "step-2stages-8bit"}
    assert [s["layers"] for s in rows["step-2stages"]["stages"]] == [2, 4]
    assert [s["stage"] for s in rows["step-2stages"]["stages"]] == [1, 2]  # numbered from 1, as everywhere
    assert [s["layers"] for s in rows["step-2stages-8bit"]["stages"]] == [2, 4]
    for m in ("vanilla", "step-2stages"):  # 8-bit moments: the embeddings' and head's states shrink
        assert rows[f"{m}-8bit"]["planned_peak_gb"] < rows[m]["planned_peak_gb"]
    assert [s["kind"] for s in rows["relora"]["stages"]] == ["full", "lora"]
    for r in rows.values():
        if "skipped" in r:
            continue
        for s in r["stages"]:
            assert s["model_state_bytes"] == s["planned_state_bytes"] and s["tokens_per_second"] > 0
    assert rows["step-2stages"]["planned_peak_gb"] < rows["vanilla"]["planned_peak_gb"]
    assert rows["vanilla"]["paper_table2_gb"] == 5.9 and (tmp_path / "gpu.json").is_file()
    ev = res["eval_and_sft"]  # the evaluation and SFT rows (issue #16) ran through the real code paths
    assert ev["perplexity_tokens_per_second"] > 0 and ev["task_items_per_second"] > 0
    assert ev["sft_tokens_per_second"] > 0 and ev["sft_steps"] == 3 and ev["sft_max_memory_allocated_gb"] is None
    assert "SFT step" in (tmp_path / "gpu.md").read_text()
