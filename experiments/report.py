"""Curves and REPORT.md of a sweep: per-variant CE/MSE vs step (mean and band over seeds, the paper's zoomed
inset over the last 20 % of steps), a table of final values (mean ± std over seeds), paired differences with a
paired t-test, and the paper's claim checked against what this run measured.

Inputs are the runs' `metrics.jsonl` (trainer keys `ce_avg` / `mse_avg`: count-weighted means per log window).
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from bagel_jax import plots

METRICS = ("ce", "mse")
FINAL_FRACTION = 0.2  # "final value" = mean over the last 20 % of steps (the paper's inset window)


def read_run(workdir: str) -> Dict[str, np.ndarray]:
  """step -> metric arrays of one run, from its metrics.jsonl (falls back to the last-step values)."""
  path = os.path.join(workdir, "metrics.jsonl")
  rows = []
  with open(path) as f:
    for line in f:
      if line.strip():
        rows.append(json.loads(line))
  out: Dict[str, List[float]] = {"step": []}
  for k in METRICS:
    out[k] = []
  for r in rows:
    if not all((f"{k}_avg" in r) or (k in r) for k in METRICS):
      continue
    out["step"].append(int(r["step"]))
    for k in METRICS:
      out[k].append(float(r.get(f"{k}_avg", r[k])))
  return {k: np.asarray(v) for k, v in out.items()}


def align(runs: Sequence[Mapping[str, np.ndarray]], key: str) -> Tuple[np.ndarray, np.ndarray]:
  """Seeds' curves on their common steps: (steps, [n_seeds, n_steps])."""
  common = sorted(set.intersection(*[set(r["step"].tolist()) for r in runs]))
  steps = np.asarray(common)
  ys = np.stack([np.asarray([r[key][r["step"].tolist().index(s)] for s in common]) for r in runs])
  return steps, ys


def final_values(runs: Sequence[Mapping[str, np.ndarray]], key: str) -> np.ndarray:
  """Per seed: mean of `key` over the last FINAL_FRACTION of steps."""
  steps, ys = align(runs, key)
  start = steps.max() * (1 - FINAL_FRACTION)
  sel = steps >= start
  return ys[:, sel].mean(axis=1)


