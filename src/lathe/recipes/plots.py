"""Loss curves as PNG files people can look at.

The raw curve is drawn faint with a centred moving average over it (a trailing average,
TensorBoard's, lags behind a falling loss by many steps); evaluations are drawn as
points on the training curve's axes, so even a single evaluation is read against the
training loss; steps are whole numbers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def smooth(values: list[float]) -> list[float]:
    """Centred moving average over about a tenth of the points (no lag); the window
    shrinks near the ends so every point is an average of its neighbours on both sides."""
    n = len(values)
    if n < 5:
        return list(values)
    half = max(1, n // 20)
    out = []
    for i in range(n):
        k = min(half, i, n - 1 - i)
        window = values[i - k:i + k + 1]
        out.append(sum(window) / len(window))
    return out


def _points(log_history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(h["step"], h[key]) for h in log_history
           if isinstance(h.get(key), (int, float)) and math.isfinite(h[key]) and "step" in h]
    return [p[0] for p in pts], [p[1] for p in pts]


def _figure(title: str, ylabel: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def _curve(ax: Any, steps: list[int], values: list[float], color: str, label: str) -> None:
    if len(values) >= 5:
        ax.plot(steps, values, color=color, alpha=0.3, label=f"{label} (raw)")
        ax.plot(steps, smooth(values), color=color, label=f"{label} (smoothed)")
    else:
        ax.plot(steps, values, color=color, marker="o", label=label)


def _save(fig: Any, ax: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_losses(output_dir: str, log_history: list[dict[str, Any]]) -> list[Path]:
    """training_loss.png (training loss, with the evaluations on it) and, when there was
    evaluation, training_eval_loss.png (eval loss, with the training loss faint behind it)."""
    name = Path(output_dir).name
    train = _points(log_history, "loss")
    evals = _points(log_history, "eval_loss")
    written = []
    if train[0]:
        fig, ax = _figure(f"loss of {name}", "loss")
        _curve(ax, *train, "#1f77b4", "training loss")
        if evals[0]:
            ax.plot(*evals, color="#d62728", marker="o", linestyle="--", label="eval loss")
        written.append(_save(fig, ax, Path(output_dir) / "training_loss.png"))
    if evals[0]:
        fig, ax = _figure(f"eval loss of {name}", "eval loss")
        if train[0]:
            ax.plot(*train, color="#1f77b4", alpha=0.2, label="training loss")
        ax.plot(*evals, color="#d62728", marker="o", label="eval loss")
        written.append(_save(fig, ax, Path(output_dir) / "training_eval_loss.png"))
    return written


def plot_metric(output_dir: str, log_history: list[dict[str, Any]], key: str, name: str) -> Path | None:
    """One curve of `key` against the step (e.g. ppo's reward); None when no step logged it."""
    steps, values = _points(log_history, key)
    if not steps:
        return None
    label = key.replace("_", " ")
    fig, ax = _figure(f"{label} of {Path(output_dir).name}", label)
    _curve(ax, steps, values, "#2ca02c", label)
    return _save(fig, ax, Path(output_dir) / name)


def plot_confusion(matrix: list[list[int]], names: list[str], path: Path, title: str) -> Path:
    """A confusion matrix as a heat map: rows the true class, columns the predicted one, each
    cell its count (and the row's share, so rare classes read as clearly as common ones)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    side = min(max(4.0, 0.6 * n + 2.5), 16.0)
    fig, ax = plt.subplots(figsize=(side + 1.5, side), dpi=100)
    totals = [max(sum(row), 1) for row in matrix]
    shares = [[c / t for c in row] for row, t in zip(matrix, totals)]
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(n), labels=names, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), labels=names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{matrix[i][j]}\n{100 * shares[i][j]:.0f}%", ha="center", va="center",
                        fontsize=8, color="white" if shares[i][j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
