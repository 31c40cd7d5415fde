"""The README's main job: train a tiny BAGEL (MoT) on the built-in synthetic data on CPU, then evaluate it.

  python -m bagel_jax.demo --workdir workdirs/demo [--steps 600]

Runs the same `bagel-train` path a pod run takes (the Table-3 pre-training recipe of
experiments/bagel_7b/pretrain.py at the tiny size: Grain pipeline over the synthetic mix, sharded step, Orbax
checkpoints, metrics CSV/JSONL and a loss-curve PNG), then the judge-free evaluation on held-out synthetic
prompts: text-to-image samples scored by the rule-based checker, VQA accuracy, writing scores JSON and a sample
grid PNG. Re-running resumes training from the last checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from bagel_jax.accelerators import use_cpu_if_no_accelerator

# The experiment file (installed beside the package; the package itself never imports experiments/).
PRETRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "bagel_7b",
                        "pretrain.py")


def main(argv=None):
  use_cpu_if_no_accelerator()  # before JAX picks a backend: no libtpu noise on CPU-only machines
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", default="workdirs/demo")
  ap.add_argument("--steps", type=int, default=600)
  ap.add_argument("--variant", default="mot", choices=("dense", "moe", "mot", "moe_topk"))
  ap.add_argument("--eval-samples", type=int, default=8)
  ap.add_argument("--skip-eval", action="store_true")
  args = ap.parse_args(argv)

  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)
  # after use_cpu_if_no_accelerator: importing JAX earlier would pick the backend first
  from bagel_jax.train import config as train_config, trainer  # pylint: disable=import-outside-toplevel

  config = train_config.load_config(f"{PRETRAIN}:model=tiny,variant={args.variant},steps={args.steps}")
  config.train.checkpoint_every = max(50, args.steps // 4)
  config.train.keep_checkpoints = 5
  workdir = os.path.abspath(args.workdir)
  t0 = time.time()
  last = trainer.train(config, workdir)
  print(f"training: {time.time() - t0:.0f}s; final CE {last.get('ce_avg', last.get('ce')):.3f} "
        f"MSE {last.get('mse_avg', last.get('mse')):.3f}")
  print(f"  metrics: {workdir}/metrics.csv  curves: {workdir}/loss_curves.png  checkpoints: {workdir}/checkpoints")
  if args.skip_eval:
    return
  from bagel_jax.eval import run as eval_run  # pylint: disable=import-outside-toplevel  (after the JAX backend choice)
  t0 = time.time()
  scores = eval_run.evaluate(workdir, os.path.join(workdir, "eval"), num_samples=args.eval_samples)
  print(f"evaluation: {time.time() - t0:.0f}s")
  print(json.dumps(scores, indent=1, default=str)[:2000])
  print(f"  scores and sample grid: {workdir}/eval/ ({eval_run.SCORES_JSON}, {eval_run.GRID_PNG})")


if __name__ == "__main__":
  main()
