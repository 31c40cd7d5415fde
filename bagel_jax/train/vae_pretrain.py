"""A small pretrained stand-in for BAGEL's frozen FLUX AE, for the tiny CPU preset.

Real runs load the pretrained FLUX AE (bagel_jax.convert); the tiny preset's FLUX-layout AE has no released
weights, and a frozen *random* AE decodes every generated latent to noise, so image-generation scores stay at 0
however well the LLM learns. This module trains that tiny AE once on renders of the built-in synthetic data and
caches it, so a CPU run sees what a real run does: a frozen, informative latent space.

Recipe (deterministic from `seed`): Adam on
  reconstruction MSE of decode(encode(x)) through the posterior *mean* (pixels in [-1, 1], the pipeline's
  normalisation)
  + STAT_WEIGHT x per-channel (mean^2 + (var - 1)^2) of the scaled/shifted latents the LLM sees,
    scale_factor * (z - shift_factor), so the rectified-flow target has the scale of its N(0, 1) noise
    (what FLUX's scale/shift constants do for the real AE).
The trainer encodes with a posterior *sample* (as BAGEL trains), so afterwards the log-variance head is pinned
to PINNED_LOGVAR (kernel 0, bias constant): the sample then equals the mean up to noise ~2e-3 of the latents'
unit scale, i.e. the stand-in is a deterministic AE whose sampled and mean paths agree.

  python -m bagel_jax.train.vae_pretrain --image-size 32 --steps 3000 --out /tmp/vae.npz --grid /tmp/recon.png
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from bagel_jax.accelerators import use_cpu_if_no_accelerator
from bagel_jax.data import synthetic
from bagel_jax.data.transforms import to_float
from bagel_jax.models.config import VAEConfig
from bagel_jax.models.flux_vae import FluxAutoEncoder, init_vae_params

RECIPE_VERSION = 1  # part of the cache key: bump when the recipe below changes
# 3000 x 16 renders: ~9 min on one (shared) CPU core, paid once per machine. Held-out recon MSE 0.0021 vs pixel
# variance 0.245, and the GenEval-style checker passes 87% of reconstructed t2i scenes (2000 steps: 0.0036 / 66%,
# 1000: 0.010 / 37%, 600 at lr 2e-3: 0.031 / 3%); fewer steps leave shapes too blurred to be scored.
DEFAULT_STEPS = 3000
DEFAULT_BATCH = 16
LR = 5e-3
STAT_WEIGHT = 0.1
PINNED_LOGVAR = -10.0
POOL = 4096  # distinct training renders (the tiny AE does not overfit this many)
TASKS = ("t2i", "edit", "video", "words")  # the images the VAE sees in training: every generation task's renders


def default_steps() -> int:
  """DEFAULT_STEPS, or $BAGEL_JAX_VAE_STEPS: the default test run pretrains briefly (tests/conftest.py) so a
  fresh CI machine does not pay the full ~9-minute pretraining."""
  return int(os.environ.get("BAGEL_JAX_VAE_STEPS") or DEFAULT_STEPS)


def synthetic_images(n: int, image_size: int, seed: int = 0, split: str = "train") -> np.ndarray:
  """n renders in [-1, 1], float32 [n, S, S, 3], cycling over TASKS; one image per record (record i's image
  i mod len(images), so edit sources/targets and video frames all appear). `split="test"` is held out."""
  out = []
  for i in range(n):
    task = TASKS[i % len(TASKS)]
    rec = synthetic.make_example(task, synthetic.record_rng(seed, split, task, i // len(TASKS)), image_size)
    out.append(to_float(rec["images"][(i // len(TASKS)) % len(rec["images"])]))
  return np.stack(out)


def _losses(cfg: VAEConfig, params, x):
  vae = FluxAutoEncoder(cfg)
  z = vae.apply({"params": params}, x, method=FluxAutoEncoder.encode)  # rng=None: the posterior mean, scaled
  rec = vae.apply({"params": params}, z, method=FluxAutoEncoder.decode)
  mse = jnp.mean(jnp.square(rec - x))
  mu, var = z.mean((0, 1, 2)), z.var((0, 1, 2))
  stat = jnp.mean(jnp.square(mu) + jnp.square(var - 1.0))
  return mse + STAT_WEIGHT * stat, dict(mse=mse, stat=stat)


def recon_mse(cfg: VAEConfig, params, images, rng=None, batch: int = 64) -> float:
  """Mean squared reconstruction error of decode(encode(images, rng)) (rng: posterior sample, as training)."""
  vae = FluxAutoEncoder(cfg)
  fn = jax.jit(lambda p, x, r: jnp.sum(jnp.square(vae.apply({"params": p}, vae.apply(
      {"params": p}, x, r, method=FluxAutoEncoder.encode), method=FluxAutoEncoder.decode) - x)))
  total = sum(float(fn(params, jnp.asarray(images[i:i + batch]), rng)) for i in range(0, len(images), batch))
  return total / images.size


def latent_stats(cfg: VAEConfig, params, images):
  """Per-channel mean and std of the scaled/shifted latents (what the LLM regresses)."""
  z = np.asarray(FluxAutoEncoder(cfg).apply({"params": params}, jnp.asarray(images),
                                            method=FluxAutoEncoder.encode))
  return z.mean((0, 1, 2)), z.std((0, 1, 2))


def pin_logvar(params, cfg: VAEConfig):
  """Encoder output channels [z:] are the log-variance: make it the constant PINNED_LOGVAR."""
  conv = dict(params["encoder"]["conv_out"])
  z = cfg.z_channels
  conv["kernel"] = conv["kernel"].at[..., z:].set(0.0)
  conv["bias"] = conv["bias"].at[z:].set(PINNED_LOGVAR)
  return dict(params, encoder=dict(params["encoder"], conv_out=conv))


def pretrain_vae(vae_cfg: VAEConfig, image_size: int, steps: int = DEFAULT_STEPS, seed: int = 0,
                 batch_size: int = DEFAULT_BATCH, log_every: int = 50, verbose: bool = True):
  """Trains the AE from `init_vae_params(vae_cfg, key(seed))` on synthetic renders; returns its parameters."""
  pool = synthetic_images(POOL, image_size, seed, "train")
  params = init_vae_params(vae_cfg, jax.random.key(seed))
  warmup = min(50, steps // 10 + 1)
  sched = optax.warmup_cosine_decay_schedule(0.0, LR, warmup, max(steps, warmup + 1), LR * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x):
    (loss, aux), g = jax.value_and_grad(lambda p: _losses(vae_cfg, p, x), has_aux=True)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, dict(aux, loss=loss)

  gen = np.random.default_rng(seed)
  t0 = time.time()
  for i in range(1, steps + 1):
    params, opt, m = step(params, opt, jnp.asarray(pool[gen.integers(0, POOL, batch_size)]))
    if verbose and (i % log_every == 0 or i == steps):
      m = {k: float(v) for k, v in m.items()}
      print(f"vae pretrain step {i}/{steps}: loss {m['loss']:.4f} mse {m['mse']:.4f} latent-stat {m['stat']:.4f} "
            f"({time.time() - t0:.0f}s)", flush=True)
  return pin_logvar(params, vae_cfg)


def cache_path(vae_cfg: VAEConfig, image_size: int, steps: int, seed: int, batch_size: int,
               cache_dir: str | None = None) -> str:
  """`$BAGEL_JAX_CACHE/vae/<hash>.npz` (default `~/.cache/bagel_jax`), keyed by everything that shapes the result."""
  key = json.dumps(dict(vae=dataclasses.asdict(vae_cfg), image_size=int(image_size), steps=int(steps),
                        seed=int(seed), batch_size=int(batch_size), version=RECIPE_VERSION), sort_keys=True)
  root = cache_dir or os.environ.get("BAGEL_JAX_CACHE") or os.path.expanduser("~/.cache/bagel_jax")
  return os.path.join(root, "vae", hashlib.sha256(key.encode()).hexdigest()[:16] + ".npz")


def save_params(params, path: str) -> None:
  """Atomic .npz write (flattened 'a/b/c' keys): concurrent runs never read a half-written cache."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()})
  os.replace(tmp, path)


