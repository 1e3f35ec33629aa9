"""`steplm plot`: Figure 2, a run's memory per stage."""
from __future__ import annotations

import sys


def cmd_plot(a):
    from steplm.plots import plot_memory

    out = plot_memory(a.run_dir, a.out, a.vanilla)
    print(f"wrote {out}", file=sys.stderr)


def add_parsers(sub) -> None:
    pt = sub.add_parser("plot", help="Figure 2: memory per stage of a run, as PNG")
    pt.add_argument("run_dir", help="run directory (its summary.json's per-stage memory)")
    pt.add_argument("--vanilla", help="a vanilla run directory to compare against")
    pt.add_argument("--out", help="PNG path, or a folder for memory.png in it; missing folders are created "
                    "(default RUN_DIR/memory.png)")
    pt.set_defaults(fn=cmd_plot)
