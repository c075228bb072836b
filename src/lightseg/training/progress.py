"""The run's human-readable record: ``training_log.txt`` and ``progress.png``.

``progress.png`` has one panel for the losses, one for the validation Dice, one for the learning
rate, and one per other numeric history key (data-wait fraction, epoch time, and whatever
callbacks add: patch size, batch size, parameter count ...), all against the epoch.
"""

from __future__ import annotations

import datetime
import io
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from lightseg.io import atomic_write

_PANELS = (("loss", ("train_loss", "val_loss", "train_loss_ema")), ("Dice", ("val_dice", "val_dice_ema")), ("learning rate", ("lr",)))
_SKIP = {"epoch", "sec_per_iter"}  # sec_per_iter is epoch_time / iterations: one panel is enough


class RunLog:
    """Appends timestamped lines to ``training_log.txt`` and echoes them (rank 0 only)."""

    def __init__(self, path: Path | None, echo: bool = True) -> None:
        self.path, self.echo = path, echo

    def __call__(self, message: str) -> None:
        line = f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S} {message}"
        if self.path is not None:
            with open(self.path, "a") as handle:
                handle.write(line + "\n")
        if self.echo:
            print(line, file=sys.stderr, flush=True)


def _numeric(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return float(math.prod(value))  # a patch size plots as its voxel count
    return None


def plot_progress(history: Sequence[dict[str, Any]], path: Path) -> None:
    """Write ``progress.png`` atomically (matplotlib's Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    epochs = [h["epoch"] for h in history]
    class_dice = tuple(sorted({k for h in history for k in h if k.startswith("val_dice_") and k != "val_dice_ema"}))
    fixed = [(title, keys + class_dice if title == "Dice" else keys) for title, keys in _PANELS]
    grouped = {k for _, keys in fixed for k in keys}
    extra = sorted({k for h in history for k, v in h.items() if k not in grouped | _SKIP and _numeric(v) is not None})
    panels = [p for p in fixed if any(k in h for h in history for k in p[1])] + [(k, (k,)) for k in extra]
    rows = math.ceil(len(panels) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(11, 2.6 * rows), sharex=True, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            points = [(e, _numeric(h.get(key))) for e, h in zip(epochs, history)]
            points = [(e, v) for e, v in points if v is not None]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=key)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(loc="best", fontsize="small")
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    fig.subplots_adjust(left=0.08, right=0.98, top=0.97, bottom=0.08, hspace=0.3, wspace=0.25)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    plt.close(fig)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())