def load_params(path: str):
  with np.load(path) as f:
    return traverse_util.unflatten_dict({k: jnp.asarray(f[k]) for k in f.files}, sep="/")


def cached_pretrained_vae(vae_cfg: VAEConfig, image_size: int, steps: int = DEFAULT_STEPS, seed: int = 0,
                          batch_size: int = DEFAULT_BATCH, cache_dir: str | None = None, verbose: bool = True):
  """`pretrain_vae`, paid once: later calls (other runs, tests) load the cached .npz."""
  path = cache_path(vae_cfg, image_size, steps, seed, batch_size, cache_dir)
  if os.path.exists(path):
    return load_params(path)
  if verbose:
    print(f"pretraining the tiny VAE stand-in ({steps} steps, {image_size}px); cached at {path}", flush=True)
  params = pretrain_vae(vae_cfg, image_size, steps, seed, batch_size, verbose=verbose)
  save_params(params, path)
  return params


def _grid(images, recons, path: str) -> None:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  to8 = lambda a: np.clip((np.asarray(a) + 1.0) * 127.5, 0, 255).astype(np.uint8)
  rows = [np.concatenate(list(to8(x)), axis=1) for x in (images, recons)]
  Image.fromarray(np.concatenate(rows, axis=0)).resize(
      (rows[0].shape[1] * 4, 2 * rows[0].shape[0] * 4), Image.NEAREST).save(path)


