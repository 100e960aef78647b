"""Loss curves as PNG files people can look at."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard-style)."""
    if len(values) < 5:
        return list(values)
    out, last = [], 0.0
    for i, v in enumerate(values, start=1):
        last = weight * last + (1 - weight) * v
        out.append(last / (1 - weight**i))
    return out


def plot_losses(output_dir: str, log_history: list[dict[str, Any]]) -> list[Path]:
    """training_loss.png (and training_eval_loss.png when there was evaluation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, name in (("loss", "training_loss.png"), ("eval_loss", "training_eval_loss.png")):
        points = [(h["step"], h[key]) for h in log_history
                  if key in h and isinstance(h[key], (int, float)) and math.isfinite(h[key])]
        if not points:
            continue
        steps, values = zip(*points)
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        ax.plot(steps, values, color="#1f77b4", alpha=0.35 if len(values) >= 5 else 1.0,
                marker="o" if len(values) < 5 else None, label="original")
        if len(values) >= 5:
            ax.plot(steps, smooth(list(values)), color="#1f77b4", label="smoothed")
        ax.set_xlabel("step")
        ax.set_ylabel(key.replace("_", " "))
        ax.set_title(f"{key.replace('_', ' ')} of {Path(output_dir).name}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(output_dir) / name
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def plot_metric(output_dir: str, log_history: list[dict[str, Any]], key: str, name: str) -> Path | None:
    """One curve of `key` against the step (e.g. ppo's reward), smoothed past 5 points;
    None when no step logged it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["step"], h[key]) for h in log_history
              if isinstance(h.get(key), (int, float)) and math.isfinite(h[key])]
    if not points:
        return None
    steps, values = zip(*points)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, values, color="#2ca02c", alpha=0.35 if len(values) >= 5 else 1.0,
            marker="o" if len(values) < 5 else None, label="original")
    if len(values) >= 5:
        ax.plot(steps, smooth(list(values)), color="#2ca02c", label="smoothed")
    ax.set_xlabel("step")
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(f"{key.replace('_', ' ')} of {Path(output_dir).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(output_dir) / name
    fig.savefig(path)
    plt.close(fig)
    return path
