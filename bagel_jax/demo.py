"""The README's main job until the trainer lands: a tiny BAGEL forward/backward smoke run on CPU.

Trains the tiny MoT preset for a few AdamW steps on random packed batches of every sample kind and prints
CE/MSE, proving the whole forward (ViT, VAE latents, MoT decoder, both losses) and backward path runs.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
import optax

from bagel_jax import batch as batch_lib
from bagel_jax.data.examples import batch_spec_for, random_batch
from bagel_jax.models import bagel as bagel_lib
from bagel_jax.models import config as config_lib


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--workdir", default="workdirs/demo")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--variant", default="mot", choices=config_lib.LAYER_VARIANTS)
  args = ap.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)

  cfg = config_lib.tiny(args.variant)
  spec = batch_spec_for(cfg, batch_size=2, seq_len=128)
  params = bagel_lib.init_gen_from_und(bagel_lib.init_params(cfg, jax.random.key(0)), cfg)
  opt = optax.adamw(1e-3, b1=0.9, b2=0.95, eps=1e-15, weight_decay=0.0)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, batch, rng):
    (loss, m), g = jax.value_and_grad(bagel_lib.loss_fn, has_aux=True)(params, batch, rng, cfg)
    updates, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, m

  batch = random_batch(cfg, spec, seed=0)
  batch_lib.validate(batch, spec)
  history = []
  t0 = time.time()
  for i in range(args.steps):
    params, opt_state, m = step(params, opt_state, batch, jax.random.fold_in(jax.random.key(1), i))
    row = {k: float(m[k]) for k in ("loss", "ce", "mse")}
    history.append(row)
    print(f"step {i:3d}  loss {row['loss']:.4f}  ce {row['ce']:.4f}  mse {row['mse']:.4f}", flush=True)
  with open(os.path.join(args.workdir, "smoke_metrics.json"), "w") as f:
    json.dump(history, f, indent=1)
  print(f"{args.steps} steps in {time.time() - t0:.1f}s; metrics in {args.workdir}/smoke_metrics.json")
  if not history[-1]["loss"] < history[0]["loss"] or not np.isfinite(history[-1]["loss"]):
    raise SystemExit("smoke run: loss did not decrease")


if __name__ == "__main__":
  main()