def paired_test(a: np.ndarray, b: np.ndarray) -> Dict[str, float]:
  """Paired difference a - b over seeds, with a two-sided paired t-test (scipy)."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  d = np.asarray(a) - np.asarray(b)
  res = {"mean": float(d.mean()), "std": float(d.std(ddof=1)) if len(d) > 1 else float("nan"), "n": int(len(d))}
  if len(d) > 1 and np.any(d != d[0]):
    res["p"] = float(stats.ttest_rel(a, b).pvalue)
  else:
    res["p"] = float("nan")
  return res


def plot(groups: Mapping[str, Sequence[Mapping[str, np.ndarray]]], out_png: str, title: str) -> str:
  """One panel per metric: mean over seeds with a min–max band, and an inset zoomed on the last 20 %."""

  def draw(ax, key):
    inset = ax.inset_axes([0.45, 0.45, 0.52, 0.5])
    lo_all, hi_all, x0 = [], [], None
    for label, runs in groups.items():
      steps, ys = align(runs, key)
      mean = ys.mean(axis=0)
      line, = ax.plot(steps, mean, lw=1.3, label=f"{label} (n={len(runs)})")
      ax.fill_between(steps, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.18, lw=0)
      tail = steps >= steps.max() * (1 - FINAL_FRACTION)
      inset.plot(steps[tail], mean[tail], lw=1.3, color=line.get_color())
      inset.fill_between(steps[tail], ys.min(axis=0)[tail], ys.max(axis=0)[tail], color=line.get_color(),
                         alpha=0.18, lw=0)
      lo_all.append(ys[:, tail].min())
      hi_all.append(ys[:, tail].max())
      x0 = steps[tail].min()
    if lo_all:
      pad = 0.05 * (max(hi_all) - min(lo_all) + 1e-9)
      inset.set_ylim(min(lo_all) - pad, max(hi_all) + pad)
      inset.set_xlim(left=x0)
    inset.tick_params(labelsize=7)
    inset.grid(alpha=0.3)
    ax.set_title(f"{key.upper()} (training loss, mean and min–max over seeds)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")

  return plots.panels(METRICS, out_png, draw, width=6.2, height=4.2, title=title, dpi=120)


def write_curves_csv(groups, out_csv: str) -> str:
  with open(out_csv, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["variant", "step", "metric", "mean", "std", "min", "max", "n_seeds"])
    for label, runs in groups.items():
      for key in METRICS:
        steps, ys = align(runs, key)
        for i, s in enumerate(steps):
          col = ys[:, i]
          w.writerow([label, int(s), key, f"{col.mean():.6g}", f"{col.std(ddof=1) if len(col) > 1 else 0:.6g}",
                      f"{col.min():.6g}", f"{col.max():.6g}", len(col)])
  return out_csv


def _fmt(x: float, nd: int = 4) -> str:
  return "nan" if not math.isfinite(x) else f"{x:.{nd}f}"


def summarize(groups: Mapping[str, Sequence[Mapping[str, np.ndarray]]], reference: Optional[str] = None
              ) -> Dict[str, Dict]:
  """Final values per variant and paired differences vs `reference` (runs paired by seed order)."""
  labels = list(groups)
  reference = reference if reference in groups else labels[0]
  finals = {lab: {k: final_values(groups[lab], k) for k in METRICS} for lab in labels}
  table = {lab: {k: {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
                     "per_seed": [float(x) for x in v]} for k, v in finals[lab].items()} for lab in labels}
  diffs = {}
  for lab in labels:
    if lab == reference:
      continue
    diffs[lab] = {k: paired_test(finals[lab][k], finals[reference][k]) for k in METRICS}
  return {"reference": reference, "final": table, "paired_vs_reference": diffs}


def write_report(out_dir: str, experiment: str, summary: Mapping, claim: str,
                 verdicts: Sequence[Tuple[str, bool, str]], setup: str) -> str:
  """REPORT.md: setup, table, paired differences, the paper's claim and the measured verdicts."""
  ref = summary["reference"]
  lines = [f"# {experiment}", "", setup, "", "![curves](curves.png)", "",
           f"Final value = mean of the per-window training loss over the last {int(FINAL_FRACTION * 100)} % "
           "of steps, per seed; mean ± std over seeds.", "",
           "| variant | CE | MSE | seeds |", "|---|---|---|---|"]
  for lab, row in summary["final"].items():
    lines.append(f"| {lab} | {_fmt(row['ce']['mean'])} ± {_fmt(row['ce']['std'])} | "
                 f"{_fmt(row['mse']['mean'])} ± {_fmt(row['mse']['std'])} | {len(row['ce']['per_seed'])} |")
  for key, name in (("mse", "generation MSE"), ("ce", "understanding CE")):
    order = sorted(summary["final"], key=lambda lab: summary["final"][lab][key]["mean"])
    lines.append("")
    lines.append(f"Measured ordering of final {name} (lowest first): " + " < ".join(order) + ".")
  lines += ["", f"Paired differences (variant − {ref}, same seeds; two-sided paired t-test, significant at "
            "p < 0.05):", "", "| variant | ΔCE | p | ΔMSE | p |", "|---|---|---|---|---|"]
  for lab, d in summary["paired_vs_reference"].items():
    lines.append(f"| {lab} | {d['ce']['mean']:+.4f} ± {_fmt(d['ce']['std'])} | {_fmt(d['ce']['p'], 3)} | "
                 f"{d['mse']['mean']:+.4f} ± {_fmt(d['mse']['std'])} | {_fmt(d['mse']['p'], 3)} |")
  lines += ["", "## The paper's claim and what we measured", "", claim, ""]
  for text, ok, detail in verdicts:
    if not ok:
      word = "does not hold"
    elif "not significant" in detail:
      word = "same direction, not significant"
    else:
      word = "holds"
    lines.append(f"- **{word}**: {text} ({detail})")
  lines += ["", "Curves as CSV: `curves.csv`; numbers: `summary.json`."]
  path = os.path.join(out_dir, "REPORT.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


def significant_less(summary, a: str, b: str, key: str) -> Tuple[bool, str]:
  """Is variant a's final `key` below b's, and is the paired difference significant?"""
  fa = np.asarray(summary["final"][a][key]["per_seed"])
  fb = np.asarray(summary["final"][b][key]["per_seed"])
  t = paired_test(fa, fb)
  ok = t["mean"] < 0
  sig = math.isfinite(t["p"]) and t["p"] < 0.05
  return ok, f"{a} − {b} = {t['mean']:+.4f}, p = {_fmt(t['p'], 3)}, {'significant' if sig else 'not significant'}"


ClaimCheck = Callable[[Mapping], Tuple[str, List[Tuple[str, bool, str]]]]
