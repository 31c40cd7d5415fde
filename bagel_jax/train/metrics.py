"""Metric writers, progress reporting and loss-curve plots.

`clu.metric_writers` imports TensorFlow at import time (guide A6), so the always-on writers here implement
CLU's `MetricWriter` interface (write_scalars / write_images / write_texts / write_hparams / flush / close)
without it: JSON lines plus a wide CSV. CLU's TensorBoard `SummaryWriter` joins when TensorFlow is installed
(`pip install -e '.[tb]'`). Only process 0 writes.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os

import time
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from bagel_jax import console, plots
from bagel_jax.train import errors

log = console.logger(__name__)


class JsonlCsvWriter:
  """metrics.jsonl (one object per write) and metrics.csv (one row per step, columns grow as keys appear)."""

  def __init__(self, workdir: str, name: str = "metrics"):
    os.makedirs(workdir, exist_ok=True)
    self.jsonl_path = os.path.join(workdir, f"{name}.jsonl")
    self.csv_path = os.path.join(workdir, f"{name}.csv")
    self._columns: List[str] = []
    self._rows: List[Dict[str, float]] = []
    if os.path.exists(self.jsonl_path):  # resumed run: keep history, drop steps that will be re-done
      self._rows = read_jsonl(self.jsonl_path)
      for r in self._rows:
        self._add_columns(r)

  def _add_columns(self, row):
    new = [k for k in row if k not in self._columns]
    self._columns += new
    return bool(new)

  def truncate_after(self, step: int):
    """Drops rows logged after `step` (a resumed run repeats them). Rewrites go through a temporary file and a
    rename, so a failure (disk full) leaves the previous file whole."""
    self._rows = [r for r in self._rows if r.get("step", 0) <= step]
    _replace_text(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in self._rows))
    self._rewrite_csv()

  def _rewrite_csv(self):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=self._columns)
    w.writeheader()
    for r in self._rows:
      w.writerow(r)
    _replace_text(self.csv_path, buf.getvalue())

  def write_scalars(self, step: int, scalars: Mapping[str, float]):
    row = {"step": int(step)}
    row.update({k: float(v) for k, v in scalars.items()})
    self._rows.append(row)
    _append_text(self.jsonl_path, json.dumps(row) + "\n")
    if self._add_columns(row) or not os.path.exists(self.csv_path):
      self._rewrite_csv()
    else:
      buf = io.StringIO()
      csv.DictWriter(buf, fieldnames=self._columns).writerow(row)
      _append_text(self.csv_path, buf.getvalue())

  def write_images(self, step: int, images: Mapping[str, np.ndarray]):
    from PIL import Image  # pylint: disable=import-outside-toplevel
    for k, img in images.items():
      arr = np.asarray(img)
      if arr.ndim == 4:
        arr = arr[0]
      if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).astype(np.uint8)
      Image.fromarray(arr).save(os.path.join(os.path.dirname(self.jsonl_path), f"{k}_{step:07d}.png"))

  def write_texts(self, step: int, texts: Mapping[str, str]):
    with open(os.path.join(os.path.dirname(self.jsonl_path), "texts.jsonl"), "a") as f:
      f.write(json.dumps({"step": int(step), **texts}) + "\n")

  def write_hparams(self, hparams: Mapping[str, object]):
    with open(os.path.join(os.path.dirname(self.jsonl_path), "hparams.json"), "w") as f:
      json.dump(dict(hparams), f, indent=1, default=str)

  def flush(self):
    pass

  def close(self):
    pass


class MultiWriter:
  def __init__(self, writers: Sequence):
    self.writers = list(writers)

  def __getattr__(self, name):
    def call(*a, **kw):
      for w in self.writers:
        getattr(w, name)(*a, **kw)
    return call


class NullWriter:
  def __getattr__(self, name):
    return lambda *a, **kw: None


def create_writer(workdir: str, process_index: int = 0, tensorboard: bool = True):
  """JSONL/CSV always; CLU's TensorBoard writer if TensorFlow is importable; nothing on processes > 0."""
  if process_index > 0:
    return NullWriter()
  writers = [JsonlCsvWriter(workdir)]
  if tensorboard:
    try:
      from clu.metric_writers import SummaryWriter  # pylint: disable=import-outside-toplevel
      writers.append(SummaryWriter(os.path.join(workdir, "tensorboard")))
    except ImportError:
      log.info("TensorFlow not installed: TensorBoard events disabled (metrics.jsonl/csv are written)")
  return MultiWriter(writers)


