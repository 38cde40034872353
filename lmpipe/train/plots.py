"""The loss-curve PNG logged with every run (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

from lmpipe.common.fileio import atomic_open


def loss_curve(log, path: str | Path, title: str = "") -> Path:
    """log: a DataFrame with step and train_loss / val_loss columns. `title`: the run's name, which
    tells the plots apart side by side in the UI's compare page."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for col, style, label in (("train_loss", "-", "train loss"),
                              ("val_loss", "o-", "val loss, estimate (MLflow val_loss_est)")):
        if col in log:
            d = log[["step", col]].dropna()
            ax.plot(d["step"], d[col], style, label=label, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return Path(path)
