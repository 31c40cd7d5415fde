"""A small pretrained stand-in for BAGEL's frozen FLUX AE, for the tiny CPU preset.

Real runs load the pretrained FLUX AE (bagel_jax.convert); the tiny preset's FLUX-layout AE has no released
weights, and a frozen *random* AE decodes every generated latent to noise, so image-generation scores stay at 0
however well the LLM learns. This module trains that tiny AE on renders of the built-in synthetic data, so a
CPU run sees what a real run does: a frozen, informative latent space.

Recipe (deterministic from `seed`): Adam on
  reconstruction MSE of decode(encode(x)) through the posterior *mean* (pixels in [-1, 1], the pipeline's
  normalisation)
  + STAT_WEIGHT x per-channel (mean^2 + (var - 1)^2) of the scaled/shifted latents the LLM sees,
    scale_factor * (z - shift_factor), so the rectified-flow target has the scale of its N(0, 1) noise
    (what FLUX's scale/shift constants do for the real AE).
The trainer encodes with a posterior *sample* (as BAGEL trains), so afterwards the log-variance head is pinned
to PINNED_LOGVAR (kernel 0, bias constant): the sample then equals the mean up to noise ~2e-3 of the latents'
unit scale, i.e. the stand-in is a deterministic AE whose sampled and mean paths agree.

The pretraining is an experiment of its own, experiments/tiny/vae.py (`bagel-train --config
experiments/tiny/vae.py --workdir W` writes the checkpoint `init.vae=W` loads). `init.vae="synthetic"` names that
experiment's run at its defaults, kept once per machine in a cache (`cached_pretrained_vae`). The same recipe
on one's own images is `experiments/own_data/vae.py` (`bagel_jax.train.vae_recipe`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util

from bagel_jax import console
from bagel_jax import checkpoint as ckpt_lib
from bagel_jax.data import synthetic
from bagel_jax.data.transforms import to_float
from bagel_jax.models.config import VAEConfig
from bagel_jax.models.flux_vae import FluxAutoEncoder, init_vae_params

log = console.logger(__name__)

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
      log.info(f"vae pretrain step {i}/{steps}: loss {m['loss']:.4f} mse {m['mse']:.4f} latent-stat {m['stat']:.4f} "
            f"({time.time() - t0:.0f}s)")
  return pin_logvar(params, vae_cfg)


def cache_path(vae_cfg: VAEConfig, image_size: int, steps: int, seed: int, batch_size: int,
               cache_dir: str | None = None) -> str:
  """`$BAGEL_JAX_CACHE/vae/<hash>` (default `~/.cache/bagel_jax`), keyed by everything that shapes the result:
  a VAE checkpoint directory in the layout of the own-data VAE recipe (`checkpoints/<steps>/params` +
  `checkpoints/vae_config.json`), so `init.vae=<it>` loads it like any VAE checkpoint."""
  key = json.dumps(dict(vae=dataclasses.asdict(vae_cfg), image_size=int(image_size), steps=int(steps),
                        seed=int(seed), batch_size=int(batch_size), version=RECIPE_VERSION), sort_keys=True)
  root = cache_dir or os.environ.get("BAGEL_JAX_CACHE") or os.path.expanduser("~/.cache/bagel_jax")
  return os.path.join(root, "vae", hashlib.sha256(key.encode()).hexdigest()[:16])


def save_params(params, path: str) -> None:
  """Atomic .npz write (flattened 'a/b/c' keys): concurrent runs never read a half-written file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()})
  os.replace(tmp, path)


def load_params(path: str):
  with np.load(path) as f:
    return traverse_util.unflatten_dict({k: jnp.asarray(f[k]) for k in f.files}, sep="/")


