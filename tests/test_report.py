"""Plots: Figure 2 and loss-vs-FLOPs PNGs from real tiny runs."""
from steplm import config
from steplm.cli import main
from steplm.plots import plot_loss_vs_flops
from steplm.train.loop import Trainer

from conftest import tiny_overrides


def test_plot_figure2_and_curve(tmp_path):
    runs = {}
    for name, extra in (("vanilla", {}), ("step", {"method": "step", "step.n_stages": 2})):
        cfg = config.load(None, tiny_overrides(tmp_path, **{"train.max_steps": 6, "train.eval_every": 2}, **extra))
        Trainer(cfg, tmp_path / name, progress=False).fit()
        runs[name] = tmp_path / name
    png = tmp_path / "fig2.png"
    assert main(["plot", str(runs["step"]), "--vanilla", str(runs["vanilla"]), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    curve = plot_loss_vs_flops(runs, tmp_path / "curve.png")
    assert curve.read_bytes()[:4] == b"\x89PNG"


def test_plot_needs_a_finished_run(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "summary.json" in capsys.readouterr().err


def test_tensorboard_events_mirror_metrics(tmp_path):
    pytest = __import__("pytest")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config.load(None, tiny_overrides(tmp_path, **{"train.max_steps": 4, "train.tensorboard": True}))
    Trainer(cfg, tmp_path / "tb", progress=False).fit()
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("loss")]
    import json
    rows = [json.loads(x) for x in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [round(v, 5) for v in losses] == [pytest.approx(r["loss"], abs=1e-5) for r in rows]
    assert "val_loss" in acc.Tags()["scalars"]
