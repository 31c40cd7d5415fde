"""Emergence harness: evaluate every saved checkpoint of a run, plot score vs tokens seen per task, and report
the tokens needed to reach 85% of the run's peak score (the paper's Fig. 7 metric; reference §10.3 gives the
7B numbers: understanding 0.18T, GenEval 0.68T, GEdit 2.64T, IntelligentBench 3.61T).

    python -m bagel_jax.eval.emergence --workdir workdirs/tiny [--num-samples 4] [--num-timesteps 12]

Tokens seen at a step come from the run's `metrics.jsonl`: a logged cumulative `tokens_seen` when present, else
the per-window throughput the trainer logs (tokens_per_s x window time, summed); without metrics they fall back
to steps x batch_size x seq_len of the run config (the packing budget, an upper bound), and the source is
recorded. The run must keep the checkpoints to evaluate (`train.keep_period`); only saved steps are scored.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from bagel_jax import console, plots
from bagel_jax.accelerators import use_cpu_if_no_accelerator
from bagel_jax.eval import run as run_lib
from bagel_jax.eval import suites as suites_lib
from bagel_jax.inference import model as model_lib

log = console.logger(__name__)

PEAK_FRACTION = 0.85


def tokens_seen(workdir: Optional[str], steps: Sequence[int], run_config: Optional[dict]
                ) -> Tuple[Dict[int, float], str]:
  """{step: tokens seen after that step} and where the numbers come from."""
  rows = []
  path = os.path.join(workdir, "metrics.jsonl") if workdir else ""
  if path and os.path.exists(path):
    with open(path) as f:
      rows = sorted((json.loads(line) for line in f if line.strip()), key=lambda r: r.get("step", 0))
  train = (run_config or {}).get("train", {}) if isinstance(run_config, dict) else {}
  cum_steps, cum_tokens = [0.0], [0.0]
  source = ""
  if rows and any("tokens_seen" in r for r in rows):
    pts = [(r["step"], r["tokens_seen"]) for r in rows if "tokens_seen" in r]
    cum_steps += [float(s) for s, _ in pts]
    cum_tokens += [float(t) for _, t in pts]
    source = "metrics.jsonl tokens_seen"
  elif rows and all(k in rows[0] for k in ("tokens_per_s", "step_time_s")):
    log_every = int(train.get("log_every", 1) or 1)
    total = 0.0
    for r in rows:
      if not all(k in r for k in ("tokens_per_s", "step_time_s", "step")):
        continue
      window = log_every if int(r["step"]) % log_every == 0 else 1
      total += float(r["tokens_per_s"]) * float(r["step_time_s"]) * window
      cum_steps.append(float(r["step"]))
      cum_tokens.append(total)
    source = "metrics.jsonl throughput (tokens_per_s x window time)"
  if len(cum_steps) > 1:
    xs, ys = np.array(cum_steps), np.array(cum_tokens)
    slope = ys[-1] / max(xs[-1], 1.0)  # beyond the last logged step: the run's mean tokens per step
    out = {int(s): float(np.interp(s, xs, ys)) if s <= xs[-1] else float(ys[-1] + slope * (s - xs[-1]))
           for s in steps}
    return out, source
  batch = (run_config or {}).get("batch", {}) if isinstance(run_config, dict) else {}
  per_step = float(batch.get("batch_size", 0) or 0) * float(batch.get("seq_len", 0) or 0)
  if per_step:
    return {int(s): per_step * s for s in steps}, "packing budget (steps x batch_size x seq_len, an upper bound)"
  return {int(s): float(s) for s in steps}, "unknown (tokens = steps)"


def tokens_to_fraction_of_peak(tokens: Sequence[float], scores: Sequence[float],
                               fraction: float = PEAK_FRACTION) -> Optional[float]:
  """First tokens value whose score reaches `fraction` x the run's peak (None when the peak is 0)."""
  scores = np.asarray(scores, np.float64)
  if not len(scores) or not np.isfinite(scores).any() or np.nanmax(scores) <= 0:
    return None
  target = fraction * np.nanmax(scores)
  for t, s in zip(tokens, scores):
    if s >= target - 1e-12:
      return float(t)
  return None