def main(argv=None):
  use_cpu_if_no_accelerator()  # before JAX picks a backend: no libtpu noise on CPU-only machines
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="tiny", help="model preset whose VAE config is trained")
  ap.add_argument("--image-size", type=int, default=32)
  ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
  ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="", help=".npz for the parameters (default: the cache path)")
  ap.add_argument("--grid", default="", help="PNG of held-out renders (top) and their reconstructions (bottom)")
  args = ap.parse_args(argv)
  from bagel_jax.models.config import get_preset  # pylint: disable=import-outside-toplevel
  cfg = get_preset(args.preset).vae
  t0 = time.time()
  params = pretrain_vae(cfg, args.image_size, args.steps, args.seed, args.batch_size)
  dt = time.time() - t0
  out = args.out or cache_path(cfg, args.image_size, args.steps, args.seed, args.batch_size)
  save_params(params, out)
  test = synthetic_images(256, args.image_size, args.seed, "test")
  rand = init_vae_params(cfg, jax.random.key(args.seed))
  mu, sd = latent_stats(cfg, params, test)
  print(f"trained in {dt:.0f}s -> {out}\nheld-out ({len(test)} renders): pixel variance {test.var():.4f}; "
        f"recon MSE random init {recon_mse(cfg, rand, test):.4f}, pretrained {recon_mse(cfg, params, test):.4f} "
        f"(posterior sample {recon_mse(cfg, params, test, jax.random.key(1)):.4f}); scaled latents per channel: "
        f"mean {[round(float(m), 3) for m in mu]} std {[round(float(d), 3) for d in sd]}")
  if args.grid:
    n = 12
    vae = FluxAutoEncoder(cfg)
    rec = vae.apply({"params": params}, vae.apply({"params": params}, jnp.asarray(test[:n]),
                                                  method=FluxAutoEncoder.encode), method=FluxAutoEncoder.decode)
    _grid(test[:n], rec, args.grid)
    print(f"grid: {args.grid}")


if __name__ == "__main__":
  main()
