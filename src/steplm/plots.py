"""Tables and PNG plots made from run summaries and metrics."""
from __future__ import annotations

import json
from pathlib import Path

from steplm.errors import UserError
from steplm.plan import memory


def read_summary(run_dir: str | Path, key: str = "RUN_DIR") -> dict:
    """A finished run's summary.json; a UserError naming ``key`` (the argument that gave the folder)."""
    from steplm.io.files import read_json
    p = Path(run_dir) / "summary.json"
    if not Path(run_dir).is_dir():
        raise UserError(f"{run_dir} is not a directory (give a steplm run directory)", key=key)
    if not p.is_file():
        raise UserError(f"{run_dir} has no summary.json (is the run finished?)", key=key)
    s = read_json(p, key)
    if not isinstance(s.get("stages"), list) or not s["stages"] or not all(isinstance(x, dict) for x in s["stages"]):
        raise UserError(f"{p} has no per-stage records (stages); is it a steplm run's summary?", key=key)
    return s


def png_path(out: str | Path | None, default: Path) -> Path:
    """Where a plot goes: ``default`` when not given, FOLDER/<default's name> for a folder (one that
    exists, or a path ending in '/'), else the path itself with .png added if it has no suffix. Its
    folder may not exist yet (``save_png`` creates it), but cannot lie under a file. Errors are keyed
    ``--out``."""
    if not out:
        return default
    p = Path(out)
    if p.is_dir() or str(out).endswith("/"):
        p = p / default.name
    above = next((a for a in p.parents if a.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"{above} is a file, not a directory", key="--out")
    if p.suffix.lower() not in ("", ".png"):
        raise UserError(f"plots are PNG files; give a path ending in .png, got {p.name}", key="--out")
    return p.with_suffix(".png") if not p.suffix else p


def save_png(fig, out: str | Path) -> None:
    """Write ``fig`` to ``out`` (creating its missing folders, as train and export create theirs) and
    close it; a place that cannot be written is one UserError line, and leaves no folder it created."""
    import matplotlib.pyplot as plt

    from steplm.io.files import one_line
    created = [p for p in Path(out).parents if not p.exists()]  # innermost first
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    except (OSError, UnicodeError) as e:
        for p in created:
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        raise UserError(f"cannot write {out} ({one_line(e)})", key="--out")
    finally:
        plt.close(fig)


def plot_memory(run_dir: str | Path, out: str | Path | None = None, vanilla_dir: str | Path | None = None) -> Path:
    """The paper's Figure 2: model-state memory per stage, planned vs measured, against vanilla."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = read_summary(run_dir)
    stages = summary["stages"]
    out = png_path(out, Path(run_dir) / "memory.png")
    from steplm.config import load_saved
    from steplm.methods.base import layer_shape, precision
    if not (Path(run_dir) / "config.yaml").is_file():
        raise UserError(f"RUN_DIR: {run_dir} has no config.yaml (is it a steplm run directory?)")
    try:
        cfg = load_saved(Path(run_dir) / "config.yaml")
    except UserError as e:
        raise UserError(f"RUN_DIR: {run_dir}'s config.yaml is not one this steplm reads ({e})")
    shape = layer_shape(cfg.model)
    prec = precision(cfg)
    head = memory.head_state_bytes(cfg.model.vocab_size, cfg.model.d_model, cfg.model.tie_embeddings, prec)
    van_planned = cfg.model.n_layers * memory.trainable_layer_bytes(shape, prec) + head
    mb = 1 / 2**20
    vanilla = read_summary(vanilla_dir, "--vanilla") if vanilla_dir else None
    if vanilla is not None and vanilla.get("method") != "vanilla":  # its stage 1 would be drawn as vanilla
        raise UserError(f"--vanilla: {vanilla_dir} is a {vanilla.get('method')!r} run; give a vanilla run")
    try:
        van_measured = vanilla["stages"][0]["measured_state_bytes"]["total"] if vanilla else None
    except (KeyError, TypeError) as e:
        raise UserError(f"--vanilla: {vanilla_dir}'s summary.json lacks the memory record {e} (written by an older "
                        f"or damaged run)")
    try:
        planned = [s["planned_state_bytes"]["total"] * mb for s in stages]
        measured = [s["measured_state_bytes"]["total"] * mb for s in stages]
        # by position: summaries number stages from 1 now, from 0 before; the list is in stage order
        labels = [f"stage {i + 1}\n{s['layers']} layers" for i, s in enumerate(stages)]
        title = f"{summary['method']}: memory per stage (d={cfg.model.d_model}, L={cfg.model.n_layers})"
    except (KeyError, TypeError) as e:
        raise UserError(f"RUN_DIR: a summary.json lacks the memory record {e} (written by an older or damaged run)")
    fig, ax = plt.subplots(figsize=(6.4, 4))
    xs = range(len(stages))
    name = {"step": "STEP"}.get(summary["method"], summary["method"])
    ax.bar([x - 0.2 for x in xs], planned, 0.4, label=f"{name} planned (Eq. 2 + embeddings)", color="#8fb3de")
    ax.bar([x + 0.2 for x in xs], measured, 0.4, label=f"{name} measured (live tensors)", color="#1f5fa8")
    ax.axhline(van_planned * mb, color="#c0392b", ls="--", label="vanilla planned (Eq. 1 + embeddings)")
    if van_measured is not None:
        ax.axhline(van_measured * mb, color="#7b1e12", ls=":", label="vanilla measured")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("model-state memory (MiB)")
    ax.set_title(title)
    top = max(planned + measured + [van_planned * mb] + ([van_measured * mb] if van_measured else []))
    ax.set_ylim(0, top * 1.45)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    save_png(fig, out)
    return out


def read_metrics(run_dir: str | Path) -> list[dict]:
    """A run's metrics rows; a line that does not parse (the last one of a killed run) is skipped."""
    p = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in p.read_text(errors="replace").splitlines() if p.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def plot_loss_vs_flops(runs: dict[str, str | Path], out: str | Path) -> Path:
    """Validation loss against training FLOPs, one line per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, d in runs.items():
        rows = [r for r in read_metrics(d) if "val_loss" in r]
        ax.plot([r["flops"] for r in rows], [r["val_loss"] for r in rows], marker="o", ms=3, label=label)
        for a, b in zip(rows, rows[1:]):
            if b["stage"] != a["stage"]:
                ax.axvline(a["flops"], color="grey", lw=0.5, ls=":")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (nats)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, out)
    return Path(out)