def run_emergence(workdir: str, out_dir: Optional[str] = None, *, num_samples: int = 4, num_timesteps: int = 12,
                  steps: Optional[Sequence[int]] = None, use_ema: bool = True,
                  suites: Sequence[str] = suites_lib.ALL_SUITES, per_step_grids: bool = False,
                  **settings) -> Dict[str, Any]:
  """Scores every saved step (or `steps`) of a run; writes emergence.json/.csv/.png under `out_dir`
  (default `<run workdir>/eval/emergence`)."""
  ckpt_dir, run_dir = model_lib.resolve_checkpoint_dir(workdir)
  available = model_lib.checkpoint_steps(ckpt_dir)
  steps = sorted(available if steps is None else steps)
  missing = sorted(set(steps) - set(available))
  if missing:
    raise ValueError(f"steps {missing} are not saved in {ckpt_dir} (saved: {available})")
  if not steps:
    raise FileNotFoundError(f"no checkpoint steps under {ckpt_dir}")
  out_dir = out_dir or run_lib.default_out_dir(ckpt_dir, "emergence")
  os.makedirs(out_dir, exist_ok=True)
  model = model_lib.load_model(workdir, step=steps[0], use_ema=use_ema)
  data = ((model.run_config or {}).get("data") or {}) if isinstance(model.run_config, dict) else {}
  settings.setdefault("data_seed", int(data.get("seed", 0) or 0))
  settings.setdefault("num_frames", int(data.get("num_frames", 4) or 4))
  s = suites_lib.EvalSettings(num_samples=num_samples, num_timesteps=num_timesteps, **settings)
  tokens, source = tokens_seen(run_dir, steps, model.run_config)
  rows = []
  for step in steps:
    if step != model.step:  # same architecture: reuse the compiled steps, swap the weights
      params, step, item = model_lib.load_params(ckpt_dir, model.config, step, use_ema)
      model.params, model.step, model.item = params, step, item
    report = run_lib.evaluate_model(model, os.path.join(out_dir, f"step_{step}"), s, suites, vae_ceiling=False,
                                    grid=per_step_grids)
    rows.append(dict(step=step, tokens=tokens[step], **report["scores"]))
    log.info("step %d: tokens %.4g %s", step, tokens[step], " ".join(f"{k} {v:.3f}" for k, v in report["scores"].items()))
  names = [k for k in suites_lib.HEADLINE if k in suites and any(k in r for r in rows)]
  summary = {}
  for k in names:
    xs = [r["tokens"] for r in rows]
    ys = [r.get(k, float("nan")) for r in rows]
    summary[k] = dict(peak=float(np.nanmax(ys)), tokens_to_85pct=tokens_to_fraction_of_peak(xs, ys))
  result = dict(workdir=os.path.abspath(workdir), tokens_source=source, rows=rows, summary=summary,
                settings=dict(num_samples=num_samples, num_timesteps=num_timesteps, use_ema=use_ema))
  with open(os.path.join(out_dir, "emergence.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(out_dir, "emergence.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["step", "tokens"] + names)
    w.writeheader()
    for r in rows:
      w.writerow({k: r.get(k, "") for k in ["step", "tokens"] + names})
  plot(rows, summary, os.path.join(out_dir, "emergence.png"), source)
  return result


def plot(rows: List[Dict[str, Any]], summary: Dict[str, Any], path: str, source: str = "") -> str:
  """Score vs tokens seen, one panel per task, with the 85%-of-peak level and the tokens that reach it."""

  def draw(ax, k):
    xs = [r["tokens"] for r in rows]
    ys = [r.get(k, float("nan")) for r in rows]
    ax.plot(xs, ys, "o-", lw=1.2)
    peak, t85 = summary[k]["peak"], summary[k]["tokens_to_85pct"]
    if peak > 0:
      ax.axhline(PEAK_FRACTION * peak, color="gray", ls="--", lw=0.8)
    if t85 is not None:
      ax.axvline(t85, color="tab:red", ls=":", lw=1)
      ax.set_title(f"{k}: 85% of peak at {t85:.3g} tok")
    else:
      ax.set_title(f"{k}: peak {peak:.2f}")
    ax.set_xlabel("tokens seen")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)

  return plots.panels(list(summary), path, draw, width=3.6, title=f"tokens from {source}" if source else None,
                      title_size=8)


def main(argv=None):
  use_cpu_if_no_accelerator()  # before JAX picks a backend: no libtpu noise on CPU-only machines
  ap = argparse.ArgumentParser(prog="python -m bagel_jax.eval.emergence", description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True, help="training run workdir (or its checkpoint directory)")
  ap.add_argument("--out", default=None)
  ap.add_argument("--num-samples", type=int, default=4)
  ap.add_argument("--num-timesteps", type=int, default=12)
  ap.add_argument("--steps", default="", help="comma-separated subset of saved steps")
  ap.add_argument("--raw", action="store_true", help="raw weights instead of EMA")
  ap.add_argument("--suites", default=",".join(suites_lib.ALL_SUITES))
  ap.add_argument("--grids", action="store_true", help="also write a sample grid per step")
  args = ap.parse_args(argv)
  try:
    res = run_emergence(args.workdir, args.out, num_samples=args.num_samples, num_timesteps=args.num_timesteps,
                        steps=[int(x) for x in args.steps.split(",") if x] or None, use_ema=not args.raw,
                        suites=[x for x in args.suites.split(",") if x], per_step_grids=args.grids)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"emergence: error: {e}") from None
  for k, v in res["summary"].items():
    t = v["tokens_to_85pct"]
    print(f"{k:12s} peak {v['peak']:.3f}  tokens to 85% of peak: {'n/a' if t is None else f'{t:.4g}'}")


if __name__ == "__main__":
  main()

