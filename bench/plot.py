#!/usr/bin/env python
"""Render bench results as PNG bar charts: fastft's speedup and memory ratio per case.

    python bench/plot.py                                  # every bench/results/*.json -> bench/results/plots/
    python bench/plot.py bench/results/e2e-cpu-amd-epyc.json --out /tmp/plots

One PNG per results file (``<file stem>.png``): on the left the speedup (reference time / fastft
time, > 1 is faster) of every case of the bench, on the right fastft's memory as a fraction of the
reference's (< 1 is smaller), each with a line at 1. The cases and ratios are the ones
``fastft bench`` prints (``fastft.benchsuite.rows_from_result``). Needs matplotlib (Agg backend,
no display); it is not a dependency of fastft: ``pip install matplotlib``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
DEFAULT_OUT = os.path.join(BENCH_DIR, "results", "plots")


def _rows_from_result(doc: dict) -> list[dict]:
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)  # the checkout's fastft, installed or not
    from fastft.benchsuite import rows_from_result

    return rows_from_result(doc)


def plot_file(path: str, out_dir: str) -> str | None:
    """Write ``<out_dir>/<stem>.png`` for one results JSON; None when it has no rows to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        doc = json.load(f)
    rows = [r for r in _rows_from_result(doc) if r.get("speedup") is not None or r.get("mem_ratio") is not None]
    if not rows:
        return None
    env = doc.get("env", {})
    labels = [f"{r['bench']}: {r['case']}\n{r.get('fastft')} vs {r.get('reference')}" for r in rows]
    n = len(rows)
    fig, axes = plt.subplots(1, 2, figsize=(13, 1.2 + 0.55 * n), sharey=True)
    for ax, key, title, good_high in (
        (axes[0], "speedup", "speedup (reference time / fastft time)", True),
        (axes[1], "mem_ratio", "memory (fastft / reference)", False),
    ):
        vals = [r.get(key) for r in rows]
        ys = list(range(n))
        colors = []
        for v in vals:
            if v is None:
                colors.append("#cccccc")
            else:
                better = v >= 1.0 if good_high else v <= 1.0
                colors.append("#2a9d8f" if better else "#e76f51")
        ax.barh(ys, [v if v is not None else 0.0 for v in vals], color=colors)
        ax.axvline(1.0, color="black", linewidth=0.8)
        for y, v in zip(ys, vals):
            ax.text(v if v is not None else 0.0, y, f" {v:.2f}x" if v is not None else " n/a", va="center", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.margins(x=0.15)
    axes[0].invert_yaxis()  # shared y axis: once, first case on top
    axes[0].set_yticks(range(n))
    axes[0].set_yticklabels(labels, fontsize=7)
    name = doc.get("name") or os.path.splitext(os.path.basename(path))[0]
    when = (env.get("timestamp_utc") or "")[:10]
    fig.suptitle(
        f"{name} - {env.get('device')} ({env.get('device_name')}), torch {env.get('versions', {}).get('torch')}, "
        f"git {str(env.get('git_sha'))[:10]}, {when}",
        fontsize=10,
    )
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", help="results JSON files (default: bench/results/*.json)")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for the PNGs (default bench/results/plots/)")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("bench/plot.py needs matplotlib, which is not installed: pip install matplotlib", file=sys.stderr)
        return 2
    files = args.files or sorted(glob.glob(os.path.join(BENCH_DIR, "results", "*.json")))
    if not files:
        print("no results files to plot", file=sys.stderr)
        return 1
    written = 0
    for path in files:
        try:
            out = plot_file(path, args.out)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            continue
        if out is None:
            print(f"{path}: nothing to plot")
        else:
            written += 1
            print(f"{path} -> {out}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
