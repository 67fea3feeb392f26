"""PNG figures of a run directory (matplotlib, no display needed)."""

from __future__ import annotations

import os

import numpy as np


def pyplot():
    """matplotlib.pyplot with the headless Agg backend selected."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, legend_axes, path: str) -> None:
    """Small legend on ``legend_axes``, tight layout, ``path`` written at 100 dpi, the figure closed."""
    legend_axes.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)


def plot_run(out_dir: str, results: dict, diag_lines: list[dict]) -> list[str]:
    """``metrics.png`` (metrics vs edits so far) and ``updates.png`` (‖ΔW‖ and consecutive cosine per turn)."""
    plt = pyplot()
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, m in results["editors"].items():
        curve = m.get("during_run") or []
        if not curve:
            continue
        x = [c["edits"] for c in curve]
        axes[0].plot(x, [c["teacher_forced"]["efficacy"] for c in curve], marker="o", label=name)
        axes[1].plot(x, [c["teacher_forced"]["generalization"] for c in curve], marker="o", label=name)
        axes[2].plot(x, [c["locality_vs_unedited"] for c in curve], marker="o", label=name)
    for ax, title in zip(axes, ("efficacy (teacher-forced)", "generalization (teacher-forced)",
                                "locality vs unedited")):
        ax.set_title(title)
        ax.set_xlabel("edits so far")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "metrics.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    order = list(results["editors"])
    curves = {name: update_curves([d for d in diag_lines if d["editor"] == name])
              for name in sorted({d["editor"] for d in diag_lines}, key=order.index)}
    fig = plot_update_curves(curves, "turn (warm-up included)")
    paths.append(os.path.join(out_dir, "updates.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def update_curves(lines: list[dict]) -> tuple[list[float], list[float]]:
    """Per turn, ‖ΔW_t‖_F and cos(ΔW_t, ΔW_{t-1}) averaged over targets, from one run's diagnostics lines."""
    norms = [float(np.mean(list(d["delta_norm"].values()))) for d in lines]
    cosines = [float(np.mean(list(d["cosine"].values()))) for d in lines]
    return norms, cosines


def plot_update_curves(curves: dict, xlabel: str = "turn"):
    """A two-panel figure: ‖ΔW_t‖ (log scale) and the consecutive-shift cosine, one line per label of
    ``curves`` (label -> (norms, cosines)). Returns the figure."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for label, (norms, cosines) in curves.items():
        axes[0].plot(np.arange(len(norms)), norms, label=label)
        axes[1].plot(np.arange(len(cosines)), cosines, label=label)
    axes[0].set_title("‖ΔW_t‖_F (mean over targets)")
    axes[0].set_yscale("log")
    axes[1].set_title("cos(ΔW_t, ΔW_{t-1}) (mean over targets)")
    axes[1].axhline(0.0, color="k", lw=0.5)
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    if curves:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig
