"""loss.png of a training run: the align/joint losses and the VAE reconstruction error, read from loss.csv
(matplotlib, Agg backend; imported only when a plot is drawn)."""

from __future__ import annotations

import csv

from ..fileio import atomic_path


def plot_losses(csv_path, png_path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ser = lambda key, stages: [(int(r["step"]), float(r[key])) for r in rows  # noqa: E731
                               if r["stage"] in stages and r.get(key)]
    ax = axes[0]
    for key, label in (("loss", "total"), ("text", "text CE"), ("image", "flow MSE (all images)"),
                       ("image_gen", "flow MSE (generation)")):
        pts = ser(key, ("align", "joint"))
        if pts:
            ax.plot(*zip(*pts), label=label, lw=1)
    bounds = {}
    for r in rows:
        bounds.setdefault(r["stage"], int(r["step"]))
    for st, s in bounds.items():
        ax.axvline(s, color="gray", ls=":", lw=0.8)
        ax.text(s, 1.0, st, transform=ax.get_xaxis_transform(), fontsize=8, va="top")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("Cheers losses (align + joint)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax = axes[1]
    for key, label in (("rec_l1", "L1"), ("rec_l2", "L2")):
        pts = ser(key, ("vae",))
        if pts:
            ax.plot(*zip(*pts), label=label, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("VAE reconstruction")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_path(png_path) as tmp:          # a plot interrupted half-way never replaces the last one
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