def save_vae_checkpoint(params, directory: str, vae_cfg: VAEConfig, image_size: int, step: int,
                        preset: str = "") -> str:
  """`params` as a VAE checkpoint (`directory/checkpoints/<step>/params` + vae_config.json), written to a
  temporary sibling and renamed, so concurrent runs never read a half-written one (the first rename wins)."""
  directory = os.path.abspath(directory)
  tmp = f"{directory}.tmp{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  ckpt = os.path.join(tmp, "checkpoints")
  _write_vae_config(ckpt, vae_cfg, image_size, preset)
  with ocp.CheckpointManager(ckpt, item_names=("params",)) as mngr:
    mngr.save(int(step), args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
    mngr.wait_until_finished()
  try:
    os.replace(tmp, directory)
  except OSError:  # another process stored it first
    shutil.rmtree(tmp, ignore_errors=True)
  return directory


def cached_pretrained_vae(vae_cfg: VAEConfig, image_size: int, steps: int = DEFAULT_STEPS, seed: int = 0,
                          batch_size: int = DEFAULT_BATCH, cache_dir: str | None = None, verbose: bool = True):
  """`pretrain_vae`, paid once: later calls (other runs, tests) load the cached checkpoint. A cache written by
  an earlier version as `<hash>.npz` is converted to the checkpoint layout instead of retrained."""
  path = cache_path(vae_cfg, image_size, steps, seed, batch_size, cache_dir)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return load_vae(path, vae_cfg)
  legacy = path + ".npz"
  if os.path.exists(legacy):
    params = load_params(legacy)
  else:
    if verbose:
      log.info(f"pretraining the tiny VAE stand-in ({steps} steps, {image_size}px); cached at {path}")
    params = pretrain_vae(vae_cfg, image_size, steps, seed, batch_size, verbose=verbose)
  save_vae_checkpoint(params, path, vae_cfg, image_size, steps)
  return load_vae(path, vae_cfg)



VAE_CONFIG = "vae_config.json"


def _write_vae_config(directory: str, cfg: VAEConfig, image_size: int, preset: str) -> None:
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, VAE_CONFIG + ".tmp")
  with open(tmp, "w") as f:
    json.dump(dict(vae=dataclasses.asdict(cfg), image_size=int(image_size), preset=preset,
                   recipe_version=RECIPE_VERSION), f, indent=1)
  os.replace(tmp, os.path.join(directory, VAE_CONFIG))



def load_vae(path: str, cfg: VAEConfig):
  """The frozen VAE for `init.vae=<path>`: a VAE-recipe workdir or its checkpoints/ (latest step), a bagel-jax
  checkpoint (e.g. `bagel-convert flux-ae`: its params['vae']), or a .npz of `save_params`. The log-variance
  head is pinned (`pin_logvar`), and the architecture must match `cfg`."""
  path = os.path.abspath(path)
  if path.endswith(".npz"):
    params = load_params(path)
    saved = None
  else:
    d = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    if os.path.exists(os.path.join(d, VAE_CONFIG)):
      with open(os.path.join(d, VAE_CONFIG)) as f:
        saved = json.load(f)["vae"]
      with ocp.CheckpointManager(d) as mngr:
        step = mngr.latest_step()
        if step is None:
          raise FileNotFoundError(f"init.vae={path}: no checkpoint steps under {d}")
        target = init_vae_params(cfg, jax.random.key(0))
        params = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    elif os.path.exists(os.path.join(d, "model_config.json")):
      saved = dataclasses.asdict(ckpt_lib.read_model_config(d).vae)
      with ocp.CheckpointManager(d) as mngr:
        step = mngr.latest_step()
        if step is None:
          raise FileNotFoundError(f"init.vae={path}: no checkpoint steps under {d}")
        tree = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]
      if "vae" not in tree:
        raise ValueError(f"init.vae={path}: the checkpoint has no VAE parameters (params['vae'])")
      params = jax.tree.map(jnp.asarray, tree["vae"])
    else:
      raise FileNotFoundError(f"init.vae={path}: not a VAE checkpoint (no {VAE_CONFIG}), bagel-jax checkpoint "
                              "(no model_config.json) or .npz")
  if saved is not None:
    want = json.loads(json.dumps(dataclasses.asdict(cfg)))
    if json.loads(json.dumps(saved)) != want:
      raise ValueError(f"init.vae={path}: VAE config {saved} differs from the model's {want}")
  want_shapes = jax.tree.map(lambda x: tuple(np.shape(x)), init_vae_params(cfg, jax.random.key(0)))
  got_shapes = jax.tree.map(lambda x: tuple(np.shape(x)), params)
  if want_shapes != got_shapes:
    raise ValueError(f"init.vae={path}: parameter shapes do not match the model's VAE config")
  return pin_logvar(params, cfg)
