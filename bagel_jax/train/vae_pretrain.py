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

  python -m bagel_jax.train.vae_pretrain --image-size 32 --steps 3000 --out /tmp/vae --grid /tmp/recon.png

The same recipe on one's own images is an experiment of its own (Orbax checkpoints, resume, metrics, held-out
PSNR, reconstruction grid; `train()` below), and its checkpoint is what `init.vae=<path>` loads:

  bagel-train --config experiments/own_data/vae.py:manifest=data/t2i.jsonl,steps=2000 --workdir workdirs/vae
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
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
  import shutil  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
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
      print(f"pretraining the tiny VAE stand-in ({steps} steps, {image_size}px); cached at {path}", flush=True)
    params = pretrain_vae(vae_cfg, image_size, steps, seed, batch_size, verbose=verbose)
  save_vae_checkpoint(params, path, vae_cfg, image_size, steps)
  return load_vae(path, vae_cfg)


def _grid(images, recons, path: str) -> None:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  to8 = lambda a: np.clip((np.asarray(a) + 1.0) * 127.5, 0, 255).astype(np.uint8)
  rows = [np.concatenate(list(to8(x)), axis=1) for x in (images, recons)]
  Image.fromarray(np.concatenate(rows, axis=0)).resize(
      (rows[0].shape[1] * 4, 2 * rows[0].shape[0] * 4), Image.NEAREST).save(path)


def main(argv=None):
  import sys  # pylint: disable=import-outside-toplevel
  use_cpu_if_no_accelerator()  # before JAX picks a backend: no libtpu noise on CPU-only machines
  if any(a == "--config" or a.startswith("--config=") for a in (argv or sys.argv)[1:]):
    return _config_main(argv or sys.argv)
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="tiny", help="model preset whose VAE config is trained")
  ap.add_argument("--image-size", type=int, default=32)
  ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
  ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="", help="a .npz file or a VAE checkpoint directory for the parameters "
                  "(default: the cache path)")
  ap.add_argument("--grid", default="", help="PNG of held-out renders (top) and their reconstructions (bottom)")
  args = ap.parse_args(argv)
  from bagel_jax.models.config import get_preset  # pylint: disable=import-outside-toplevel
  cfg = get_preset(args.preset).vae
  t0 = time.time()
  params = pretrain_vae(cfg, args.image_size, args.steps, args.seed, args.batch_size)
  dt = time.time() - t0
  out = args.out or cache_path(cfg, args.image_size, args.steps, args.seed, args.batch_size)
  if out.endswith(".npz"):
    save_params(params, out)
  else:
    save_vae_checkpoint(params, out, cfg, args.image_size, args.steps, args.preset)
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


# ----------------------------------------------------------------------------------------------------------
# The VAE recipe on one's own images (experiments/own_data/vae.py): `bagel-train --config
# experiments/own_data/vae.py:manifest=PATH --workdir W` (or `python -m bagel_jax.train.vae_pretrain --config
# ... --workdir W`). Same loss as above; Orbax checkpoints (params, optimizer state) under W/checkpoints,
# resumable (batch i is drawn from rng(seed, i), so a resumed run sees the batches an uninterrupted one would),
# metrics.jsonl/csv and loss_curves.png, held-out PSNR in eval.json at every checkpoint, recon_grid.png.
# `init.vae=W` (or W/checkpoints) then loads it as the frozen VAE of a BAGEL run.
# ----------------------------------------------------------------------------------------------------------

VAE_CONFIG = "vae_config.json"


