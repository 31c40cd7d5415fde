"""The VAE experiment (`recipe="vae"`): the stand-in's pretraining as a run of its own, with a workdir.

`bagel-train --config experiments/own_data/vae.py:manifest=PATH --workdir W` trains the tiny AE on every image of
one's manifests (the `vae_pretrain` loss); Orbax checkpoints (params, optimizer state) under W/checkpoints,
resumable (batch i is drawn from rng(seed, i), so a resumed run sees the batches an uninterrupted one would),
metrics.jsonl/csv and loss_curves.png, held-out PSNR in eval.json at every checkpoint, recon_grid.png.
`bagel-train --config experiments/tiny/vae.py --workdir W` is the synthetic-render stand-in itself
(`vae_pretrain.pretrain_vae`, what `init.vae="synthetic"` caches). Either way `init.vae=W` (or W/checkpoints)
then loads the result as the frozen VAE of a BAGEL run.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from PIL import Image

from bagel_jax import console
from bagel_jax.data.sources import JsonlSource, SafeSource, Skipped
from bagel_jax.data.transforms import SkipSample, decode, to_float
from bagel_jax.models.config import VAEConfig, get_preset
from bagel_jax.models.flux_vae import FluxAutoEncoder, init_vae_params
from bagel_jax.train import metrics as metrics_lib
from bagel_jax.train.vae_pretrain import (_losses, _write_vae_config, cached_pretrained_vae, default_steps,
                                          load_vae, pin_logvar, pretrain_vae, synthetic_images)

log = console.logger(__name__)

def square_image(img, size: int) -> np.ndarray:
  """Centre crop to a square, bicubic resize to size x size, [-1, 1] float32 (the pipeline's normalisation)."""
  w, h = img.size
  s = min(w, h)
  img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
  return to_float(img.resize((size, size), Image.BICUBIC) if s != size else img)


def manifest_images(paths, image_size: int, *, verbose: bool = True):
  """Every image of every record of the JSONL manifests, squared to image_size; returns (images [N,S,S,3],
  report dict: records, images, skipped by reason with an example). Unreadable records and images are
  counted, not fatal; no image at all is an error naming the reasons."""
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
    log.info(f"vae data: {', '.join(paths)}: {records} records -> {len(out)} images at {image_size}px"
          + (f"; skipped {dict(skipped)} (e.g. {examples})" if skipped else ""))
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



def _grid(images, recons, path: str) -> None:
  to8 = lambda a: np.clip((np.asarray(a) + 1.0) * 127.5, 0, 255).astype(np.uint8)
  rows = [np.concatenate(list(to8(x)), axis=1) for x in (images, recons)]
  Image.fromarray(np.concatenate(rows, axis=0)).resize(
      (rows[0].shape[1] * 4, 2 * rows[0].shape[0] * 4), Image.NEAREST).save(path)



def train(config, workdir: str):
  """The VAE recipe (see the module docstring); returns the final eval dict."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=1))
  cfg = get_preset(config.model.preset).vae
  size, seed = int(config.data.image_size), int(config.seed)
  if size % cfg.downsample:
    raise ValueError(f"config.data.image_size={size} must be a multiple of the VAE's downsample {cfg.downsample}")
  if config.data.get("source", "") == "synthetic":
    return _train_synthetic(config, workdir, cfg, size, seed)
  pool, _ = manifest_images(list(config.data.manifests), size)
  if config.data.heldout:
    train_pool, held = pool, manifest_images(list(config.data.heldout), size)[0]
  else:
    train_pool, held = _holdout_split(pool, int(config.data.holdout), seed)
  log.info(f"vae: {len(train_pool)} training images, {len(held)} held out")
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
    log.info(f"vae: resumed from step {start}")
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
    log.info(f"vae eval step {step}: held-out PSNR {ev['psnr_heldout'] if ev['psnr_heldout'] is None else round(ev['psnr_heldout'], 2)} dB "
          f"(train {ev['psnr_train']:.2f} dB; an all-grey guess {base:.2f} dB)")
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
        log.info(f"vae step {step}/{steps}: loss {m['loss']:.4f} mse {m['mse']:.4f} latent-stat {m['stat']:.4f} "
              f"({time.time() - t0:.0f}s)")
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


def _train_synthetic(config, workdir: str, cfg: VAEConfig, size: int, seed: int):
  """experiments/tiny/vae.py: `vae_pretrain.pretrain_vae` on the synthetic renders into W/checkpoints/<steps>
  (the layout `init.vae=W` loads, and the one `init.vae="synthetic"` caches); eval.json (held-out renders) and
  recon_grid.png. A finished run is not redone."""
  steps, batch = int(config.train.steps), int(config.train.batch_size)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  _write_vae_config(ckpt_dir, cfg, size, config.model.preset)
  with ocp.CheckpointManager(ckpt_dir, item_names=("params",)) as mngr:
    if mngr.latest_step() == steps:
      log.info(f"vae: step {steps} is already in {ckpt_dir}")
      params = load_vae(workdir, cfg)
    else:
      t0 = time.time()
      params = pretrain_vae(cfg, size, steps, seed, batch, log_every=int(config.train.log_every))
      mngr.save(steps, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
      mngr.wait_until_finished()
      log.info(f"vae: trained {steps} steps in {time.time() - t0:.0f}s -> {ckpt_dir}")
  held = synthetic_images(256, size, seed, "test")
  rec = reconstruct(cfg, params, held)
  ev = dict(step=steps, psnr_heldout=psnr(held, rec), heldout_images=len(held),
            psnr_heldout_of_grey=psnr(held, np.zeros_like(held)))
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(ev, f, indent=1)
  n = int(config.train.grid_images)
  _grid(held[:n], rec[:n], os.path.join(workdir, "recon_grid.png"))
  log.info(f"vae eval: held-out PSNR {ev['psnr_heldout']:.2f} dB (an all-grey guess {ev['psnr_heldout_of_grey']:.2f} dB)")
  return ev
