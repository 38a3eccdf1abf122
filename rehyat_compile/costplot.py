"""Tables and a PNG plot of cost vs video duration, original vs converted (CLI ``cost``, demo)."""
from __future__ import annotations

from pathlib import Path

METRICS = ("flops", "bytes", "peak_memory")


def valid_frames(frames, *reports) -> list[int]:
    """The frame counts every report's graph holds for (its guards, e.g. a RoPE table's length)."""
    def inside(t, report):
        lower, upper = report.frames_range
        return t >= lower and (upper is None or t <= upper)
    return [t for t in frames if all(inside(t, r) for r in reports)]


def cost_rows(original, converted, frames) -> list[dict]:
    """One row per latent-frame count the graphs hold for: each metric of both reports at that T."""
    rows = []
    for t in valid_frames(frames, original, converted):
        a, b = original.evaluate(T=t), converted.evaluate(T=t)
        rows.append({"T": int(t), **{f"original_{m}": float(a[m]) for m in METRICS},
                     **{f"converted_{m}": float(b[m]) for m in METRICS}})
    return rows


def plot_cost_vs_duration(rows: list[dict], path, title: str = "") -> Path:
    """Write a PNG with one panel per metric (log scale), original vs converted, against T."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    frames = [r["T"] for r in rows]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    for ax, metric in zip(axes, METRICS):
        for kind, style in (("original", "o-"), ("converted", "s-")):
            ax.plot(frames, [r[f"{kind}_{metric}"] for r in rows], style, label=kind)
        ax.set_xlabel("latent frames T")
        ax.set_ylabel({"flops": "FLOPs", "bytes": "bytes moved", "peak_memory": "peak activation bytes"}[metric])
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title or "cost vs video duration")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cost_series(rows: list[dict], path, title: str = "", kinds=("original", "converted", "streamed")) -> Path:
    """Like :func:`plot_cost_vs_duration` for any set of models: ``rows[i][f"{kind}_{metric}"]``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    frames = [r["T"] for r in rows]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    labels = {"flops": "FLOPs", "bytes": "bytes moved", "peak_memory": "peak activation bytes"}
    for ax, metric in zip(axes, METRICS):
        for kind, style in zip(kinds, ("o-", "s-", "^-", "d-")):
            ax.plot(frames, [r[f"{kind}_{metric}"] for r in rows], style, label=kind)
        ax.set_xlabel("latent frames T")
        ax.set_ylabel(labels[metric])
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title or "cost vs video duration", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