def square_image(img, size: int) -> np.ndarray:
  """Centre crop to a square, bicubic resize to size x size, [-1, 1] float32 (the pipeline's normalisation)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  w, h = img.size
  s = min(w, h)
  img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
  return to_float(img.resize((size, size), Image.BICUBIC) if s != size else img)


def manifest_images(paths, image_size: int, *, verbose: bool = True):
  """Every image of every record of the JSONL manifests, squared to image_size; returns (images [N,S,S,3],
  report dict: records, images, skipped by reason with an example). Unreadable records and images are
  counted, not fatal; no image at all is an error naming the reasons."""
  import collections  # pylint: disable=import-outside-toplevel
  from bagel_jax.data.sources import JsonlSource, SafeSource, Skipped  # pylint: disable=import-outside-toplevel
  from bagel_jax.data.transforms import SkipSample, decode  # pylint: disable=import-outside-toplevel
  out, skipped, examples, records = [], collections.Counter(), {}, 0
  for path in paths:
    src = SafeSource(JsonlSource(path), os.path.basename(path))
    for i in range(len(src)):
      records += 1
      rec = src[i]
      if isinstance(rec, Skipped):
        skipped[rec.reason] += 1
        examples.setdefault(rec.reason, rec.detail)
        continue
      images = rec.get("images") or []
      for k, data in enumerate(images):
        try:
          out.append(square_image(decode(data, f"{rec.get('_where', path)} images[{k}]"), image_size))
        except SkipSample as e:
          skipped[e.reason] += 1
          examples.setdefault(e.reason, e.detail)
  report = dict(records=records, images=len(out), skipped=dict(skipped), examples=examples)
  if verbose:
    print(f"vae data: {', '.join(paths)}: {records} records -> {len(out)} images at {image_size}px"
          + (f"; skipped {dict(skipped)} (e.g. {examples})" if skipped else ""), flush=True)
  if not out:
    raise ValueError(f"vae data: no readable image in {list(paths)}: skipped {dict(skipped)}, e.g. {examples}")
  return np.stack(out), report


def psnr(x, y) -> float:
  """Mean per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2, i.e. the usual PSNR on [0, 1] pixels)."""
  mse = np.mean(np.square(np.asarray(x, np.float64) - np.asarray(y, np.float64)), axis=(1, 2, 3))
  return float(np.mean(10.0 * np.log10(4.0 / np.maximum(mse, 1e-12))))


@functools.lru_cache(maxsize=8)
def _reconstruct_fn(cfg: VAEConfig):
  vae = FluxAutoEncoder(cfg)
  return jax.jit(lambda p, x: vae.apply({"params": p}, vae.apply({"params": p}, x, method=FluxAutoEncoder.encode),
                                        method=FluxAutoEncoder.decode))


@functools.lru_cache(maxsize=8)
def _recipe_step(cfg: VAEConfig, lr: float, warmup: int, steps: int, clip: float):
  """(jitted step, optax transform, schedule); cached so a resumed or repeated run in one process reuses the
  compiled step."""
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(clip), optax.adam(sched))

  @jax.jit
  def step_fn(params, opt, x):
    (loss, aux), g = jax.value_and_grad(lambda p: _losses(cfg, p, x), has_aux=True)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, dict(aux, loss=loss, grad_norm=optax.tree.norm(g))

  return step_fn, tx, sched


def reconstruct(cfg: VAEConfig, params, images, batch: int = 64) -> np.ndarray:
  """decode(encode(x)) through the posterior mean."""
  fn = _reconstruct_fn(cfg)
  return np.concatenate([np.asarray(fn(params, jnp.asarray(images[i:i + batch])))
                         for i in range(0, len(images), batch)])


def _holdout_split(pool: np.ndarray, holdout: int, seed: int):
  if holdout <= 0 or len(pool) < 2:
    return pool, pool[:0]
  holdout = min(holdout, len(pool) // 5) or 1
  order = np.random.default_rng([seed, 7]).permutation(len(pool))
  return pool[np.sort(order[holdout:])], pool[np.sort(order[:holdout])]


def _write_vae_config(directory: str, cfg: VAEConfig, image_size: int, preset: str) -> None:
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, VAE_CONFIG + ".tmp")
  with open(tmp, "w") as f:
    json.dump(dict(vae=dataclasses.asdict(cfg), image_size=int(image_size), preset=preset,
                   recipe_version=RECIPE_VERSION), f, indent=1)
  os.replace(tmp, os.path.join(directory, VAE_CONFIG))


def train(config, workdir: str):
  """The VAE recipe (see the section comment); returns the final eval dict."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from bagel_jax.models.config import get_preset  # pylint: disable=import-outside-toplevel
  from bagel_jax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=1))
  cfg = get_preset(config.model.preset).vae
  size, seed = int(config.data.image_size), int(config.seed)
  if size % cfg.downsample:
    raise ValueError(f"config.data.image_size={size} must be a multiple of the VAE's downsample {cfg.downsample}")
  pool, _ = manifest_images(list(config.data.manifests), size)
  if config.data.heldout:
    train_pool, held = pool, manifest_images(list(config.data.heldout), size)[0]
  else:
    train_pool, held = _holdout_split(pool, int(config.data.holdout), seed)
  print(f"vae: {len(train_pool)} training images, {len(held)} held out", flush=True)
  steps, batch = int(config.train.steps), int(config.train.batch_size)
  warmup = min(int(config.optim.warmup_steps), steps // 10 + 1)
  step_fn, tx, sched = _recipe_step(cfg, float(config.optim.lr), warmup, steps, float(config.optim.clip_norm))
  if config.init.vae == "synthetic":
    params = cached_pretrained_vae(cfg, size, steps=default_steps(), seed=seed)
  elif config.init.vae == "random":
    params = init_vae_params(cfg, jax.random.key(seed))
  else:
    params = load_vae(config.init.vae, cfg)
  opt = tx.init(params)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  _write_vae_config(ckpt_dir, cfg, size, config.model.preset)
  mngr = ocp.CheckpointManager(ckpt_dir, item_names=("params", "opt_state"),
                               options=ocp.CheckpointManagerOptions(max_to_keep=int(config.train.keep_checkpoints)))
  start = mngr.latest_step() or 0
  if start:
    restored = mngr.restore(start, args=ocp.args.Composite(params=ocp.args.StandardRestore(params),
                                                           opt_state=ocp.args.StandardRestore(opt)))
    params, opt = restored["params"], restored["opt_state"]
    print(f"vae: resumed from step {start}", flush=True)
  writer = metrics_lib.JsonlCsvWriter(workdir)
  writer.truncate_after(start)

  evals_path = os.path.join(workdir, "eval.json")
  history = []
  if start and os.path.exists(evals_path):
    with open(evals_path) as f:
      history = [e for e in json.load(f).get("history", []) if e["step"] <= start]
  base = psnr(held, np.zeros_like(held)) if len(held) else float("nan")

  def evaluate(step):
    p = pin_logvar(params, cfg)
    ev = dict(step=step, psnr_heldout=psnr(held, reconstruct(cfg, p, held)) if len(held) else None,
              psnr_train=psnr(train_pool[:256], reconstruct(cfg, p, train_pool[:256])),
              heldout_images=len(held), train_images=len(train_pool), psnr_heldout_of_grey=base)
    history.append(ev)
    shown = held if len(held) else train_pool
    n = min(int(config.train.grid_images), len(shown))
    pick = shown[np.linspace(0, len(shown) - 1, n).round().astype(int)]  # spread over the set (often sorted)
    _grid(pick, reconstruct(cfg, p, pick), os.path.join(workdir, "recon_grid.png"))
    with open(evals_path, "w") as f:
      json.dump(dict(ev, history=history), f, indent=1)
    print(f"vae eval step {step}: held-out PSNR {ev['psnr_heldout'] if ev['psnr_heldout'] is None else round(ev['psnr_heldout'], 2)} dB "
          f"(train {ev['psnr_train']:.2f} dB; an all-grey guess {base:.2f} dB)", flush=True)
    return ev

  t0, ev = time.time(), None
  every, log_every = int(config.train.checkpoint_every), int(config.train.log_every)
  step = start
  try:
    while step < steps:
      idx = np.random.default_rng([seed, step]).integers(0, len(train_pool), batch)
      params, opt, m = step_fn(params, opt, jnp.asarray(train_pool[idx]))
      step += 1
      if step % log_every == 0 or step == steps:
        m = {k: float(v) for k, v in m.items()}
        if not np.isfinite(m["loss"]):
          raise FloatingPointError(f"vae: loss is {m['loss']} at step {step}; the last checkpoint is "
                                   f"{mngr.latest_step()} in {ckpt_dir}")
        m.update(lr=float(sched(step)), psnr_batch=10.0 * float(np.log10(4.0 / max(m["mse"], 1e-12))),
                 step_time_s=(time.time() - t0) / max(step - start, 1))
        writer.write_scalars(step, m)
        print(f"vae step {step}/{steps}: loss {m['loss']:.4f} mse {m['mse']:.4f} latent-stat {m['stat']:.4f} "
              f"({time.time() - t0:.0f}s)", flush=True)
      if step % every == 0 or step == steps:
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                opt_state=ocp.args.StandardSave(opt)))
        mngr.wait_until_finished()
        ev = evaluate(step)
  finally:
    mngr.close()
  if ev is None:
    ev = evaluate(step)
  metrics_lib.plot_curves(writer.jsonl_path, os.path.join(workdir, "loss_curves.png"), keys=("loss", "mse", "stat"),
                          title="VAE pretraining")
  return ev


def load_vae(path: str, cfg: VAEConfig):
  """The frozen VAE for `init.vae=<path>`: a VAE-recipe workdir or its checkpoints/ (latest step), a bagel-jax
  checkpoint (e.g. `bagel-convert flux-ae`: its params['vae']), or a .npz of `save_params`. The log-variance
  head is pinned (`pin_logvar`), and the architecture must match `cfg`."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
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
      from bagel_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
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


def _config_main(argv):
  """`python -m bagel_jax.train.vae_pretrain --config experiments/own_data/vae.py:... --workdir W`."""
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  holder = config_flags.DEFINE_config_file("config", None, "experiments/own_data/vae.py[:args]", lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "output directory")

  def run(_):
    if holder.value is None or not workdir.value:
      raise app.UsageError("--config and --workdir are required")
    train(holder.value, workdir.value)

  app.run(run, argv=argv)


if __name__ == "__main__":
  main()