def _append_text(path: str, text: str):
  """Appends whole lines or nothing: a failed write (disk full) is rolled back to the previous length and
  raised as `WriteFailedError` naming the file, errno and free space."""
  size = os.path.getsize(path) if os.path.exists(path) else 0
  try:
    with open(path, "a") as f:
      f.write(text)
      f.flush()
  except OSError as e:
    try:
      with open(path, "r+") as f:
        f.truncate(size)
    except OSError:
      pass
    raise errors.write_failed("metrics", path, e, "The file holds every complete line written before") from e


def _replace_text(path: str, text: str):
  tmp = path + ".tmp"
  try:
    with open(tmp, "w", newline="") as f:
      f.write(text)
    os.replace(tmp, path)
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise errors.write_failed("metrics", path, e, "The previous version of the file is unchanged") from e


def rotate_history(workdir: str, name: str = "metrics") -> List[str]:
  """A fresh start in a workdir with a metrics history keeps it: `metrics.jsonl` -> `metrics.previous-<N>.jsonl`
  (and the CSV alongside), N the first free number. Returns the new paths."""
  jsonl = os.path.join(workdir, f"{name}.jsonl")
  if not os.path.exists(jsonl) or not os.path.getsize(jsonl):
    return []
  n = 1
  while os.path.exists(os.path.join(workdir, f"{name}.previous-{n}.jsonl")):
    n += 1
  kept = []
  for ext in ("jsonl", "csv"):
    src = os.path.join(workdir, f"{name}.{ext}")
    if os.path.exists(src):
      dst = os.path.join(workdir, f"{name}.previous-{n}.{ext}")
      os.replace(src, dst)
      kept.append(dst)
  return kept


def read_jsonl(path: str) -> List[Dict[str, float]]:
  """The rows of a metrics file. A torn last line (the writer died mid-line) is dropped with a warning naming
  the file; an unreadable line anywhere else is an error naming the file and line."""
  with open(path) as f:
    lines = f.read().split("\n")
  rows = []
  numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
  for j, (lineno, line) in enumerate(numbered):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if j == len(numbered) - 1:
        log.warning("%s: dropped a torn last line %d (%r...: written by a run that stopped mid-write); the %d "
                    "lines before it are kept", path, lineno, line[:60], len(rows))
        break
      raise ValueError(f"{path}:{lineno}: not a JSON line ({e}); only a torn last line is dropped") from e
  return rows


class Progress:
  """One status line per report (step, the chosen metrics, ETA), logged; the package's progress bars are tqdm's
  (denoising steps, conversions), a training run reports in lines."""

  def __init__(self, total_steps: int, start_step: int = 0):
    self.total = total_steps
    self.start_step = start_step
    self.t0 = time.time()

  def eta(self, step: int) -> float:
    done = step - self.start_step
    if done <= 0:
      return float("nan")
    return (time.time() - self.t0) / done * (self.total - step)

  def report(self, step: int, metrics: Mapping[str, float], keys: Sequence[str]):
    parts = [f"step {step}/{self.total}"]
    for k in keys:
      if k in metrics:
        v = metrics[k]
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    parts.append(f"eta {_fmt(self.eta(step))}")
    log.info("  ".join(parts))


def _fmt(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def plot_curves(jsonl_path: str, out_png: str, keys: Sequence[str] = ("loss", "ce", "mse"),
                title: Optional[str] = None) -> str:
  """Loss curves (one panel per key) from metrics.jsonl."""
  rows = read_jsonl(jsonl_path)
  # Prefer the per-log-window means (trainer.window_means) over the last step's value: smoother, same scale.
  keys = [f"{k}_avg" if any(f"{k}_avg" in r for r in rows) else k for k in keys]
  keys = [k for k in keys if any(k in r for r in rows)]

  def draw(ax, k):
    pts = [(r["step"], r[k]) for r in rows if k in r and math.isfinite(r[k])]
    if pts:
      x, y = zip(*pts)
      ax.plot(x, y, lw=1.2)
    ax.set_title(k)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)

  return plots.panels(keys, out_png, draw, title=title)
