"""The one plot helper: a row of panels, one per name, saved as a PNG (matplotlib's Agg backend, no display).

The training curves (train/metrics.py), the emergence curves (eval/emergence.py) and the sweep reports
(experiments/report.py) each draw their panels through `panels`.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence


def panels(names: Sequence[str], out_png: str, draw: Callable, *, width: float = 4.2, height: float = 3.2,
           title: Optional[str] = None, title_size: Optional[float] = None, dpi: int = 110) -> str:
  """`draw(ax, name)` fills the panel of each name (at least one panel); returns `out_png`."""
  import matplotlib  # pylint: disable=import-outside-toplevel  (only plotting code pays matplotlib's import)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  n = max(1, len(names))
  fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
  for ax, name in zip(axes[0], names):
    draw(ax, name)
  if title:
    fig.suptitle(title, **({"fontsize": title_size} if title_size else {}))
  fig.tight_layout()
  fig.savefig(out_png, dpi=dpi)
  plt.close(fig)
  return out_png
